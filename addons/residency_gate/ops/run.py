"""`residency-gate run`: mitmproxy embedded, our addon loaded, config already valid.

Startup order matters for fail-closed: bundle validated -> audit chain recovered
(and the config in force recorded) -> CA present -> listen. Shutdown flushes the
audit log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys

from ..audit.open import open_audit
from ..audit.record import config_fields
from ..catalog.bundle import Bundle
from ..catalog.freshness import oldest_by_provider
from ..proxy.addon import ResidencyGate
from ..proxy.interface import Gate
from . import worker
from .ca import CaError, load_or_create_ca
from .embed import CA_CERT, gate_master, limit_options, mitmproxy_options
from .logs import setup_logging
from .metrics import METRICS
from .reload import Reloader

log = logging.getLogger("residency_gate")


async def serve(bundle: Bundle, config_arg: str | None) -> int:
    config = bundle.config
    # `run --workers N`: this is worker i of N (see worker.py); None when single-process.
    index = worker.worker_index()
    if index is None:  # (the supervisor checked the shared port itself)
        problem = listen_problem(config)
        if problem:
            log.error("%s", problem)
            return 1
    config.certs_dir.mkdir(parents=True, exist_ok=True)
    ca_existed = (config.certs_dir / CA_CERT).exists()
    # Created here, not by mitmproxy on first use, so that it carries the configured names.
    load_or_create_ca(config.certs_dir, config.ca, quiet=True)
    origin = config.audit.origin
    admin_addr = config.admin
    if index is not None:
        worker.setup_child(index)
        origin = worker.worker_origin(origin, index)
        if admin_addr is not None:
            admin_addr = worker.worker_admin(admin_addr, index)

    async def writer_restarted(reason: str) -> None:
        """The chain says the writer was restarted, and under which config it goes on."""
        METRICS.audit_writer_restarts.inc()
        now = gate.bundle
        await writer.append("config", config_fields(
            now.revisions, str(now.config.path) if now.config.path else None,
            now.catalog.files, "writer_restart"))

    writer = open_audit(config.audit, config.certs_dir, origin, writer_restarted)
    gate = Gate(bundle=bundle, audit=writer, metrics=METRICS)
    try:
        await writer.append("config", config_fields(
            bundle.revisions, str(config.path) if config.path else None, bundle.catalog.files,
            "start"))
    except Exception:
        await writer.close()
        raise
    METRICS.set_catalog_version(bundle.catalog.revision)
    METRICS.set_review_ages(oldest_by_provider(bundle.catalog))
    METRICS.open_connections.set(0)

    # The admin listener starts before mitmproxy's master exists: if its port is taken,
    # we fail before mitmproxy installs its log handler (bound to this event loop).
    admin = None
    if admin_addr is not None:
        from .admin import AdminServer

        def ready() -> dict[str, bool | str]:
            return {"catalog": gate.bundle is not None, "audit": gate.audit.healthy}

        def live() -> dict[str, bool | str]:
            return {"audit": audit_alive(gate.audit) or "the audit log failed for good"}

        admin = AdminServer(admin_addr[0], admin_addr[1], METRICS.registry, ready,
                            live_checks=live if config.audit.fail_healthz else None)
        try:
            await admin.start()
        except OSError:
            await writer.close()
            raise
        log.info("admin listener on http://%s:%d (/healthz /readyz /metrics)",
                 admin_addr[0], admin.port)

    master = gate_master(ResidencyGate(gate))
    master.options.update(**mitmproxy_options(bundle))

    reloader = Reloader(gate, config_arg, METRICS,
                        on_swap=lambda b: master.options.update(**limit_options(b.config.limits)))
    loop = asyncio.get_running_loop()
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        log.info("stopping: finishing open flows and flushing the audit log")
        master.shutdown()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        # Shutting down cancels mitmproxy's per-connection tasks: expected, not an error.
        if stopping and isinstance(context.get("exception"), asyncio.CancelledError):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(on_loop_error)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
    reloader.start()

    run = asyncio.create_task(master.run())
    await asyncio.sleep(0)
    for _ in range(200):  # wait for the listener, so the log line tells the truth
        if run.done() or ((config.certs_dir / CA_CERT).exists() and _listening(master)):
            break
        await asyncio.sleep(0.05)
    if not ca_existed and (config.certs_dir / CA_CERT).exists():
        print(
            f"residency-gate: created an interception CA (CN={config.ca.common_name}, "
            f"O={config.ca.organization}) in {config.certs_dir}.\n"
            f"  Clients must trust {config.certs_dir / CA_CERT} (e.g. SSL_CERT_FILE, "
            "AWS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, or the OS trust store);\n"
            "  `residency-gate ca export` prints it (PEM/DER) and `residency-gate ca pac` "
            "writes a PAC file.",
            file=sys.stderr, flush=True,
        )
    if not run.done():
        log.info("residency-gate listening on %s:%d (mode %s), catalog %s, audit origin %s",
                 config.listen[0], config.listen[1], config.mode, bundle.catalog.revision,
                 origin)
        if index is not None:
            if worker.listen_port_shared(master.addons.get("proxyserver").listen_addrs()):
                worker.notify_ready()
            else:  # never serve a share of the port silently alone
                log.critical("worker listener is not using SO_REUSEPORT; stopping")
                master.shutdown()
    try:
        await run
    finally:
        reloader.stop()
        if admin is not None:
            await admin.stop()
        if gate.background:
            await asyncio.gather(*gate.background, return_exceptions=True)
        try:
            await writer.close()
        except Exception as e:
            log.critical("audit log could not be closed cleanly: %s", e)
    errored = getattr(master, "errorcheck", None)
    return 1 if errored is not None and errored.has_errored else 0


def listen_problem(config) -> str | None:
    """Whether `listen` can be bound, said in residency-gate's terms (mitmproxy's own
    message would suggest a mitmproxy command-line flag). Bound like asyncio's listener
    (SO_REUSEADDR) and closed at once; TCP modes only."""
    from mitmproxy.proxy.mode_specs import ProxyMode

    try:
        mode = ProxyMode.parse(config.mode)
    except ValueError:
        return None  # `check` reports a bad mode
    host, port = config.listen
    if mode.transport_protocol != "tcp" or mode.custom_listen_port is not None or port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(addr)
    except OSError as e:
        where = _listen_key(config)
        if e.errno == errno.EADDRINUSE:
            return (f"cannot listen on {host}:{port}: the port is already in use (another "
                    f"residency-gate, or another program). Stop it, or change {where}, "
                    f"e.g. listen: {host or '0.0.0.0'}:{port + 1}")
        return f"cannot listen on {host}:{port}: {e.strerror or e}; check {where}"
    return None


def _listen_key(config) -> str:
    """Where the admin changes the listen address."""
    doc = config.doc
    if config.path is None or doc is None:
        return "`listen:` in a config file (-c FILE, or ./residency-gate.yaml)"
    if ("listen",) in doc.lines:
        return f"`listen:` in {config.path}:{doc.line(('listen',))}"
    return f"`listen:` (add it to {config.path}; the default is 127.0.0.1:8080)"


def audit_alive(sink) -> bool:
    """False once the audit sink can never write again (not while it restarts a writer)."""
    if hasattr(sink, "failed_for_good"):
        return not sink.failed_for_good
    return getattr(sink, "failure", None) is None  # a writer on a thread never comes back


def _listening(master) -> bool:
    proxyserver = master.addons.get("proxyserver")
    servers = getattr(proxyserver, "servers", None)
    try:
        return any(s.listen_addrs for s in servers)
    except Exception:
        return False


def run(bundle: Bundle, config_arg: str | None = None) -> int:
    setup_logging(bundle.config.log_format, bundle.config.log_level)
    try:
        # a worker child's loop binds its listeners with SO_REUSEPORT (worker.py)
        return asyncio.run(serve(bundle, config_arg), loop_factory=worker.loop_factory())
    except KeyboardInterrupt:
        return 0
    except (OSError, CaError) as e:
        log.error("cannot start: %s", e)
        return 1
