"""The out-of-process audit writer (ProcessAuditWriter): the writer semantics of
test_audit_writer.py, run against both implementations where they apply, plus what only
a separate process can get wrong (the child dying or hanging, the parent being killed,
two writers on one origin)."""

import asyncio
import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from audit_helpers import BOTH, ORIGIN, check, lines_of, run_writer
from residency_gate.audit.canonical import parse
from residency_gate.audit.chain import segment_name
from residency_gate.audit.writer import AuditError, AuditRecordError, AuditWriter
from residency_gate.audit.writer_process import ProcessAuditWriter

# Semantics shared with the thread writer are tested for both in test_audit_writer.py;
# here: what only the writer process has, and what is measured differently there.
PROCESS = pytest.mark.parametrize("cls", [ProcessAuditWriter], ids=["process"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# semantics measured here through the writer process's own counters


def test_thread_and_process_writers_continue_each_other(tmp_path, certs, key):
    d = tmp_path / "a"
    run_writer(AuditWriter, d, key, 2)
    run_writer(ProcessAuditWriter, d, key, 2)
    run_writer(AuditWriter, d, key, 2)
    objs = lines_of(d)
    assert [o["seq"] for o in objs] == list(range(len(objs)))
    assert [o["kind"] for o in objs].count("start") == 3
    assert check(d, certs).ok


@BOTH
def test_append_returns_only_once_durable(tmp_path, key, cls):
    """When append returns, the record is in the file and an fsync covered it."""
    d = tmp_path / "a"

    async def go():
        w = cls(d, key, ORIGIN, checkpoint_every=10_000)
        w.open()
        seg = d / segment_name(ORIGIN, 0)

        async def one(i):
            rec = await w.append("decision", {"n": i})
            on_disk = {parse(x)["seq"] for x in seg.read_bytes().splitlines()}
            assert rec["seq"] in on_disk
            assert w.stats.fsyncs >= 1

        await asyncio.gather(*(one(i) for i in range(300)))
        stats = w.stats.as_dict()
        await w.close()
        return stats

    stats = asyncio.run(go())
    assert stats["records_written"] >= 301
    assert stats["fsyncs"] < 150  # group commit: far fewer fsyncs than records
    assert stats["max_batch_size"] > 1


@PROCESS
def test_fsync_always_syncs_every_record(tmp_path, key, cls):
    async def go():
        w = cls(tmp_path / "a", key, ORIGIN, fsync="always", checkpoint_every=10_000)
        w.open()
        n0 = w.stats.fsyncs
        await asyncio.gather(*(w.append("x", {"n": i}) for i in range(20)))
        n = w.stats.fsyncs - n0
        await w.close()
        return n

    assert asyncio.run(go()) >= 20


@PROCESS
def test_time_checkpoint_when_idle(tmp_path, certs, key, cls):
    d = tmp_path / "a"

    async def go():
        w = cls(d, key, ORIGIN, rotate_seconds=0.05, checkpoint_seconds=0.05,
                checkpoint_every=10_000)
        w.open()
        await w.append("x", {})
        await asyncio.sleep(0.3)  # idle: the timer writes a checkpoint
        await w.append("x", {})  # the stats of the idle checkpoint come with this ack
        cps = w.stats.checkpoints
        await w.close()
        return cps, w

    cps, w = asyncio.run(go())
    assert cps >= 1
    assert w.stats.rotations == 1
    assert check(d, certs).ok


# ---------------------------------------------------------------------------
# failures: fail closed, for good, loudly


def _failed_writer_checks(w, caplog, results):
    assert all(isinstance(r, AuditError) for r in results), results
    assert not w.healthy and w.stats.write_failures >= 1
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


FAULTS = Path(__file__).parent / "faults"  # its sitecustomize.py breaks fsync or write


def inject(monkeypatch, fault: str, arm: Path) -> None:
    """The next writer process fails as ``fault`` says once ``arm`` exists."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("RESIDENCY_GATE_TEST_FAULT", fault)
    monkeypatch.setenv("RESIDENCY_GATE_TEST_FAULT_ARM", str(arm))


@pytest.mark.parametrize("fault", ["fsync", "write"])
def test_child_write_or_fsync_failure_fails_permanently(tmp_path, certs, key, fault, caplog,
                                                         monkeypatch):
    d = tmp_path / "a"
    arm = tmp_path / "fault-now"
    inject(monkeypatch, fault, arm)

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        ok = await w.append("decision", {"n": 0})
        assert w.healthy
        arm.touch()  # from now on the writer process's disk fails
        results = await asyncio.gather(*(w.append("decision", {"n": i}) for i in range(5)),
                                       return_exceptions=True)
        _failed_writer_checks(w, caplog, results)
        with pytest.raises(AuditError, match="failed earlier"):
            await w.append("decision", {"n": 9})
        pid = w.pid
        await w.close()
        assert not alive(pid)
        return ok

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        ok = asyncio.run(go())
    # nothing after the failure was acknowledged; what was acknowledged is on disk
    objs = lines_of(d)
    assert ok["seq"] in {o["seq"] for o in objs}
    rep = check(d, certs)
    assert rep.origins[ORIGIN].vouched[0][0] == 0


def test_garbage_from_child_fails_closed(tmp_path, key, caplog, monkeypatch):
    arm = tmp_path / "fault-now"
    inject(monkeypatch, "garbage", arm)

    async def go():
        w = ProcessAuditWriter(tmp_path / "a", key, ORIGIN)
        w.open()
        await w.append("decision", {"n": 0})
        arm.touch()
        results = await asyncio.gather(*(w.append("decision", {"n": i}) for i in range(3)),
                                       return_exceptions=True)
        _failed_writer_checks(w, caplog, results)
        assert "garbage" in str(w.failure)
        await w.close()

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        asyncio.run(go())


def test_child_killed_fails_closed(tmp_path, certs, key, caplog):
    d = tmp_path / "a"

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        await w.append("decision", {"n": 0})
        os.kill(w.pid, signal.SIGKILL)
        # in flight when it died, and after: all refused, none acknowledged
        results = await asyncio.gather(*(w.append("decision", {"n": i}) for i in range(5)),
                                       return_exceptions=True)
        _failed_writer_checks(w, caplog, results)
        assert "died" in str(w.failure)
        with pytest.raises(AuditError):
            await w.append("decision", {})
        await w.close()  # does not raise: it was failed already

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        asyncio.run(go())


def test_child_dies_while_idle_marks_unhealthy(tmp_path, key, caplog):
    async def go():
        w = ProcessAuditWriter(tmp_path / "a", key, ORIGIN)
        w.open()
        await w.append("decision", {})
        os.kill(w.pid, signal.SIGKILL)
        for _ in range(200):  # the EOF alone tells the proxy, without any append
            if not w.healthy:
                break
            await asyncio.sleep(0.01)
        assert not w.healthy
        await w.close()

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        asyncio.run(go())
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


def test_hung_child_times_out_and_fails_closed(tmp_path, key, caplog):
    async def go():
        w = ProcessAuditWriter(tmp_path / "a", key, ORIGIN, ack_timeout=0.5)
        w.open()
        await w.append("decision", {})
        pid = w.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(AuditError, match="did not acknowledge"):
                await w.append("decision", {})
            assert 0.4 < time.monotonic() - t0 < 5
            assert not w.healthy
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
        await w.close()
        return pid

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        pid = asyncio.run(go())
    assert not alive(pid)  # the hung writer was killed, not left holding the log
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


def test_open_failure_raises_audit_error(tmp_path, key):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    w = ProcessAuditWriter(blocker / "audit", key, ORIGIN)
    with pytest.raises(AuditError):
        w.open()
    assert not w.healthy


# ---------------------------------------------------------------------------
# the parent process dies


PARENT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from residency_gate.audit.keys import load_or_create_signing_key
    from residency_gate.audit.writer_process import ProcessAuditWriter

    async def main():
        w = ProcessAuditWriter(Path(sys.argv[1]), load_or_create_signing_key(Path(sys.argv[2])),
                               "gw-1")
        w.open()
        print(w.pid, flush=True)
        n = 0
        while True:
            recs = await asyncio.gather(*(w.append("decision", {"n": n + i}) for i in range(20)))
            n += 20
            print(" ".join(r["id"] for r in recs), flush=True)

    asyncio.run(main())
""")


def test_parent_sigkill_child_flushes_and_exits_then_restart_verifies(tmp_path, certs, key):
    d = tmp_path / "a"
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(d), str(certs)],
                            stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        acked = []
        while len(acked) < 200:
            acked += proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child), "the writer process outlived the proxy"
    objs = lines_of(d)
    # it finished cleanly on EOF: everything it received, then a final checkpoint
    assert objs[-1]["kind"] == "checkpoint"
    ids = {o.get("id") for o in objs}
    assert set(acked) <= ids
    # a new writer continues the chain
    run_writer(ProcessAuditWriter, d, key, 2)
    objs = lines_of(d)
    assert [o["seq"] for o in objs] == list(range(len(objs)))
    rep = check(d, certs)
    assert rep.ok and not rep.problems


