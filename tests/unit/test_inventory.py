"""The AI inventory: the catalog's services (unknown place, sourced), the proxy's tally of
tunnelled connections (bounded, one record per client/user/host and window), and the
usage report built from records."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from helpers import decide_url, policy_from, shipped_catalog
from residency_gate.audit.inventory import build_inventory, client_network
from residency_gate.audit.record import record_schema
from residency_gate.catalog.compile import load_catalog
from residency_gate.catalog.source import InvalidSource
from residency_gate.core.decision import ReasonCode
from residency_gate.proxy import inventory as proxy_inventory
from residency_gate.proxy.inventory import Inventory, Tunnel


def test_services_are_matched_after_provider_endpoints() -> None:
    catalog = shipped_catalog()
    assert catalog.service("chatgpt.com").provider.id == "chatgpt"
    assert catalog.service("ab.cd.chatgpt.com").provider.id == "chatgpt"  # *.chatgpt.com
    assert catalog.service("api.perplexity.ai") is None  # a provider endpoint
    assert catalog.match("api.perplexity.ai")[0].provider.id == "perplexity"
    assert catalog.service("www.perplexity.ai").provider.id == "perplexity-app"
    assert catalog.service("google.com") is None and catalog.service("example.com") is None
    assert all(s.provider.source.startswith("https://") and s.reviewed
               for s in catalog.services.endpoints)
    assert {"chatgpt.com", "{sub}.chatgpt.com", "claude.ai"} <= set(catalog.host_patterns())


def test_a_service_satisfies_no_requirement(tmp_path) -> None:
    bundle = policy_from(tmp_path, {})
    d = decide_url(bundle, "https://claude.ai/api/chat", body={}, tags=["global"])
    assert (d.code, d.provider, d.endpoint_id) == (ReasonCode.UNKNOWN_PLACE, "claude", "app")
    assert decide_url(bundle, "https://claude.ai/", method="GET").code == "no_requirement"
    chatgpt = decide_url(bundle, "https://chatgpt.com/", method="GET", tags=["eea_ch"])
    assert any("eu.api.openai.com" in a for a in chatgpt.advice)  # its alternative


def test_service_host_of_a_provider_endpoint_is_an_error(tmp_path) -> None:
    extra = tmp_path / "inventory.yaml"
    extra.write_text("source: test\nreviewed: 2026-11-29\nservices:\n"
                     "  - {id: dup, name: Dup, vendor: X, category: llm_api,"
                     " hosts: [api.openai.com], source: https://x.example, reviewed: 2026-11-29}\n"
                     "  - {id: alt, name: Alt, vendor: X, category: chat_app,"
                     " hosts: [alt.example], alternative: nobody, source: https://x.example,"
                     " reviewed: 2026-11-29}\n")
    with pytest.raises(InvalidSource) as e:
        load_catalog([extra])
    text = str(e.value)
    assert "api.openai.com" in text and "openai/global" in text and "nobody" in text


def test_an_extra_inventory_adds_and_replaces_services(tmp_path) -> None:
    extra = tmp_path / "inventory.yaml"
    extra.write_text("source: test\nreviewed: 2026-11-29\nservices:\n"
                     "  - {id: chatgpt, name: ChatGPT Enterprise, vendor: OpenAI,"
                     " category: chat_app, hosts: [chatgpt.com], source: https://x.example,"
                     " reviewed: 2026-11-29}\n"
                     "  - {id: intranet-ai, name: Intranet AI, vendor: Us, category: assistant,"
                     " hosts: [ai.corp.example], source: https://x.example, reviewed: 2026-11-29}\n")
    catalog = load_catalog([extra])
    assert catalog.service("chatgpt.com").provider.name == "ChatGPT Enterprise"
    assert catalog.service("x.chatgpt.com") is None  # the replacement lists no subdomains
    assert catalog.service("ai.corp.example").provider.id == "intranet-ai"


# ------------------------------------------------------------------ the proxy's tally


class Sink:
    healthy = True

    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    async def append(self, kind, fields):
        self.records.append((kind, fields))
        return {**fields, "id": f"x:{len(self.records)}"}


class Owner:
    def __init__(self, bundle) -> None:
        from residency_gate.proxy.interface import Gate

        self.gate = Gate(bundle=bundle, audit=Sink())


def test_tally_writes_one_record_per_client_user_host_and_window(tmp_path) -> None:
    owner = Owner(policy_from(tmp_path, {"residency": {"clients": [
        {"cidr": "10.2.0.0/16", "require": "eu", "mode": "report"}]}}))
    inv = Inventory(owner)
    service = owner.gate.bundle.catalog.service("chatgpt.com")
    requirements = owner.gate.bundle.policy.requirements

    async def go():
        for i, client in enumerate(["10.1.0.1", "10.1.0.1", "10.1.0.1", "10.2.0.7"]):
            requirement = requirements.resolve((), client, None)
            tunnel = Tunnel(inv._key(service, client, None, "chatgpt.com", "chatgpt.com",
                                     requirement), requirement.places is not None)
            tunnel.up, tunnel.down = 100, 1000
            inv.tunnels[f"c{i}"] = tunnel
            inv._close(f"c{i}")
        inv.flush()
        await asyncio.gather(*owner.gate.background)

    asyncio.run(go())
    records = owner.gate.audit.records
    assert [k for k, _ in records] == ["inventory", "inventory"]
    by_client = {f["client"]: f for _, f in records}
    assert (by_client["10.1.0.1"]["connections"], by_client["10.1.0.1"]["bytes_down"],
            by_client["10.1.0.1"]["would_block"]) == (3, 3000, 0)
    assert (by_client["10.2.0.7"]["connections"], by_client["10.2.0.7"]["would_block"],
            by_client["10.2.0.7"]["requirement"]) == (1, 1, ["eu"])
    schema = jsonschema.Draft202012Validator(record_schema())
    for _, fields in records:
        schema.validate({**fields, "v": 1, "origin": "o", "seq": 1, "ts": "t",
                         "kind": "inventory", "prev": "0" * 64, "key_id": "k", "sig": "s"})


def test_tally_is_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(proxy_inventory, "MAX_KEYS", 5)
    owner = Owner(policy_from(tmp_path, {}))
    inv = Inventory(owner)
    service = owner.gate.bundle.catalog.service("claude.ai")
    none = owner.gate.bundle.policy.requirements.resolve((), None, None)

    async def go():
        for i in range(12):
            inv.tunnels[str(i)] = Tunnel(inv._key(service, f"10.0.0.{i}", None, "claude.ai",
                                                  None, none), False)
            inv._close(str(i))
            assert len(inv.rows) < 5
        inv.flush()
        await asyncio.gather(*owner.gate.background)

    asyncio.run(go())
    assert len(owner.gate.audit.records) == 12


# ------------------------------------------------------------------ the report


def test_report_counts_and_since(tmp_path: Path) -> None:
    def dec(i, ts, **kw):
        return ("f", i, {"kind": "decision", "id": f"o:{i}", "ts": ts, "client": "10.1.2.3",
                         "user": "ann", "provider": "openai", "endpoint": "global",
                         "host": "api.openai.com", "decision": "allow", "enforced": True,
                         "places": ["global"], "model": "gpt-4o", "requirement": [],
                         "advice": [], "body_bytes": 10, **kw})

    records = [
        dec(1, "2026-11-01T00:00:00Z"),
        dec(2, "2026-11-29T00:00:00Z", decision="block", enforced=False,
            requirement=["eu"], advice=["send it to https://eu.api.openai.com"]),
        ("f", 3, {"kind": "outcome", "decision_id": "o:2", "bytes_out": 99}),
        ("f", 4, {"kind": "decision", "id": "o:4", "ts": "2026-11-29T00:00:00Z",
                  "provider": None, "host": "x"}),  # refused before attribution
        ("f", 5, {"kind": "inventory", "ts": "2026-11-29T00:01:00Z", "client": "10.9.9.9",
                  "user": None, "provider": "claude", "endpoint": "app", "host": "claude.ai",
                  "connections": 4, "bytes_up": 5, "bytes_down": 6, "would_block": 0}),
    ]
    inv = build_inventory(records, since=datetime(2026, 11, 2, tzinfo=UTC))
    rows = {(u.provider, u.network, u.user): u for u in inv.rows.values()}
    assert set(rows) == {("openai", "10.1.2.0/24", "ann"), ("claude", "10.9.9.0/24", "-")}
    openai = rows[("openai", "10.1.2.0/24", "ann")]
    assert (openai.requests, openai.reported, openai.would_block, openai.bytes_down) == (
        1, 1, 1, 99)
    assert openai.to_dict()["instead"] == ["send it to https://eu.api.openai.com"]
    assert rows[("claude", "10.9.9.0/24", "-")].connections == 4
    assert client_network("::ffff:10.1.2.3") == "10.1.2.0/24"
    assert client_network("2001:db8::1") == "2001:db8::/64"
