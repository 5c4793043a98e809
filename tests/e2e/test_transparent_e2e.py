"""Transparent mode: the original destination decides, and the SNI must resolve to it.

Everything stays between hosts this test makes: a client network namespace, a veth
pair, a fake provider on the host side of the veth, and an iptables REDIRECT of the
client's traffic to the proxy (mode: transparent), which reads the original
destination. Needs root, `ip` and `iptables` (CI installs iptables).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import TAG_HEADER, Proxy
from .fakeprovider import FakeProvider, free_port
from .netns import missing, sh, veth_namespace

pytestmark = pytest.mark.e2e

NS = f"rg-t{os.getpid() % 100000}"
VETH_HOST, VETH_CLIENT = f"rgh{os.getpid() % 100000}", f"rgc{os.getpid() % 100000}"
HOST_IP, CLIENT_IP = "10.213.7.1", "10.213.7.2"  # this test's own veth pair, nothing else


@pytest.fixture
def netns() -> Iterator[None]:
    if (why := missing("iptables", "curl")) is not None:
        pytest.skip(why)
    with veth_namespace(NS, VETH_HOST, VETH_CLIENT, HOST_IP, CLIENT_IP):
        yield


@pytest.fixture
def redirected(netns: None, start_proxy: Any, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fake provider on the veth address, the proxy in transparent mode, and the
    client's TCP to the provider's port redirected to the proxy."""
    (tmp_path / "fake").mkdir()
    provider = FakeProvider(tmp_path / "fake").start(host=HOST_IP)
    port = provider.port
    proxy_port = free_port()
    rule = ["PREROUTING", "-i", VETH_HOST, "-p", "tcp", "--dport", str(port),
            "-j", "REDIRECT", "--to-ports", str(proxy_port)]
    sh("iptables", "-t", "nat", "-A", *rule)
    try:
        config = {
            "listen": f"{HOST_IP}:{proxy_port}",
            "mode": "transparent",
            "access": {"clients": [f"{CLIENT_IP}/32"]},  # beyond loopback: say who may use it
            "upstream_ca": str(provider.ca_pem),
            "resolve": {
                "us.api.openai.com": f"{HOST_IP}:{port}",
                "api.openai.com": f"{HOST_IP}:{port}",
                "eu.api.openai.com": f"127.0.0.9:{port}",  # resolves elsewhere: fronting
            },
        }
        proxy: Proxy = start_proxy(config)
        yield {"proxy": proxy, "provider": provider, "port": port}
    finally:
        sh("iptables", "-t", "nat", "-D", *rule, check=False)
        provider.stop()


def curl(env: dict[str, Any], name: str, *, tag: str | None = None, ca: Path | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], str]:
    """From inside the client namespace: HTTPS to `name`, which DNS would put at HOST_IP."""
    port = env["port"]
    cmd = ["ip", "netns", "exec", NS, "curl", "-sS", "--max-time", "15",
           "--resolve", f"{name}:{port}:{HOST_IP}", "--cacert", str(ca or env["proxy"].ca_pem),
           "-D", "-", "-o", "-", "-H", "Content-Type: application/json",
           "-d", '{"model":"gpt-4o","messages":[]}', f"https://{name}:{port}{path}"]
    if tag:
        cmd += ["-H", f"{TAG_HEADER}: {tag}"]
    out = sh(*cmd, check=False)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")  # text mode: \r\n arrives as \n
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def test_transparent_allow_block_fronting_and_tunnel(redirected: dict[str, Any]) -> None:
    provider: FakeProvider = redirected["provider"]

    status, headers, _ = curl(redirected, "us.api.openai.com", tag="us")
    assert (status, headers.get("x-residency-decision")) == (200, "allow"), headers
    (rec,) = provider.requests
    assert (rec.sni, rec.host) == ("us.api.openai.com", "us.api.openai.com")
    assert not rec.has_header(TAG_HEADER)

    provider.reset()
    status, headers, body = curl(redirected, "api.openai.com", tag="us")
    assert (status, headers.get("x-residency-decision")) == (451, "block")
    assert "requirement us" in body
    assert provider.requests == []

    # The SNI names a host that does not resolve to the address the connection goes to.
    status, _, body = curl(redirected, "eu.api.openai.com", tag="eea_ch")
    assert status == 421 and "domain fronting" in body
    assert provider.requests == []

    # Not an LLM host: tunnelled, so the client sees the provider's own certificate.
    status, headers, _ = curl(redirected, "plain.example.test", ca=provider.ca_pem, path="/")
    assert status == 200 and "x-residency-decision" not in headers
    assert [r.sni for r in provider.requests] == ["plain.example.test"]

