"""Differential fuzz through the running proxy: random mutations of requests of every
locator kind (tests/mutations.py) over raw sockets. Each one is refused (and the fake
provider received nothing), or the provider received exactly the request the gate
decided on, and every reading a server may apply to it gives the gate's decision, as
the decision record states it. The pure-core companion, with more examples, is
tests/unit/test_parsers_property.py."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import event, given

from mutations import CONFIG, Sent, agrees, fuzz_settings, reference_decisions, requests
from residency_gate.catalog.bundle import load_bundle

from .conftest import Proxy
from .fakeprovider import FakeProvider
from .rawhttp import RawResponse, tunnel_request

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gate(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    return start_module_proxy(CONFIG)


@cache
def bundle_of(config_path: str) -> Any:
    return load_bundle(config_path)  # the proxy's own config and catalog


def records_by_id(proxy: Proxy) -> dict[str, dict[str, Any]]:
    out = {}
    for line in proxy.audit_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("kind") == "decision":
                out[rec["id"]] = rec
    return out


def send(proxy: Proxy, sent: Sent) -> RawResponse | None:
    try:
        return tunnel_request(proxy.host, proxy.port, connect_host=sent.host,
                              ssl_context=proxy.ssl_context(), sni=sent.host, path=sent.target,
                              host_header=sent.host_header,
                              headers=[*sent.headers, ("Authorization", "Bearer k")],
                              body=sent.wire_body)
    except (ConnectionError, ssl.SSLError, OSError):
        return None  # the connection was refused or closed: nothing may have been forwarded


@fuzz_settings(150)
@given(sent=requests())
def test_refused_or_decided_on_what_the_provider_received(sent: Sent, gate: Proxy,
                                                          fake: FakeProvider) -> None:
    fake.reset()
    resp = send(gate, sent)
    verdict = resp.header("X-Residency-Decision") if resp is not None else None
    if resp is None or verdict == "block" or (verdict is None and resp.status >= 400):
        # Refused: by the gate (answered before any upstream connection), or by mitmproxy
        # itself for a request it cannot parse.
        assert fake.requests == [], (sent, resp and resp.body[:300])
        event(f"{sent.kind}: refused {resp.status if resp is not None else 'connection'}")
        if verdict == "block":
            assert resp.status in (400, 421, 451), resp.status
        return
    assert verdict == "allow", (resp.status, resp.headers, sent)
    event(f"{sent.kind}: forwarded")
    (received,) = fake.requests
    record = records_by_id(gate)[resp.header("X-Residency-Audit-Id")]
    assert received.url_path == record["inputs"]["path"], "forwarded something else"
    gate_says = (record["decision"], record["code"], record["places"])
    bundle = bundle_of(str(gate.config_path))
    for label, reference in reference_decisions(bundle, received.host_header, received.path,
                                                received.decoded_body, sent.tags):
        assert agrees(gate_says, reference), (label, gate_says, reference, sent, received.path)
