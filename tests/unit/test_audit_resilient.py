"""ResilientAudit (audit/resilient.py) around the real writer process: a SIGKILLed
writer is replaced and the chain goes on intact; a failed write or fsync is final; a
writer that keeps dying is given up on."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from audit_helpers import ORIGIN, check, lines_of
from residency_gate.audit import resilient
from residency_gate.audit.resilient import ResilientAudit
from residency_gate.audit.writer import AuditError
from residency_gate.audit.writer_process import ProcessAuditWriter


async def until(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_killed_writer_is_replaced_and_nothing_acknowledged_is_lost(tmp_path, certs, key):
    d = tmp_path / "a"
    restarts: list[str] = []

    async def on_restart(reason: str) -> None:
        restarts.append(reason)
        await sink.append("config", {"reason": "writer_restart"})

    sink = ResilientAudit(lambda: ProcessAuditWriter(d, key, ORIGIN), 3, on_restart)

    async def go() -> list[dict]:
        sink.open()
        acked = [await sink.append("decision", {"n": i}) for i in range(3)]
        first = sink.writer.pid
        os.kill(first, signal.SIGKILL)
        # no append in flight: the sink notices by itself, refuses meanwhile, comes back
        await until(lambda: not sink.healthy)
        with pytest.raises(AuditError):
            await sink.append("decision", {"n": -1})
        await until(lambda: sink.healthy and restarts)
        assert sink.writer.pid != first and not sink.failed_for_good
        acked += [await sink.append("decision", {"n": i}) for i in range(3, 6)]
        # and again, with appends in flight: they fail (never acknowledged), then it recovers
        os.kill(sink.writer.pid, signal.SIGKILL)
        lost = await asyncio.gather(*(sink.append("decision", {"n": 100 + i}) for i in range(4)),
                                    return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in lost), lost
        await until(lambda: sink.healthy and len(restarts) == 2)
        acked.append(await sink.append("decision", {"n": 6}))
        await sink.close()
        return acked

    acked = asyncio.run(go())
    objs = lines_of(d)
    on_disk = {o["seq"]: o for o in objs}
    assert all(a["seq"] in on_disk and on_disk[a["seq"]]["sig"] == a["sig"] for a in acked)
    assert [o["kind"] for o in objs].count("start") == 3  # recovered as at start, twice
    assert [o.get("reason") for o in objs if o["kind"] == "config"] == ["writer_restart"] * 2
    assert all("died" in r for r in restarts), restarts
    report = check(d, certs)
    assert report.ok, report


def test_a_failed_fsync_is_final_and_healthz_can_tell(tmp_path, certs, key, monkeypatch):
    from test_audit_process import inject

    d = tmp_path / "a"
    arm = tmp_path / "fault-now"
    inject(monkeypatch, "fsync", arm)  # the writer process's fsync fails once `arm` exists
    sink = ResilientAudit(lambda: ProcessAuditWriter(d, key, ORIGIN), 5)

    async def go() -> None:
        sink.open()
        await sink.append("decision", {"n": 0})
        arm.touch()
        with pytest.raises(AuditError):
            await sink.append("decision", {"n": 1})
        await asyncio.sleep(resilient.POLL_SECONDS * 3)
        assert sink.failed_for_good and not sink.healthy and sink.restart_count == 0
        with pytest.raises(AuditError, match="for good"):
            await sink.append("decision", {"n": 2})
        await sink.close()

    asyncio.run(go())


def test_a_writer_that_keeps_dying_is_given_up_on(tmp_path, certs, key, monkeypatch):
    monkeypatch.setattr(resilient, "FIRST_BACKOFF", 0.05)
    d = tmp_path / "a"

    async def on_restart(reason: str) -> None:  # as the proxy does: binds the new writer
        await sink.append("config", {"reason": "writer_restart"})

    sink = ResilientAudit(lambda: ProcessAuditWriter(d, key, ORIGIN), 2, on_restart)

    async def go() -> None:
        sink.open()
        await sink.append("decision", {"n": 0})
        for _ in range(3):
            pid = sink.writer.pid
            os.kill(pid, signal.SIGKILL)
            await until(lambda pid=pid: sink.failed_for_good or (
                sink.healthy and sink.writer.pid != pid))
        assert sink.failed_for_good and sink.restart_count == 2
        await sink.close()

    asyncio.run(go())


def test_append_nowait_through_the_sink_and_its_restart(tmp_path, certs, key):
    """Fire-and-forget outcomes go through the sink; while the writer is being replaced
    they are refused at once (never forwarded to a dead writer), then accepted again."""
    d = tmp_path / "a"
    sink = ResilientAudit(lambda: ProcessAuditWriter(d, key, ORIGIN), 3)

    async def go() -> list[dict]:
        sink.open()
        done = [await sink.append_nowait("outcome", {"decision_id": "a"})]
        os.kill(sink.writer.pid, signal.SIGKILL)
        await until(lambda: not sink.healthy)
        with pytest.raises(AuditError):
            sink.append_nowait("outcome", {"decision_id": "b"})
        await until(lambda: sink.healthy)
        done.append(await sink.append_nowait("outcome", {"decision_id": "c"}))
        await sink.close()
        return done

    done = asyncio.run(go())
    on_disk = {o["seq"]: o for o in lines_of(d)}
    assert [on_disk[r["seq"]]["decision_id"] for r in done] == ["a", "c"]
    assert check(d, certs).ok