def test_one_writer_per_origin_successor_waits(tmp_path, certs, key, caplog):
    """A restarted proxy's writer waits for its predecessor (still flushing) to let go."""
    d = tmp_path / "a"
    first = ProcessAuditWriter(d, key, ORIGIN)
    first.open()

    async def append_some(w, n):
        return [await w.append("x", {"n": i}) for i in range(n)]

    asyncio.run(append_some(first, 3))
    second = ProcessAuditWriter(d, key, ORIGIN, start_timeout=30)
    t0 = time.monotonic()
    import threading
    closer = threading.Timer(0.5, first.close_sync)
    closer.start()
    with caplog.at_level("WARNING", logger="residency_gate.audit"):
        second.open()  # blocks until the first one is closed
    closer.join()
    assert time.monotonic() - t0 >= 0.4
    assert any("in use by another writer" in r.getMessage() for r in caplog.records)
    asyncio.run(append_some(second, 2))
    second.close_sync()
    objs = lines_of(d)
    assert [o["seq"] for o in objs] == list(range(len(objs)))
    assert check(d, certs).ok


def test_second_writer_times_out_while_first_holds_the_origin(tmp_path, key):
    d = tmp_path / "a"
    first = ProcessAuditWriter(d, key, ORIGIN)
    first.open()
    try:
        second = ProcessAuditWriter(d, key, ORIGIN, start_timeout=1)
        with pytest.raises(AuditError, match="another audit writer"):
            second.open()
    finally:
        first.close_sync()


