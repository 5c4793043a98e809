"""Transparent mode and ECH: a ClientHello with an encrypted_client_hello extension hides
its real server name behind a public one. To an address known to serve a catalog host
it is intercepted, so ECH is not honoured there (the client's ECH is rejected; what it
sends is decided like any transparent request); to other addresses it is decided on its
outer SNI as before. The same client network namespace, veth pair and iptables REDIRECT
as test_transparent_e2e.py; needs root, `ip` and `iptables`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from .fakeprovider import FakeProvider
from .test_transparent_e2e import HOST_IP, NS, netns, redirected  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e

CLIENT = textwrap.dedent('''
    import json, os, socket, ssl, struct, sys

    def with_extension(record: bytes, kind: int, body: bytes) -> bytes:
        """A ClientHello record with one more extension, every length fixed up."""
        hs = record[5:]
        pos = 4 + 2 + 32
        pos += 1 + hs[pos]                                   # session id
        pos += 2 + int.from_bytes(hs[pos:pos + 2], "big")    # cipher suites
        pos += 1 + hs[pos]                                   # compression methods
        ext_len = int.from_bytes(hs[pos:pos + 2], "big")
        extensions = hs[pos + 2:pos + 2 + ext_len] + struct.pack("!HH", kind, len(body)) + body
        body_out = hs[4:pos] + struct.pack("!H", len(extensions)) + extensions
        handshake = b"\\x01" + len(body_out).to_bytes(3, "big") + body_out
        return record[:3] + struct.pack("!H", len(handshake)) + handshake

    sni, port, ech = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ech"
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if ech:  # outer ECH: kdf HKDF-SHA256, aead AES-128-GCM, config id, enc, payload
        payload = b"\\x00\\x00\\x01\\x00\\x01\\x2a" + b"\\x00\\x20" + os.urandom(32) \\
            + b"\\x00\\x90" + os.urandom(0x90)
        hello = with_extension(hello, 0xFE0D, payload)
    with socket.create_connection((sys.argv[4], port), timeout=5) as s:
        s.sendall(hello)
        try:
            first = s.recv(5)
        except OSError as e:
            first = repr(e).encode()
    print(json.dumps({"first": first.hex()}))
''')


def hello_from_client(env: dict[str, Any], sni: str, ech: bool) -> str:
    out = subprocess.run(["ip", "netns", "exec", NS, sys.executable, "-c", CLIENT, sni,
                          str(env["port"]), "ech" if ech else "plain", HOST_IP],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["first"]


def test_ech_to_an_llm_address_is_intercepted(redirected: dict[str, Any]) -> None:  # noqa: F811
    provider: FakeProvider = redirected["provider"]
    # HOST_IP serves api.openai.com (the proxy's `resolve` says so): ECH there is not honoured.
    first = hello_from_client(redirected, "public.example.net", ech=True)
    assert first.startswith("16"), first  # a TLS handshake answer, from the proxy itself
    assert "public.example.net" not in provider.tls_connections, "ECH tunnelled to the provider"

    # The same ClientHello without ECH is decided on its SNI: not an LLM host, tunnelled.
    provider.reset()
    hello_from_client(redirected, "public.example.net", ech=False)
    assert provider.tls_connections == ["public.example.net"]
