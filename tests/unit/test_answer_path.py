"""One answer path: every outcome the proxy can produce is a Decision, recorded by the one
record builder. Driven through the real addon with a real (thread) audit writer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import jsonschema
import pytest

from helpers import policy_from
from residency_gate.audit.record import record_schema
from residency_gate.audit.verify import verify
from residency_gate.proxy.addon import ResidencyGate
from residency_gate.proxy.interface import Gate
from test_addon_failclosed import BODY, chat_flow, drive, open_writer, run

PRIVATE = {"residency": {"on_violation": "reroute"},
           "private_endpoints": [{"name": "onprem", "url": "http://10.1.2.3:8000/v1",
                                  "region": "private", "models": {"*": "*"},
                                  "api_key_env": "RG_TEST_ONPREM_KEY"}]}


def decisions(tmp_path: Path, key) -> list[dict]:
    rep = verify([tmp_path / "audit"], {key.key_id: key.public}, None, collect_records=True)
    assert rep.ok
    records = [r for _f, _n, r in rep.records]
    validator = jsonschema.Draft202012Validator(record_schema())
    for r in records:
        validator.validate(r)  # every record the proxy writes has the documented shape
    return [r for r in records if r["kind"] == "decision"]


def drive_one(tmp_path: Path, bundle, key, tag: str, user: str = "hr-bot"):
    w = open_writer(tmp_path, key)
    addon = ResidencyGate(Gate(bundle=bundle, audit=w))

    async def go():
        f = chat_flow(tag)
        f.metadata["proxyauth"] = (user, "")
        await drive(addon, f)
        await w.close()
        return f

    return run(go)


@pytest.fixture
def key(tmp_path: Path):
    from residency_gate.audit.keys import load_or_create_signing_key

    return load_or_create_signing_key(tmp_path / "certs")


def test_reroute_without_its_key_is_a_plain_block(tmp_path, key, monkeypatch) -> None:
    """Regression: a reroute refused for a missing key was recorded as `block` but still
    carried routed_to/route, and lost the proxy user, the tags and the body hash."""
    monkeypatch.delenv("RG_TEST_ONPREM_KEY", raising=False)
    f = drive_one(tmp_path, policy_from(tmp_path, PRIVATE), key, "private")
    assert f.response is not None and f.response.status_code == 451
    (rec,) = decisions(tmp_path, key)
    assert (rec["decision"], rec["code"]) == ("block", "no_compliant_route")
    assert "routed_to" not in rec and "route" not in rec
    assert "RG_TEST_ONPREM_KEY" in rec["reason"]
    assert (rec["user"], rec["tags"]) == ("hr-bot", ["private"])
    assert rec["body_sha256"] == hashlib.sha256(BODY).hexdigest()


def test_key_gone_after_load_is_refused_and_recorded_whole(tmp_path, key, monkeypatch) -> None:
    """The key was there when the policy loaded, gone when the route is applied."""
    monkeypatch.setenv("RG_TEST_ONPREM_KEY", "k")
    bundle = policy_from(tmp_path, PRIVATE)
    monkeypatch.delenv("RG_TEST_ONPREM_KEY")
    f = drive_one(tmp_path, bundle, key, "private")
    assert f.response.status_code == 451 and f.response.headers["X-Residency-Decision"] == "block"
    (rec,) = decisions(tmp_path, key)
    assert (rec["decision"], rec["code"]) == ("block", "no_compliant_route")
    assert "routed_to" not in rec and "route" not in rec
    assert (rec["user"], rec["tags"], rec["provider"]) == ("hr-bot", ["private"], "openai")
    assert rec["body_sha256"] == hashlib.sha256(BODY).hexdigest()
    assert f.response.headers["X-Residency-Audit-Id"] == rec["id"]


def test_records_name_the_revisions_that_decided(tmp_path, key) -> None:
    bundle = policy_from(tmp_path, {})
    drive_one(tmp_path, bundle, key, "eu")
    (rec,) = decisions(tmp_path, key)
    assert rec["revisions"] == bundle.revisions
    assert rec["revisions"]["config"] == hashlib.sha256(
        (tmp_path / "residency-gate.yaml").read_bytes()).hexdigest()[:16]
    assert rec["places"] == ["global"] and rec["requirement_places"] == ["eu"]
    assert rec["inputs"] == {"path": "/v1/chat/completions", "signed": False,
                             "reads": {"body": "object", "body:model": "gpt-4o"}}
