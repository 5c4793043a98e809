"""Decide on what the proxy connects to: CONNECT target / original destination, never
a Host header or SNI that names something else (domain fronting)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from mitmproxy.test import tflow

from helpers import policy_from
from residency_gate.core.decision import Decision
from residency_gate.proxy.addon import ResidencyGate
from residency_gate.proxy.connections import Interception
from residency_gate.proxy.flows import strip_tag
from residency_gate.proxy.interface import Gate


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    policy = policy_from(tmp_path_factory.mktemp("d"),
                         {"resolve": {"api.openai.com": "127.0.0.5:443"}})
    return ResidencyGate(Gate(bundle=policy, audit=None))


def flow(target: str, host_header: str | None, sni: str | None):
    f = tflow.tflow()
    f.request.host = target
    f.request.port = 443
    f.request.scheme = "https"
    if host_header is None:
        f.request.headers.pop("host", None)
    else:
        f.request.headers["host"] = host_header
    f.client_conn.sni = sni
    return f


@pytest.mark.parametrize(
    ("target", "host_header", "sni", "expected"),
    [
        ("api.openai.com", "api.openai.com", "api.openai.com", "api.openai.com"),
        ("API.OpenAI.com.", "api.openai.com:443", "api.openai.com.", "api.openai.com"),
        ("api.openai.com", None, None, "api.openai.com"),
        ("eu.api.openai.com", "api.openai.com", "eu.api.openai.com", 421),  # Host fronting
        ("api.openai.com", "api.openai.com", "eu.api.openai.com", 421),  # SNI fronting
        ("cdn.example.net", "api.openai.com", "cdn.example.net", 421),  # LLM behind a front
        ("cdn.example.net", "cdn.example.net", "api.anthropic.com", 421),
        ("example.org", "example.org", "example.org", None),  # not an LLM: untouched
        # Transparent mode: original destination is an address; the name must resolve to it.
        ("127.0.0.5", "api.openai.com", "api.openai.com", "api.openai.com"),
        ("127.0.0.9", "api.openai.com", "api.openai.com", 421),
        ("127.0.0.5", "api.openai.com", "api.anthropic.com", 421),
        ("127.0.0.5", "example.org", None, None),
    ],
)
def test_destination(gate, target, host_header, sni, expected):
    f = flow(target, host_header, sni)

    async def run():
        return await gate._destination(f, gate.gate.bundle)

    if expected == 421:
        refused = asyncio.run(run())
        assert isinstance(refused, Decision) and refused.status == 421
        assert refused.code == "misdirected"
    else:
        assert asyncio.run(run()) == expected


@pytest.mark.parametrize(
    ("connect_target", "sni", "intercepted"),
    [
        ("api.openai.com", "api.openai.com", True),
        ("bedrock-runtime.eu-central-1.amazonaws.com", None, True),
        ("example.org", "example.org", False),  # plain tunnel, its TLS untouched
        ("example.org", "api.openai.com", True),  # SNI names an LLM host: look inside
        ("203.0.113.7", "generativelanguage.googleapis.com", True),  # transparent mode
        ("203.0.113.7", None, False),
    ],
)
def test_selective_interception(gate, connect_target, sni, intercepted):
    data = SimpleNamespace(
        context=SimpleNamespace(server=SimpleNamespace(address=(connect_target, 443))),
        client_hello=SimpleNamespace(sni=sni),
        ignore_connection=False,
    )
    Interception(gate).tls_clienthello(data)
    assert data.ignore_connection is (not intercepted)


def test_tag_header_kept_only_when_signed(gate):
    f = tflow.tflow()
    f.request.headers["X-Data-Residency"] = "eu"
    f.request.headers["authorization"] = (
        "AWS4-HMAC-SHA256 Credential=AKID/20261128/eu-central-1/bedrock/aws4_request, "
        "SignedHeaders=host;x-amz-date;x-data-residency, Signature=abc")
    strip_tag(f, "X-Data-Residency")
    assert f.request.headers["X-Data-Residency"] == "eu"
    f.request.headers["authorization"] = f.request.headers["authorization"].replace(
        ";x-data-residency", "")
    strip_tag(f, "X-Data-Residency")
    assert "X-Data-Residency" not in f.request.headers


@pytest.mark.parametrize(("server", "sni", "killed"), [
    ("api.openai.com", "api.openai.com", True),
    ("example.org", "api.anthropic.com", True),
    ("example.org", "example.org", False),
])
def test_raw_tcp_to_llm_host_is_killed(gate, server, sni, killed):
    f = tflow.ttcpflow()
    f.server_conn.address = (server, 443)
    f.client_conn.sni = sni
    Interception(gate).tcp_start(f)
    assert (f.error is not None and "killed" in f.error.msg.lower()) is killed
