"""Fail closed on the audit trail, at unit level: the real addon, a real AuditWriter whose
fsync (or write) starts failing, flows driven with mitmproxy's test helpers.

A request is forwarded by mitmproxy unless the `request` hook leaves a response on the
flow; so "nothing forwarded" here is: the hook answered it (503) itself.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons, tflow, tutils

from helpers import policy_from
from residency_gate.audit import segment_file as writer_mod
from residency_gate.audit.keys import load_or_create_signing_key
from residency_gate.audit.verify import verify
from residency_gate.audit.writer import AuditWriter
from residency_gate.proxy.addon import ResidencyGate
from residency_gate.proxy.interface import Gate

BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


def chat_flow(tag: str | None = None):
    headers = [(b"host", b"api.openai.com"), (b"content-type", b"application/json"),
               (b"authorization", b"Bearer sk-unit"), (b"content-length", str(len(BODY)).encode())]
    if tag:
        headers.append((b"x-data-residency", tag.encode()))
    req = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                      authority=b"", path=b"/v1/chat/completions", content=BODY)
    req.headers.clear()
    for k, v in headers:
        req.headers.add(k.decode(), v.decode())
    f = tflow.tflow(req=req)
    f.client_conn.sni = "api.openai.com"
    return f


async def call(hook: Any, *args: Any) -> None:
    result = hook(*args)
    if inspect.isawaitable(result):
        await result


async def drive(addon: ResidencyGate, f) -> None:
    """requestheaders + request, as mitmproxy calls them."""
    await call(addon.requestheaders, f)
    await call(addon.request, f)


@pytest.fixture
def policy(tmp_path: Path):
    return policy_from(tmp_path)


@pytest.fixture
def key(tmp_path: Path):
    return load_or_create_signing_key(tmp_path / "certs")


def open_writer(tmp_path: Path, key) -> AuditWriter:
    w = AuditWriter(tmp_path / "audit", key, "unit-gw")
    w.open()
    return w


def run(coro_fn):
    async def go():
        with taddons.context():
            return await coro_fn()
    return asyncio.run(go())


def test_healthy_writer_forwards_and_audits(tmp_path: Path, policy, key) -> None:
    """The control: with a working writer the same flow is left to be forwarded."""
    w = open_writer(tmp_path, key)
    addon = ResidencyGate(Gate(bundle=policy, audit=w))

    async def go():
        f = chat_flow()
        await drive(addon, f)
        blocked = chat_flow("eu")
        await drive(addon, blocked)
        await w.close()
        return f, blocked

    f, blocked = run(go)
    assert f.response is None, "an allowed request was answered instead of forwarded"
    assert blocked.response is not None and blocked.response.status_code == 451
    rep = verify([tmp_path / "audit"], {key.key_id: key.public}, None, collect_records=True)
    assert rep.ok
    decisions = [r for _f, _n, r in rep.records if r["kind"] == "decision"]
    assert [d["decision"] for d in decisions] == ["allow", "block"]
    assert blocked.response.headers["X-Residency-Audit-Id"] == decisions[1]["id"]


@pytest.mark.parametrize("fault", ["fsync", "write"])
def test_write_failure_refuses_with_503_for_good(tmp_path: Path, policy, key, monkeypatch,
                                                 fault: str) -> None:
    w = open_writer(tmp_path, key)
    addon = ResidencyGate(Gate(bundle=policy, audit=w))
    seg = w.current_file
    size_before = seg.stat().st_size
    calls = {"n": 0}

    def broken(*_a: Any, **_k: Any):
        calls["n"] += 1
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(writer_mod.os, fault, broken)

    async def go():
        first = chat_flow()
        await drive(addon, first)
        monkeypatch.undo()  # the disk "recovers": a later fsync would succeed
        later = [chat_flow(), chat_flow("eu"), chat_flow("atlantis")]
        for f in later:
            await drive(addon, f)
        # the response and error hooks must not try to write (or crash) either
        for f in [first, *later]:
            await call(addon.response, f)
        await w.close()
        return first, later

    first, later = run(go)
    assert calls["n"] >= 1, "the injected fault was never hit"
    assert not w.healthy and w.stats.write_failures == 1
    for f in (first, *later):
        assert f.response is not None, "a request was left to be forwarded"
        assert f.response.status_code == 503, f.response.status_code
        body = f.response.get_text()
        assert "audit" in body.lower(), body
        assert f.response.headers.get("X-Residency-Decision") != "allow"
        assert "X-Residency-Audit-Id" not in f.response.headers
    if fault == "fsync":  # the bytes reached the file but were never acknowledged
        data = seg.read_bytes()[size_before:]
        assert data.count(b"\n") <= 1
    else:
        assert seg.stat().st_size == size_before


class RaisingSink:
    """An audit sink that says it is healthy but whose append fails (e.g. a full disk)."""

    healthy = True

    def __init__(self) -> None:
        self.calls = 0

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        raise OSError(errno.ENOSPC, "No space left on device")


class UnhealthySink:
    healthy = False

    def __init__(self) -> None:
        self.calls = 0

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        raise AssertionError("append called on an unhealthy sink")


@pytest.mark.parametrize("sink_cls", [RaisingSink, UnhealthySink])
def test_any_audit_failure_refuses(policy, sink_cls) -> None:
    sink = sink_cls()
    addon = ResidencyGate(Gate(bundle=policy, audit=sink))

    async def go():
        flows = [chat_flow(), chat_flow("eu")]
        for f in flows:
            await drive(addon, f)
        return flows

    flows = run(go)
    for f in flows:
        assert f.response is not None and f.response.status_code == 503
    if sink_cls is UnhealthySink:
        assert sink.calls == 0, "an unhealthy writer was still asked to append"
    else:
        assert sink.calls >= 2


def test_non_llm_traffic_unaffected_by_audit_failure(policy) -> None:
    """Only LLM traffic stops: other hosts are not decided, audited or refused."""
    addon = ResidencyGate(Gate(bundle=policy, audit=UnhealthySink()))
    f = tflow.tflow(req=tutils.treq(host="example.org", port=443, scheme=b"https",
                                    authority=b"", path=b"/"))
    f.request.headers["host"] = "example.org"
    f.client_conn.sni = "example.org"
    run(lambda: drive(addon, f))
    assert f.response is None


class HangingSink:
    """An audit sink whose writes never complete (a stuck disk)."""

    healthy = True

    def __init__(self) -> None:
        self.calls = 0

    async def append(self, kind: str, fields: dict) -> dict:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_stuck_audit_write_refuses_within_the_decision_timeout(tmp_path: Path) -> None:
    """limits.decision_timeout_seconds bounds the whole decision, refusal included:
    the client gets an answer, nothing is forwarded, even if the audit never returns."""
    policy = policy_from(tmp_path, {"limits": {"decision_timeout_seconds": 0.2}})
    sink = HangingSink()
    addon = ResidencyGate(Gate(bundle=policy, audit=sink))
    f = chat_flow()

    async def go():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(drive(addon, f), 5)
        return loop.time() - t0

    elapsed = run(go)
    assert f.response is not None and f.response.status_code == 503
    assert f.response.headers["X-Residency-Decision"] == "block"
    assert elapsed < 1.5
    assert sink.calls >= 1


class OutcomeFailsSink:
    """Decisions are written; the outcome's future fails (the disk filled in between)."""

    healthy = True

    def __init__(self) -> None:
        self.outcomes = 0

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        return {"id": "d-1"}

    def append_nowait(self, kind: str, fields: dict[str, Any]) -> asyncio.Future:
        self.outcomes += 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        return fut


