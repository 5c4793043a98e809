"""What-if replay: a decision record holds every input the decision read except the body's
bytes, so re-deciding it under the config that recorded it reproduces it field for field,
for every provider rule of the catalog; under another config the changes are classified."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import policy_from, request
from residency_gate.audit.record import decision_fields
from residency_gate.audit.replay import (
    NOT_COMPARED,
    assume_keys_present,
    replay,
    replay_one,
    request_of_record,
)

CASES = yaml.safe_load((Path(__file__).parent / "provider_cases.yaml").read_text())
CHAT = "https://api.openai.com/v1/chat/completions"

REROUTE = {"residency": {"on_violation": "reroute",
                         "zones": {"pilot": {"places": ["eea_ch"], "mode": "report"}}},
           "reroute": {"credentials": {"eu.api.openai.com": {"api_key_env": "RG_EU_KEY"}}},
           "private_endpoints": [{"name": "onprem", "url": "https://onprem.llm.test/v1",
                                  "region": "private", "models": {"gpt-4o": "llama"},
                                  "api_key_env": "RG_ONPREM_KEY"}]}


def record_of(bundle, req, seq=[0]) -> dict:  # noqa: B006 - a counter for record ids
    seq[0] += 1
    fields = decision_fields(bundle.decide(req), req, bundle.regions, bundle.revisions)
    return {**fields, "kind": "decision", "id": f"r{seq[0]}", "ts": "2026-11-29T10:00:00Z"}


def assert_exact(bundle, rec) -> None:
    again = replay_one(rec, bundle)
    diff = {k: (rec.get(k), again.fields.get(k)) for k in again.fields
            if k not in NOT_COMPARED and rec.get(k) != again.fields.get(k)}
    assert not diff, f"{rec['url']} {rec['tags']}: {diff}"
    assert again.exact and again.change is None and not again.uncertain


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    cache = {}

    def get(azure, extra):
        key = repr((azure, extra))
        if key not in cache:
            config = {**extra, **({"azure": {"resources": azure}} if azure else {})}
            cache[key] = assume_keys_present(
                policy_from(tmp_path_factory.mktemp("p"), config))
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("extra", [{}, REROUTE], ids=["block", "reroute"])
def test_every_provider_case_replays_exactly(case, extra, bundles) -> None:
    bundle = bundles(case.get("azure"), extra)
    expect = case["expect"]
    tags = [None, *expect.get("satisfies", ()), *expect.get("violates", ())[:3], "pilot",
            "atlantis"]
    for tag in tags:
        req = request(case["url"], method=case.get("method", "POST"), body=case.get("body"),
                      tags=[tag] if tag else [], client="10.1.2.3", user="svc")
        rec = record_of(bundle, req)
        if rec["provider"] is None:
            return  # not an LLM host: never recorded
        assert_exact(bundle, rec)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"just a string"', b"", b"null",
                                 b'{"model": {"nested": "object"}}', b'{"model": 42}'])
def test_odd_bodies_replay_exactly(raw, bundles) -> None:
    bundle = bundles(None, REROUTE)
    for url in (CHAT, "https://api.anthropic.com/v1/messages"):
        for tags in ([], ["eu"]):
            rec = record_of(bundle, request(url, raw_body=raw, tags=tags))
            assert_exact(bundle, rec)


def test_undecodable_body_replays_exactly(bundles) -> None:
    from residency_gate.core.request import Request

    bundle = bundles(None, {})
    req = Request("POST", "https", "api.openai.com", 443, "/v1/chat/completions",
                  tag_values=("eu",), body=b"\x1f\x8bjunk",
                  body_error="body cannot be decoded (Content-Encoding: gzip: bad)")
    rec = record_of(bundle, req)
    assert rec["code"] == "bad_body" and rec["inputs"]["reads"]["body"] == "unreadable"
    assert_exact(bundle, rec)


def test_query_values_are_replayed() -> None:
    rec = {"url": "https://api.openai.com/v1/realtime", "method": "GET", "tags": ["eu"],
           "inputs": {"path": "/v1/realtime", "signed": False,
                      "reads": {"body": "empty", "query:model": "gpt-4o-realtime",
                                "query:other": None}}}
    req = request_of_record(rec)
    assert req.path == "/v1/realtime?model=gpt-4o-realtime" and req.body == b""


def test_changes_under_a_stricter_candidate(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recorded = policy_from(tmp_path / "a", {"residency": {
        "on_violation": "reroute",
        "clients": [{"cidr": "10.1.0.0/16", "require": "eea_ch", "mode": "report"}]}})
    candidate = assume_keys_present(policy_from(tmp_path / "b", {"residency": {
        "on_violation": "reroute",
        "clients": [{"cidr": "10.1.0.0/16", "require": "eea_ch"},
                    {"cidr": "10.2.0.0/16", "require": "eu"}]}}))
    gpt = {"model": "gpt-4o"}
    records = [
        record_of(recorded, request(CHAT, body=gpt, client="10.1.0.5")),  # report -> reroute
        record_of(recorded, request(CHAT, body=gpt, client="10.2.0.5")),  # allow -> block
        record_of(recorded, request(CHAT, body=gpt, client="10.3.0.5")),  # unchanged
        record_of(recorded, request(CHAT, body=gpt, client="10.3.0.5", tags=["us"])),
    ]
    report = replay((("f", i, r) for i, r in enumerate(records)), candidate)
    changes = {r.record["id"]: r.change for r in report.results}
    ids = [r["id"] for r in records]
    assert changes == {ids[0]: "rerouted", ids[1]: "newly_blocked", ids[2]: None,
                       ids[3]: None}
    assert report.totals()["newly_blocked"] == 1 and report.totals()["rerouted"] == 1
    assert report.by("network") == {"10.1.0.0/16": {"rerouted": 1},
                                    "10.2.0.0/16": {"newly_blocked": 1}}
    back = replay((("f", i, r) for i, r in enumerate(records)), assume_keys_present(recorded))
    assert not back.changed and all(r.exact for r in back.results)
