"""Decide on what the proxy connects to: CONNECT target / original destination, never
a Host header or SNI that names something else (domain fronting)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from mitmproxy.proxy.mode_specs import ProxyMode
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


ECH = [(0xFE0D, b"\x00\x00\x01\x00\x01\x2a")]  # an encrypted_client_hello extension
REGULAR, TRANSPARENT, SOCKS = (ProxyMode.parse(m) for m in ("regular", "transparent", "socks5"))


def hello(target: str, sni: str | None, mode=REGULAR, extensions=()):
    return SimpleNamespace(
        context=SimpleNamespace(server=SimpleNamespace(address=(target, 443)),
                                client=SimpleNamespace(proxy_mode=mode, id="c1")),
        client_hello=SimpleNamespace(sni=sni, extensions=list(extensions)),
        ignore_connection=False,
    )


@pytest.mark.parametrize(
    ("connect_target", "sni", "mode", "extensions", "intercepted"),
    [
        ("api.openai.com", "api.openai.com", REGULAR, (), True),
        ("bedrock-runtime.eu-central-1.amazonaws.com", None, REGULAR, (), True),
        ("example.org", "example.org", REGULAR, (), False),  # plain tunnel, its TLS untouched
        ("example.org", "api.openai.com", REGULAR, (), True),  # SNI names an LLM host
        ("example.org", "cover.example.net", REGULAR, ECH, False),  # a name: connect to it
        ("203.0.113.7", "generativelanguage.googleapis.com", TRANSPARENT, (), True),
        ("203.0.113.7", None, TRANSPARENT, (), False),
        ("203.0.113.7", "example.org", TRANSPARENT, ECH, False),  # address serves no LLM
        ("127.0.0.5", "public.example.net", TRANSPARENT, ECH, True),  # ECH to an LLM address
        ("127.0.0.5", "example.org", TRANSPARENT, (), False),  # no ECH: the SNI decides
        # ip_literals: inspect (default): an address the client chose names no host
        ("203.0.113.7", None, REGULAR, (), True),
        ("203.0.113.7", "example.org", REGULAR, (), True),
        ("2001:db8::7", None, SOCKS, (), True),
    ],
)
def test_selective_interception(gate, connect_target, sni, mode, extensions, intercepted):
    data = hello(connect_target, sni, mode, extensions)
    Interception(gate).tls_clienthello(data)
    assert data.ignore_connection is (not intercepted)


@pytest.mark.parametrize(("setting", "intercepted", "refused"), [
    ("inspect", True, False), ("refuse", True, True), ("tunnel", False, False)])
def test_ip_literals_setting(tmp_path, setting, intercepted, refused):
    gate = ResidencyGate(Gate(bundle=policy_from(tmp_path, {"ip_literals": setting}),
                              audit=None))
    interception = gate.interception
    data = hello("203.0.113.7", None)
    interception.tls_clienthello(data)
    assert data.ignore_connection is (not intercepted)
    assert ("c1" in interception.refused) is refused
    named = hello("api.openai.com", None)  # a catalog name is intercepted whatever the setting
    interception.tls_clienthello(named)
    assert named.ignore_connection is False
    transparent = hello("203.0.113.7", None, TRANSPARENT)  # not a CONNECT target: unaffected
    interception.tls_clienthello(transparent)
    assert transparent.ignore_connection is True


def test_ech_addresses_are_learned_and_expire(gate):
    interception = Interception(gate)
    data = hello("198.51.100.9", "public.example.net", TRANSPARENT, ECH)
    interception.tls_clienthello(data)
    assert data.ignore_connection is True
    interception.llm_addresses.learn(["198.51.100.9"])  # e.g. api.openai.com resolved there
    data = hello("198.51.100.9", "public.example.net", TRANSPARENT, ECH)
    interception.tls_clienthello(data)
    assert data.ignore_connection is False
    interception.llm_addresses.ttl = -1.0
    interception.llm_addresses.learn(["198.51.100.10"])
    assert "198.51.100.10" not in interception.llm_addresses


def test_refused_ip_literal_requests_get_421(tmp_path):
    gate = ResidencyGate(Gate(bundle=policy_from(tmp_path, {"ip_literals": "refuse"}),
                              audit=None))
    f = flow("203.0.113.7", "plain.example.org", None)
    gate.interception.refused.add(f.client_conn.id)
    refused = asyncio.run(gate._destination(f, gate.gate.bundle))
    assert isinstance(refused, Decision) and refused.status == 421
    assert "ip_literals: refuse" in refused.reason


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


def test_ech_configs_stripped_where_the_proxy_answers_dns():
    """wireguard / local modes: mitmproxy answers the clients' DNS; the gate keeps
    mitmproxy's strip_ech, so clients never learn an ECH config there."""
    from mitmproxy import dns
    from mitmproxy.net.dns.https_records import HTTPSRecord, SVCParamKeys
    from mitmproxy.proxy.layers.dns import DnsResponseHook

    from residency_gate.ops.embed import gate_master

    async def run():
        master = gate_master()
        assert master.options.strip_ech is True
        f = tflow.tdnsflow(resp=True)
        record = HTTPSRecord(1, "api.openai.com", {SVCParamKeys.ECH.value: b"\x00\x04ech!"})
        f.response.answers = [dns.ResourceRecord.HTTPS("api.openai.com", record)]
        assert f.response.answers[0].https_ech is not None
        await master.addons.handle_lifecycle(DnsResponseHook(f))
        return f.response.answers[0].https_ech

    assert asyncio.run(run()) is None