def test_outcome_records_are_written_without_waiting_and_counted(tmp_path: Path, policy,
                                                                 key) -> None:
    """The outcome goes to the writer as a future (no task per request); once durable
    it is in the chain and counted in residency_gate_audit_records_total."""
    from residency_gate.ops.metrics import Metrics

    w = open_writer(tmp_path, key)
    metrics = Metrics()
    addon = ResidencyGate(Gate(bundle=policy, audit=w, metrics=metrics))

    async def go():
        f = chat_flow()
        await drive(addon, f)
        f.response = tutils.tresp(status_code=200)
        await call(addon.response, f)
        assert not addon.gate.background, "the outcome was written through a task"
        await w.close()
        return f

    run(go)
    rep = verify([tmp_path / "audit"], {key.key_id: key.public}, None, collect_records=True)
    assert rep.ok
    outcomes = [r for _f, _n, r in rep.records if r["kind"] == "outcome"]
    assert len(outcomes) == 1 and outcomes[0]["status"] == 200
    assert metrics.audit_records._value.get() >= 1


def test_a_failed_outcome_write_is_logged_not_raised(policy, caplog) -> None:
    sink = OutcomeFailsSink()
    addon = ResidencyGate(Gate(bundle=policy, audit=sink))

    async def go():
        f = chat_flow()
        await drive(addon, f)
        f.response = tutils.tresp(status_code=200)
        await call(addon.response, f)
        await asyncio.sleep(0)  # the done callback runs
        return f

    with caplog.at_level("CRITICAL"):
        run(go)
    assert sink.outcomes == 1
    assert "cannot write outcome record" in caplog.text
