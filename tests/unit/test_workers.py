"""The `--workers N` pieces without a real proxy: the SO_REUSEPORT loop and probe, the
supervisor's restart / give-up / signal forwarding (with tiny fake children),
preflight checks and the config key."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from residency_gate.catalog.config import load_config
from residency_gate.catalog.source import InvalidSource
from residency_gate.ops import worker, workers


async def _handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.close()


def _reuseport(server: asyncio.Server) -> bool:
    return all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in server.sockets)


def test_worker_loop_shares_listen_ports_and_the_probe_sees_it() -> None:
    """On a worker's loop, mitmproxy's way of listening (asyncio.start_server) shares the
    port; an explicit reuse_port=False (the admin listener) does not; the probe tells them
    apart. asyncio itself is not patched."""

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), worker.ReusePortLoop)
        first = await asyncio.start_server(_handler, "127.0.0.1", 0)
        addr = first.sockets[0].getsockname()
        second = await asyncio.start_server(_handler, "127.0.0.1", addr[1])
        assert _reuseport(first) and _reuseport(second)
        assert worker.listen_port_shared([addr])
        with pytest.raises(OSError):  # a listener like the admin one cannot share it
            await asyncio.start_server(_handler, "127.0.0.1", addr[1], reuse_port=False)
        plain = await asyncio.start_server(_handler, "127.0.0.1", 0, reuse_port=False)
        assert not _reuseport(plain)
        assert not worker.listen_port_shared([addr, plain.sockets[0].getsockname()])
        assert not worker.listen_port_shared([])
        # the probe took no share: every connection still reaches a listener
        for _ in range(20):
            _, w = await asyncio.open_connection(*addr)
            w.close()
        for s in (first, second, plain):
            s.close()
            await s.wait_closed()

    asyncio.run(main(), loop_factory=worker.ReusePortLoop)
    assert asyncio.start_server.__module__ == "asyncio.streams"


def test_default_loop_does_not_share_ports() -> None:
    async def main() -> None:
        first = await asyncio.start_server(_handler, "127.0.0.1", 0)
        addr = first.sockets[0].getsockname()
        assert not _reuseport(first)
        assert not worker.listen_port_shared([addr])
        first.close()
        await first.wait_closed()

    asyncio.run(main())


def test_loop_factory_only_in_a_worker_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(worker.WORKER_ENV, raising=False)
    assert worker.loop_factory() is None
    monkeypatch.setenv(worker.WORKER_ENV, "1")
    assert worker.loop_factory() is worker.ReusePortLoop


def test_admin_listener_never_shares_its_port_on_a_worker_loop() -> None:
    from prometheus_client import CollectorRegistry

    from residency_gate.ops.admin import AdminServer

    async def main() -> None:
        async with AdminServer("127.0.0.1", 0, CollectorRegistry(), dict) as first:
            with pytest.raises(OSError):
                await AdminServer("127.0.0.1", first.port, CollectorRegistry(), dict).start()

    asyncio.run(main(), loop_factory=worker.ReusePortLoop)


def test_worker_env_origin_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(worker.WORKER_ENV, raising=False)
    assert worker.worker_index() is None
    monkeypatch.setenv(worker.WORKER_ENV, "3")
    assert worker.worker_index() == 3
    monkeypatch.setenv(worker.WORKER_ENV, "x")
    with pytest.raises(ValueError):
        worker.worker_index()
    assert worker.worker_origin("gw-8080", 1) == "gw-8080-w1"
    assert worker.worker_admin(("127.0.0.1", 9464), 2) == ("127.0.0.1", 9466)
    assert worker.worker_admin(("127.0.0.1", 0), 2) == ("127.0.0.1", 0)


def test_config_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("workers: 4\n")
    assert load_config(path).workers == 4
    path.write_text("{}\n")
    assert load_config(path).workers == 1
    path.write_text("workers: 0\n")
    with pytest.raises(InvalidSource):
        load_config(path)


def _config(port: int, mode: str = "regular", admin: tuple[str, int] | None = None):
    return SimpleNamespace(listen=("127.0.0.1", port), mode=mode, admin=admin,
                           audit=SimpleNamespace(origin="t"))


def test_preflight() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        problems = workers.preflight(_config(busy), 2)
        assert len(problems) == 1 and "cannot listen" in problems[0]
    assert workers.preflight(_config(busy), 2) == []
    assert "port 0" in workers.preflight(_config(0), 2)[0]
    assert "udp" in workers.preflight(_config(busy, mode="wireguard"), 2)[0]
    assert "include the listen port" in workers.preflight(
        _config(busy, admin=("127.0.0.1", busy - 1)), 3)[0]


# ---------------------------------------------------------------------------
# the supervisor with fake children

FAKE_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    i = int(os.environ["RESIDENCY_GATE_WORKER"])
    state = Path(sys.argv[1])
    mode = sys.argv[2]
    if mode == "fail":
        sys.exit(3)
    signal.signal(signal.SIGHUP, lambda *a: (state / f"hup{i}").open("a").write("x"))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    fd = int(os.environ["RESIDENCY_GATE_READY_FD"])
    os.write(fd, b"1"); os.close(fd)
    (state / f"pid{i}-{os.getpid()}").touch()
    if i == 1 and not (state / "crashed").exists():
        (state / "crashed").touch()
        time.sleep(0.2)
        os._exit(7)
    while True:
        time.sleep(0.05)
""")