def test_child_ignores_terminal_signals(tmp_path, certs, key):
    """Ctrl-C / a service manager signals the whole process group: the writer keeps going
    until the proxy closes it."""
    d = tmp_path / "a"

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        await w.append("x", {})
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(w.pid, sig)
        await asyncio.sleep(0.1)
        await w.append("x", {})
        assert w.healthy
        await w.close()

    asyncio.run(go())
    assert check(d, certs).ok


def spy_writes(monkeypatch) -> list[bytes]:
    """What the proxy writes to the writer process, one item per StreamWriter.write."""
    writes: list[bytes] = []
    real = asyncio.StreamWriter.write

    def write(self, data):
        writes.append(bytes(data))
        return real(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", write)
    return writes


def test_many_appends_from_one_loop_iteration_are_one_frame_batch(tmp_path, certs, key,
                                                                  monkeypatch):
    d = tmp_path / "a"
    writes = spy_writes(monkeypatch)

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN, checkpoint_every=100_000)
        w.open()
        recs = await asyncio.gather(*(w.append("decision", {"n": i}) for i in range(500)))
        n = len(writes)
        await w.close()
        return recs, n

    recs, n = asyncio.run(go())
    assert [r["seq"] for r in recs] == list(range(1, 501))
    assert n == 1  # one write (one send()) for the whole loop iteration
    assert check(d, certs).ok


def test_logs_of_child_go_through_proxy_logging(tmp_path, key, caplog):
    with caplog.at_level(logging.INFO, logger="residency_gate.audit"):
        run_writer(ProcessAuditWriter, tmp_path / "a", key, 1)
        # a second start over a log torn by hand: the child's warning is logged here
        seg = tmp_path / "a" / segment_name(ORIGIN, 0)
        seg.write_bytes(seg.read_bytes()[:-5])
        run_writer(ProcessAuditWriter, tmp_path / "a", key, 1)
    assert any(r.name == "residency_gate.audit" and "torn" in r.getMessage()
               for r in caplog.records)


def test_outcome_records_ride_along_or_go_out_after_a_short_delay(tmp_path, certs, key,
                                                                  monkeypatch):
    d = tmp_path / "a"
    writes = spy_writes(monkeypatch)

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        t0 = time.monotonic()
        alone = await w.append("outcome", {"decision_id": "x"})  # nothing else comes: timer
        assert time.monotonic() - t0 < 1
        n0 = len(writes)
        out = asyncio.ensure_future(w.append("outcome", {"decision_id": "y"}))
        await asyncio.sleep(0)  # the outcome waits ...
        assert len(writes) == n0
        dec = await w.append("decision", {"n": 1})  # ... and goes with the next decision
        rec = await out
        await w.close()
        return alone, rec, dec, writes[n0:]

    alone, rec, dec, sends = asyncio.run(go())
    assert sends[0].count(b"outcome") == 1  # the outcome was in the decision's send
    assert alone["kind"] == rec["kind"] == "outcome" and rec["seq"] < dec["seq"]
    assert check(d, certs).ok


