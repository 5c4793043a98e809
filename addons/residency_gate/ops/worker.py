"""Inside a `--workers N` child: its index, origin, admin port, and a shared listen port.

How a worker gets SO_REUSEPORT without touching mitmproxy: mitmproxy 12 has no option
for it and opens its TCP listeners with ``asyncio.start_server``, i.e. with the running
loop's ``create_server``. So a worker child runs on ``ReusePortLoop`` (through the public
``asyncio.run(..., loop_factory=...)``), an event loop whose ``create_server`` defaults
to ``reuse_port=True``; an explicit value is kept, and the admin listener passes
``reuse_port=False`` (its port is per worker, never shared). That mitmproxy opens its
listeners this way is not an API promise, so once listening the worker *checks* that its
listen port is shared (``listen_port_shared``: a probe socket with SO_REUSEPORT can bind
to an address in use only if the listener there has SO_REUSEPORT too) and stops if not.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("residency_gate.workers")

WORKER_ENV = "RESIDENCY_GATE_WORKER"
READY_FD_ENV = "RESIDENCY_GATE_READY_FD"
SUPERVISOR_PID_ENV = "RESIDENCY_GATE_SUPERVISOR_PID"
MAX_WORKERS = 256




def worker_index() -> int | None:
    """This process's worker index, or None when it is not a worker child."""
    raw = os.environ.get(WORKER_ENV)
    if raw is None or raw == "":
        return None
    try:
        index = int(raw)
    except ValueError:
        raise ValueError(f"{WORKER_ENV}={raw!r} is not a worker index") from None
    if not 0 <= index < MAX_WORKERS:
        raise ValueError(f"{WORKER_ENV}={raw!r} is out of range")
    return index


def worker_origin(origin: str, index: int) -> str:
    return f"{origin}-w{index}"


def worker_admin(admin: tuple[str, int], index: int) -> tuple[str, int]:
    host, port = admin
    return host, (port + index if port else 0)


class ReusePortLoop(asyncio.SelectorEventLoop):
    """A worker child's event loop: listening sockets default to SO_REUSEPORT."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("reuse_port", True)  # an explicit reuse_port= is kept
        return await super().create_server(*args, **kwargs)


def loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    """For ``asyncio.run(loop_factory=)``: ReusePortLoop in a worker child, else None
    (asyncio's default loop)."""
    if worker_index() is None:
        return None
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError(errno.ENOTSUP, "SO_REUSEPORT is not available on this platform")
    return ReusePortLoop


def listen_port_shared(addrs: Iterable[tuple[Any, ...]]) -> bool:
    """True when every listening socket on these addresses has SO_REUSEPORT.

    Probe: a socket with SO_REUSEPORT can bind to an address in use only when every
    socket bound there has SO_REUSEPORT too (and the same user). The probe never listens
    (so it never takes a connection) and is closed at once.
    """
    addrs = list(addrs)
    for addr in addrs:
        family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # like asyncio's listener: IPv6 only
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(addr)
            except OSError:
                return False
    return bool(addrs)


def setup_child(index: int) -> None:
    """In worker i: name it in every log line; die with the supervisor (Linux)."""
    tag_logs(index)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
        except Exception:  # pragma: no cover
            log.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)
        parent = os.environ.get(SUPERVISOR_PID_ENV)
        if parent and os.getppid() != int(parent):  # it died before prctl
            log.critical("the supervisor (pid %s) is gone; not starting", parent)
            raise SystemExit(1)


def tag_logs(index: int) -> None:
    """Every log line of worker i names it (`residency_gate/w1`)."""

    def add_worker(record: logging.LogRecord) -> bool:
        if not record.name.endswith(f"/w{index}"):
            record.name = f"{record.name}/w{index}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_worker)


def notify_ready() -> None:
    """Tell the supervisor that this worker is listening (once)."""
    raw = os.environ.pop(READY_FD_ENV, None)
    if not raw:
        return
    try:
        fd = int(raw)
        os.write(fd, b"1")
        os.close(fd)
    except (ValueError, OSError) as e:
        log.warning("cannot tell the supervisor that this worker is ready: %s", e)


