"""`residency-gate run --workers N`: N proxy processes sharing one listen address.

One mitmproxy process uses one core. With N > 1 the `run` process becomes a
small supervisor: it checks the config once, creates the interception CA and
the audit key once (so the workers do not race to create them), then starts N
children, each ``residency-gate run`` again with ``RESIDENCY_GATE_WORKER=<i>``
(i = 0 .. N-1) in its environment. A worker child:

* listens on the *same* address as the others with ``SO_REUSEPORT``: the Linux
  kernel spreads incoming connections over the workers;
* writes its own audit chain, origin ``<audit.origin>-w<i>``, into the shared
  ``audit.dir`` (files are per origin);
* serves its admin listener on ``admin`` port + i (worker 0 on the configured
  port), so every worker's ``/metrics`` can be scraped;
* tells the supervisor through an inherited pipe when it is listening.

The supervisor forwards SIGTERM/SIGINT (clean stop: every child flushes its
audit log; the supervisor waits for them) and SIGHUP (every child reloads),
restarts a child that dies unexpectedly (with exponential backoff, logged), and
gives up -- stopping the others and exiting 1 -- when a child fails
``MAX_START_FAILURES`` times in a row before it is listening.

The single-worker path (``workers: 1``, the default) does not go through here.

What runs inside a worker process (SO_REUSEPORT, readiness) is in ``worker.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .worker import MAX_WORKERS, READY_FD_ENV, SUPERVISOR_PID_ENV, WORKER_ENV, worker_origin

log = logging.getLogger("residency_gate.workers")

MAX_START_FAILURES = 3  # in a row, before the child ever listened: give up
MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_SECONDS = 30.0  # a child that ran this long starts over at MIN_BACKOFF
STOP_TIMEOUT = 20.0  # SIGTERM -> SIGKILL for children that do not stop (systemd waits 30 s)


def preflight(config: Any, n: int) -> list[str]:
    """What makes N workers impossible with this config (empty: go ahead)."""
    from mitmproxy.proxy.mode_specs import ProxyMode

    problems = []
    if not 1 <= n <= MAX_WORKERS:
        problems.append(f"workers must be between 1 and {MAX_WORKERS}, not {n}")
        return problems
    try:
        transport = ProxyMode.parse(config.mode).transport_protocol
    except Exception as e:
        transport = f"invalid ({e})"
    if transport != "tcp":
        problems.append(
            f"mode {config.mode!r} listens on {transport}; --workers > 1 needs a TCP-only mode "
            "(regular, transparent, socks5, upstream:URL, reverse:tls/tcp://...)"
        )
    host, port = config.listen
    if port == 0:
        problems.append("listen port 0 (any free port) cannot be shared by workers; name a port")
    elif not hasattr(socket, "SO_REUSEPORT"):
        problems.append("SO_REUSEPORT is not available on this platform; run one process per "
                        "port behind HAProxy instead (docs/deploy.md)")
    else:
        # Without SO_REUSEPORT: fails when anything (also an older set of workers) listens there.
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
        except OSError as e:
            problems.append(f"cannot listen on {host}:{port}: {e.strerror or e}")
    if config.admin is not None and config.admin[1]:
        ahost, aport = config.admin
        last = aport + n - 1
        if last > 65535:
            problems.append(f"admin ports {aport}..{last} run past 65535")
        elif aport <= port <= last and ahost in (host, "0.0.0.0", "::", ""):
            problems.append(f"admin ports {aport}..{last} (one per worker) include the "
                            f"listen port {port}")
    return problems


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    started_at: float = 0.0
    ready: bool = False
    start_failures: int = 0
    backoff: float = MIN_BACKOFF
    restart_at: float | None = None
    hup_pending: bool = False  # SIGHUP arrived before the child could handle it
    exit_codes: list[int] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, config: Any, config_arg: str | None, n: int) -> None:
        self.config = config
        self.config_arg = config_arg
        self.children = [_Child(i) for i in range(n)]
        self.stopping: int | None = None  # the signal that asked us to stop
        self.hup = False
        self.all_ready_logged = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # signals -------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.stopping is None:
                self.stopping = signum
        elif signum == signal.SIGHUP:
            self.hup = True
        # SIGCHLD: only wakes the loop (through the wakeup fd)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    # children ------------------------------------------------------------

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "residency_gate", "run"]
        if self.config_arg:
            cmd += ["-c", self.config_arg]
        return cmd

    def _spawn(self, child: _Child) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        env = dict(os.environ)
        env[WORKER_ENV] = str(child.index)
        env[READY_FD_ENV] = str(w)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        try:
            child.proc = subprocess.Popen(
                self._command(), env=env, pass_fds=(w,), stdin=subprocess.DEVNULL)
        except OSError as e:
            os.close(r)
            log.error("worker %d: cannot start: %s", child.index, e)
            child.proc = None
            self._failed_start(child, time.monotonic())
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(w)
        child.ready_fd = r
        child.ready = False
        child.hup_pending = False  # it reads the current files as it starts
        child.started_at = time.monotonic()
        child.restart_at = None
        log.debug("worker %d: started, pid %d", child.index, child.proc.pid)

    def _close_ready_fd(self, child: _Child) -> None:
        if child.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(child.ready_fd)
            child.ready_fd = None

    def _read_ready(self, child: _Child) -> None:
        assert child.ready_fd is not None
        try:
            data = os.read(child.ready_fd, 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and not child.ready:
            child.ready = True
            child.start_failures = 0
            log.info("worker %d (pid %d) listening", child.index, child.proc.pid)
            if child.hup_pending:
                child.hup_pending = False
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGHUP)
        if not data:  # EOF: the child closed its end (ready, or gone)
            self._close_ready_fd(child)
        if not self.all_ready_logged and all(c.ready for c in self.children):
            self.all_ready_logged = True
            host, port = self.config.listen
            admin = ""
            if self.config.admin is not None:
                _, a_port = self.config.admin
                admin = (f"; admin ports {a_port}..{a_port + len(self.children) - 1}"
                         if a_port else "; admin on free ports")
            log.info("all %d workers listening on %s:%d (SO_REUSEPORT)%s; audit origins %s",
                     len(self.children), host, port, admin,
                     ", ".join(worker_origin(self.config.audit.origin, c.index)
                               for c in self.children))

    def _failed_start(self, child: _Child, now: float) -> bool:
        """Count a start failure; False when it is one too many."""
        child.start_failures += 1
        if child.start_failures >= MAX_START_FAILURES:
            log.critical("worker %d failed %d times in a row before listening; giving up",
                         child.index, child.start_failures)
            return False
        child.backoff = min(MIN_BACKOFF * 2 ** (child.start_failures - 1), MAX_BACKOFF)
        child.restart_at = now + child.backoff
        log.error("worker %d: restarting in %.1f s (start attempt %d of %d failed)",
                  child.index, child.backoff, child.start_failures, MAX_START_FAILURES)
        return True

    def _reap(self, child: _Child) -> bool:
        """Handle a child that exited; False when the supervisor must give up."""
        assert child.proc is not None
        code = child.proc.returncode
        pid = child.proc.pid
        child.exit_codes.append(code)
        if child.ready_fd is not None:  # a "ready" byte may still be in the pipe
            self._read_ready(child)
        self._close_ready_fd(child)
        child.proc = None
        now = time.monotonic()
        if not child.ready:
            log.error("worker %d (pid %d) exited before listening: %s",
                      child.index, pid, _describe_exit(code))
            return self._failed_start(child, now)
        uptime = now - child.started_at
        if uptime >= STABLE_SECONDS:
            child.backoff = MIN_BACKOFF
        delay = child.backoff
        child.backoff = min(child.backoff * 2, MAX_BACKOFF)  # if it dies again soon
        child.restart_at = now + delay
        child.ready = False
        self.all_ready_logged = False
        log.error("worker %d (pid %d) died unexpectedly after %.0f s: %s; restarting in %.1f s",
                  child.index, pid, uptime, _describe_exit(code), delay)
        return True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass

    def _wait(self, timeout: float) -> None:
        fds = [self._wake_r] + [c.ready_fd for c in self.children if c.ready_fd is not None]
        try:
            readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            return
        for fd in readable:
            if fd == self._wake_r:
                self._drain_wakeups()
                continue
            for c in self.children:
                if c.ready_fd == fd:
                    self._read_ready(c)

    def _forward(self, sig: int) -> None:
        for c in self.children:
            if not c.alive:
                continue
            if sig == signal.SIGHUP and not c.ready:
                # Its signal handlers may not be installed yet (SIGHUP would kill it):
                # deliver once it is listening.
                c.hup_pending = True
                continue
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(sig)  # type: ignore[union-attr]

    # main loop -----------------------------------------------------------

    def run(self) -> int:
        self._install_signals()  # again: idempotent, and run() may be called alone
        if self.stopping is not None:
            return 0
        for c in self.children:
            self._spawn(c)
        failed = any(c.start_failures >= MAX_START_FAILURES for c in self.children)
        while self.stopping is None and not failed:
            if self.hup:
                self.hup = False
                alive = [c for c in self.children if c.alive]
                log.info("SIGHUP: reloading config and catalog in %d workers", len(alive))
                self._forward(signal.SIGHUP)
            now = time.monotonic()
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None and not self._reap(c):
                    failed = True
            if failed:
                break
            for c in self.children:
                if c.proc is None and c.restart_at is not None and c.restart_at <= now:
                    self._spawn(c)
                    if c.start_failures >= MAX_START_FAILURES:
                        failed = True
            pending = [c.restart_at - now for c in self.children
                       if c.proc is None and c.restart_at is not None]
            self._wait(min([0.5, *pending]))
        return self._shutdown(failed)

    def _shutdown(self, failed: bool) -> int:
        sig = signal.SIGTERM
        if failed:
            log.critical("stopping the other workers")
        else:
            log.info("%s: stopping %d workers", signal.Signals(self.stopping).name,
                     sum(c.alive for c in self.children))
        self._forward(sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        clean = True
        for c in self.children:
            if c.proc is None:
                continue
            try:
                code = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within %.0f s; killing it",
                          c.index, c.proc.pid, STOP_TIMEOUT)
                c.proc.kill()
                code = c.proc.wait()
            if code == -signal.SIGTERM and not c.ready:
                pass  # stopped while starting, before it installed its handlers
            elif code != 0:
                clean = False
                log.error("worker %d (pid %d) stopped with %s",
                          c.index, c.proc.pid, _describe_exit(code))
            self._close_ready_fd(c)
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if failed:
            return 1
        log.info("all workers stopped%s", "" if clean else " (not all cleanly)")
        return 0 if clean else 1


def supervise(policy: Any, config_arg: str | None, n: int) -> int:
    """`residency-gate run --workers N` with N > 1."""
    from .logs import setup_logging

    config = policy.config
    setup_logging(config.log_format, config.log_level)
    supervisor = Supervisor(config, config_arg, n)
    supervisor._install_signals()  # a SIGHUP while starting must not kill us
    problems = preflight(config, n)
    if problems:
        for p in problems:
            log.error("cannot start %d workers: %s", n, p)
        return 1
    # Create the CA and the audit key once, before the workers start in parallel.
    try:
        from ..audit.keys import load_or_create_signing_key
        from .ca import load_or_create_ca

        config.certs_dir.mkdir(parents=True, exist_ok=True)
        load_or_create_ca(config.certs_dir, config.ca)
        load_or_create_signing_key(config.certs_dir)
    except Exception as e:
        log.error("cannot start: %s", e)
        return 1
    log.info("starting %d workers on %s:%d", n, *config.listen)
    return supervisor.run()