class FakeSupervisor(workers.Supervisor):
    def __init__(self, state: Path, mode: str, n: int) -> None:
        super().__init__(_config(1), None, n)
        self.state = state
        self.mode = mode

    def _command(self) -> list[str]:
        return [sys.executable, "-c", FAKE_CHILD, str(self.state), self.mode]


@pytest.fixture
def keep_signals():
    saved = {s: signal.getsignal(s) for s in
             (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
    yield
    signal.set_wakeup_fd(-1)
    for s, h in saved.items():
        signal.signal(s, h)


def test_supervisor_gives_up_when_children_fail_at_start(
    tmp_path: Path, keep_signals: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "residency_gate.workers")
    t0 = time.monotonic()
    assert FakeSupervisor(tmp_path, "fail", 2).run() == 1
    assert time.monotonic() - t0 < 8
    text = caplog.text
    assert text.count("exited before listening: exit code 3") >= workers.MAX_START_FAILURES
    assert "failed 3 times in a row before listening; giving up" in text


def test_supervisor_restarts_forwards_hup_and_stops(
    tmp_path: Path, keep_signals: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "residency_gate.workers")
    sup = FakeSupervisor(tmp_path, "ok", 2)
    result: list[int] = []
    problems: list[str] = []

    def wait(cond, what: str) -> bool:
        deadline = time.monotonic() + 15
        while not cond():
            if time.monotonic() > deadline:
                problems.append(what)
                return False
            time.sleep(0.05)
        return True

    def drive() -> None:
        # worker 1 crashes once after listening, then is restarted: 3 pid files in all
        if wait(lambda: len(list(tmp_path.glob("pid*"))) == 3
                and all(c.ready for c in sup.children), "no restart"):
            os.kill(os.getpid(), signal.SIGHUP)
            wait(lambda: (tmp_path / "hup0").exists() and (tmp_path / "hup1").exists(),
                 "SIGHUP not forwarded")
        os.kill(os.getpid(), signal.SIGTERM)  # always: run() must return

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    result.append(sup.run())
    t.join(5)
    assert problems == []
    assert result == [0]
    assert all(c.proc.poll() is not None for c in sup.children if c.proc)
    text = caplog.text
    assert "worker 1" in text and "died unexpectedly" in text and "exit code 7" in text
    assert "restarting in 0.5 s" in text
    assert "SIGTERM: stopping 2 workers" in text and "all workers stopped" in text
    assert len(list(tmp_path.glob("pid1-*"))) == 2 and len(list(tmp_path.glob("pid0-*"))) == 1
