"""`residency-gate run`: mitmproxy embedded, our addon loaded, config already valid.

Startup order matters for fail-closed: policy validated -> audit chain recovered
-> CA present -> listen. Shutdown flushes the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import certifi
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster

from ..addon import Gate, ResidencyGate
from ..audit.keys import load_or_create_signing_key
from ..audit.writer import AuditWriter
from ..audit.writer_process import ProcessAuditWriter
from ..policy import Policy
from . import workers
from .logs import setup_logging
from .metrics import METRICS
from .reload import Reloader

log = logging.getLogger("residency_gate")

CA_CERT = "mitmproxy-ca-cert.pem"


def upstream_trust_bundle(policy: Policy) -> Path | None:
    """mitmproxy's trusted-CA option replaces the default roots; we add to them instead."""
    extra = policy.config.upstream_ca
    if extra is None:
        return None
    bundle = policy.config.certs_dir / "upstream-trust.pem"
    data = Path(certifi.where()).read_bytes() + b"\n" + extra.read_bytes()
    if not bundle.exists() or bundle.read_bytes() != data:
        bundle.write_bytes(data)
    return bundle


def mitmproxy_options(policy: Policy) -> dict:
    config = policy.config
    opts: dict = {
        "listen_host": config.listen[0],
        "listen_port": config.listen[1],
        "mode": [config.mode],
        "confdir": str(config.certs_dir),
        # Lazy: no upstream connection before our decision, so a refused request
        # never even opens a TCP/TLS connection to the provider.
        "connection_strategy": "lazy",
    }
    bundle = upstream_trust_bundle(policy)
    if bundle is not None:
        opts["ssl_verify_upstream_trusted_ca"] = str(bundle)
    if config.proxy_auth:
        opts["proxyauth"] = config.proxy_auth
    return opts


class NullAudit:
    """Benchmark-only sink (RESIDENCY_GATE_BENCH_NO_AUDIT=1): measures the cost of auditing."""

    healthy = True

    def __init__(self) -> None:
        self._seq = 0

    async def append(self, kind: str, fields: dict) -> dict:
        self._seq += 1
        return {"id": f"bench:{self._seq}"}

    async def close(self) -> None:
        pass


def open_audit(policy: Policy, origin: str | None = None
               ) -> ProcessAuditWriter | AuditWriter | NullAudit:
    """The audit writer, open. By default in its own process (signing, hashing and fsync
    off the proxy's core); RESIDENCY_GATE_AUDIT_THREAD=1 keeps it on a thread in-process."""
    if os.environ.get("RESIDENCY_GATE_BENCH_NO_AUDIT") == "1":
        log.critical("RESIDENCY_GATE_BENCH_NO_AUDIT=1: NO AUDIT RECORDS ARE WRITTEN "
                     "(benchmarking only; never run a real proxy like this)")
        return NullAudit()
    audit = policy.config.audit
    key = load_or_create_signing_key(policy.config.certs_dir)
    cls = AuditWriter if os.environ.get("RESIDENCY_GATE_AUDIT_THREAD") == "1" \
        else ProcessAuditWriter
    writer = cls(
        audit.dir, key, origin or audit.origin, fsync=audit.fsync,
        rotate_bytes=audit.rotate_bytes, rotate_seconds=audit.rotate_seconds,
        checkpoint_every=audit.checkpoint_every, checkpoint_seconds=audit.checkpoint_seconds,
        anchor_file=audit.anchor,
    )
    writer.open()
    return writer


async def serve(policy: Policy, config_arg: str | None) -> int:
    config = policy.config
    config.certs_dir.mkdir(parents=True, exist_ok=True)
    ca_existed = (config.certs_dir / CA_CERT).exists()
    # `run --workers N`: this is worker i of N (see workers.py); None when single-process.
    worker = workers.worker_index()
    origin = config.audit.origin
    admin_addr = config.admin
    if worker is not None:
        workers.setup_child(worker)
        origin = workers.worker_origin(origin, worker)
        if admin_addr is not None:
            admin_addr = workers.worker_admin(admin_addr, worker)
    writer = open_audit(policy, origin)
    gate = Gate(policy=policy, audit=writer, metrics=METRICS)
    METRICS.set_catalog_version(policy.catalog.version)
    METRICS.open_connections.set(0)

    # The admin listener starts before mitmproxy's master exists: if its port is taken,
    # we fail before mitmproxy installs its log handler (bound to this event loop).
    admin = None
    if admin_addr is not None:
        from .admin import AdminServer

        def ready() -> dict[str, bool | str]:
            return {"catalog": gate.policy is not None, "audit": gate.audit.healthy}

        admin = AdminServer(admin_addr[0], admin_addr[1], METRICS.registry, ready)
        try:
            await admin.start()
        except OSError:
            await writer.close()
            raise
        log.info("admin listener on http://%s:%d (/healthz /readyz /metrics)",
                 admin_addr[0], admin.port)

    master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
    master.addons.add(ResidencyGate(gate))
    master.options.update(**mitmproxy_options(policy))

    reloader = Reloader(gate, config_arg, METRICS)
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
            f"residency-gate: created an interception CA in {config.certs_dir}.\n"
            f"  Clients must trust {config.certs_dir / CA_CERT} (e.g. SSL_CERT_FILE, "
            "AWS_CA_BUNDLE, NODE_EXTRA_CA_CERTS, or the OS trust store);\n"
            "  `residency-gate ca export` prints it (PEM/DER) and `residency-gate ca pac` "
            "writes a PAC file.",
            file=sys.stderr, flush=True,
        )
    if not run.done():
        log.info("residency-gate listening on %s:%d (mode %s), catalog %s, audit origin %s",
                 config.listen[0], config.listen[1], config.mode, policy.catalog.version,
                 origin)
        if worker is not None:
            if workers.listen_port_shared(master.addons.get("proxyserver").listen_addrs()):
                workers.notify_ready()
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


def _listening(master: DumpMaster) -> bool:
    proxyserver = master.addons.get("proxyserver")
    servers = getattr(proxyserver, "servers", None)
    try:
        return any(s.listen_addrs for s in servers)
    except Exception:
        return False


def run(policy: Policy, config_arg: str | None = None) -> int:
    setup_logging(policy.config.log_format, policy.config.log_level)
    try:
        # a worker child's loop binds its listeners with SO_REUSEPORT (workers.py)
        return asyncio.run(serve(policy, config_arg), loop_factory=workers.loop_factory())
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