# ---------------------------------------------------------------------------
# fire-and-forget appends (the proxy's outcome records)


@BOTH
def test_append_nowait_is_a_future_of_the_durable_record(tmp_path, certs, key, cls):
    """No task, no coroutine: the record is queued at the call; its future resolves once
    it is durable, in order with awaited appends; what cannot be queued raises at once."""
    d = tmp_path / "a"

    async def go():
        w = cls(d, key, ORIGIN)
        w.open()
        tasks = len(asyncio.all_tasks())
        futs = [w.append_nowait("outcome", {"decision_id": f"x:{i}"}) for i in range(20)]
        assert all(isinstance(f, asyncio.Future) for f in futs)
        assert len(asyncio.all_tasks()) <= tasks + 3  # the writer's own, not one per record
        with pytest.raises(AuditRecordError):
            w.append_nowait("outcome", {"seq": 1})
        with pytest.raises(AuditRecordError):
            w.append_nowait("", {})
        dec = await w.append("decision", {"n": 1})
        outs = await asyncio.gather(*futs)
        await w.close()
        with pytest.raises(AuditError):
            w.append_nowait("outcome", {"decision_id": "late"})
        return outs, dec

    outs, dec = asyncio.run(go())
    assert [o["seq"] for o in outs] == list(range(1, 21)) and dec["seq"] == 21
    assert [o["decision_id"] for o in outs] == [f"x:{i}" for i in range(20)]
    assert [x["kind"] for x in lines_of(d)][1:22] == ["outcome"] * 20 + ["decision"]
    assert check(d, certs).ok


def test_append_nowait_before_the_first_await_is_sent_once_connected(tmp_path, certs, key):
    """The first record on a new event loop is queued while the stream connects."""
    d = tmp_path / "a"

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        fut = w.append_nowait("outcome", {"decision_id": "first"})
        rec = await asyncio.wait_for(fut, 5)
        await w.close()
        return rec

    assert asyncio.run(go())["seq"] == 1
    assert check(d, certs).ok


def test_append_nowait_fails_its_future_when_the_child_dies(tmp_path, key, caplog):
    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN)
        w.open()
        await w.append("decision", {"n": 0})
        os.kill(w.pid, signal.SIGKILL)
        fut = w.append_nowait("outcome", {"decision_id": "x"})
        with pytest.raises(AuditError):
            await asyncio.wait_for(fut, 10)
        assert not w.healthy
        await w.close()

    d = tmp_path / "a"
    with caplog.at_level(logging.CRITICAL):
        asyncio.run(go())


def test_child_reads_frames_split_anywhere(tmp_path):
    """The writer process reads what the socket holds at once and splits it into
    messages; a message cut anywhere (header included) waits for its rest."""
    import marshal
    import socket
    from multiprocessing.connection import Connection

    from residency_gate.audit.writer_child import _Child

    parent, child_end = socket.socketpair()
    child = _Child(Connection(child_end.detach()))
    msgs = [("a", "decision", {"n": i, "s": "é" * i}) for i in range(50)]
    data = b"".join(len(p).to_bytes(4, "big") + p for p in map(marshal.dumps, msgs))
    got: list = []
    cuts = [0, 1, 3, 4, 5, 77, 200, 201, len(data) - 2, len(data)]
    for a, b in itertools.pairwise(cuts):
        parent.sendall(data[a:b])
        got += child.receive(0.05)
    assert got == msgs and not child.eof and not child.buf
    parent.sendall((10).to_bytes(4, "big") + b"abc")  # a cut message, then EOF
    parent.close()
    assert child.receive(0.5) == [] and child.eof
    bad_parent, bad_child = socket.socketpair()
    child = _Child(Connection(bad_child.detach()))
    bad_parent.sendall((-5).to_bytes(4, "big", signed=True))
    assert child.receive(0.5) == [] and child.eof  # a bad length is the end, as before
    bad_parent.close()
