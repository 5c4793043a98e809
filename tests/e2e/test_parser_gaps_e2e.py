"""Issue 14: the gate decides on exactly what the provider will act on.

Each case goes through the running proxy over raw sockets (CONNECT, TLS, one request,
as an attacker would send it) or an official SDK, and its verdict is taken at the fake
provider: it received nothing, or exactly the normalised request the gate decided on.
`explain` must give the same answer as the proxy's decision record for each case.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from residency_gate.cli.main import main as cli_main

from .conftest import TAG_HEADER, Proxy, tag_bedrock
from .fakeprovider import PLAIN_HOST, PLAIN_PAGE, FakeProvider
from .rawhttp import RawResponse, connect_tunnel, request_over, tunnel_request
from .test_proxy_sdks import assert_nothing_received

pytestmark = pytest.mark.e2e

AZURE = {"resources": {"myres-eu": {"region": "swedencentral", "deployments": {
    "gpt4o-dz": "DataZoneStandard", "gpt4o-global": "GlobalStandard"}}}}
GEMINI_BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
CHAT_BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
CONVERSE_BODY = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
HAIKU = "anthropic.claude-3-haiku-20240307-v1%3A0"
US_SONNET = "us.anthropic.claude-3-5-sonnet-20240620-v1%3A0"
EU_ARN = ("arn%3Aaws%3Abedrock%3Aeu-central-1%3A%3Afoundation-model%2F"
          "anthropic.claude-3-haiku-20240307-v1%3A0")


def vertex(location: str) -> str:
    return (f"/v1/projects/p/locations/{location}/publishers/google/models/"
            "gemini-2.5-flash:generateContent")


def azure(deployment: str) -> str:
    return f"/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"


def bedrock(model: str) -> str:
    return f"/model/{model}/converse"


@pytest.fixture(scope="module")
def gate(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    return start_module_proxy({"azure": AZURE})


def send(proxy: Proxy, host: str, target: str, *, tags: tuple[str, ...] = (),
         body: bytes = b"", headers: list[tuple[str, str]] | None = None,
         method: str = "POST") -> RawResponse:
    extra = [(TAG_HEADER, t) for t in tags] + [("Content-Type", "application/json"),
                                                ("Authorization", "Bearer k")]
    return tunnel_request(proxy.host, proxy.port, connect_host=host,
                          ssl_context=proxy.ssl_context(), method=method, path=target,
                          host_header=host, headers=extra + (headers or []), body=body)


def record_of(proxy: Proxy, resp: RawResponse) -> dict[str, Any]:
    audit_id = resp.header("X-Residency-Audit-Id")
    assert audit_id, (resp.status, resp.body[:300])
    for line in proxy.audit_text().splitlines():
        if audit_id in line:
            rec = json.loads(line)
            if rec.get("id") == audit_id:
                return rec
    raise AssertionError(f"no decision record {audit_id}")


def explained(proxy: Proxy, tmp_path: Path, capsys: pytest.CaptureFixture, url: str,
              tags: tuple[str, ...], body: bytes) -> dict[str, Any]:
    """`residency-gate explain --json` under the proxy's own config."""
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(body)
    args = ["explain", "-c", str(proxy.config_path), url, "--json", "--body", f"@{body_file}"]
    for t in tags:
        args += ["--tag", t]
    capsys.readouterr()
    cli_main(args)
    return json.loads(capsys.readouterr().out)


def assert_refused(fake: FakeProvider, resp: RawResponse, status: int) -> None:
    assert resp.status == status, (resp.status, resp.body[:400])
    assert resp.header("X-Residency-Decision") == "block"
    assert_nothing_received(fake)


def assert_forwarded_as(fake: FakeProvider, resp: RawResponse, host: str, target: str) -> Any:
    assert resp.status == 200, (resp.status, resp.body[:400])
    assert resp.header("X-Residency-Decision") == "allow"
    (rec,) = fake.requests
    assert (rec.host, rec.path) == (host, target), "the provider got something else"
    return rec


# ---------------------------------------------------------------------------
# paths: decided on, and forwarded as, their normal form

VERTEX_EU = "europe-west4-aiplatform.googleapis.com"
AZURE_HOST = "myres-eu.openai.azure.com"
BEDROCK_EU = "bedrock-runtime.eu-central-1.amazonaws.com"

PATH_CASES = [
    # (id, host, target sent, tags, body, expected: status refused, or the target forwarded)
    ("vertex-dotdot", VERTEX_EU, vertex("europe-west4/../us-central1"), ("eu",), GEMINI_BODY, 451),
    ("vertex-pct2e", VERTEX_EU, vertex("europe-west4/%2e%2e/us-central1"), ("eu",), GEMINI_BODY, 451),
    ("vertex-mixed", VERTEX_EU, vertex("europe-west4/.%2E/us-central1"), ("eu",), GEMINI_BODY, 451),
    ("vertex-back-home", VERTEX_EU, vertex("us-central1/../europe-west4"), ("eu",), GEMINI_BODY,
     vertex("europe-west4")),
    ("vertex-dot-and-unreserved", VERTEX_EU, vertex("./europe%2Dwest4"), ("eu",), GEMINI_BODY,
     vertex("europe-west4")),
    ("vertex-eu-multiregion", "aiplatform.eu.rep.googleapis.com", vertex("eu/../us"), ("eu",),
     GEMINI_BODY, 451),
    ("vertex-global", "aiplatform.googleapis.com", vertex("europe-west4/%2E%2E/global"), ("eu",),
     GEMINI_BODY, 451),
    ("azure-deployment-switch", AZURE_HOST, azure("gpt4o-dz/../gpt4o-global"), ("eu",),
     CHAT_BODY, 451),
    ("azure-deployment-pct", AZURE_HOST, azure("gpt4o-dz/%2e%2e/gpt4o-global"), ("eu",),
     CHAT_BODY, 451),
    ("azure-back-home", AZURE_HOST, azure("gpt4o-global/../gpt4o-dz"), ("eu",), CHAT_BODY,
     azure("gpt4o-dz")),
    ("bedrock-model-switch", BEDROCK_EU, bedrock(f"{HAIKU}/../{US_SONNET}"), ("eu",),
     CONVERSE_BODY, 451),
    ("bedrock-model-pct", BEDROCK_EU, bedrock(f"{HAIKU}/%2E%2E/{US_SONNET}"), ("eu",),
     CONVERSE_BODY, 451),
    ("bedrock-back-home", BEDROCK_EU, bedrock(f"{US_SONNET}/../{HAIKU}"), ("eu",),
     CONVERSE_BODY, bedrock(HAIKU)),
    ("bedrock-arn-encoded-slash", BEDROCK_EU, bedrock(EU_ARN), ("eu",), CONVERSE_BODY,
     bedrock(EU_ARN)),
    ("anthropic-path-gate", "api.anthropic.com", "/v1/x/../messages", ("eu",),
     b'{"model":"claude-opus-4-6","inference_geo":"us","max_tokens":1,"messages":[]}', 451),
    # no single normal form: refused (400) when a requirement applies
    ("empty-segment", VERTEX_EU, vertex("europe-west4//x"), ("eu",), GEMINI_BODY, 400),
    ("path-parameter", AZURE_HOST, azure("gpt4o-dz;v=1"), ("eu",), CHAT_BODY, 400),
    ("encoded-slash-dots", BEDROCK_EU, bedrock(f"{HAIKU}%2F..%2F{US_SONNET}"), ("eu",),
     CONVERSE_BODY, 400),
    ("encoded-nul", VERTEX_EU, vertex("europe-west4%00"), ("eu",), GEMINI_BODY, 400),
    ("bad-escape", VERTEX_EU, vertex("europe-west4%zz"), ("eu",), GEMINI_BODY, 400),
    ("encoded-backslash", AZURE_HOST, azure("gpt4o-dz%5C..%5Cgpt4o-global"), ("eu",),
     CHAT_BODY, 400),
    ("double-encoded", AZURE_HOST, azure("gpt4o-dz/%252e%252e/gpt4o-global"), ("eu",),
     CHAT_BODY, 400),
]  # fmt: skip


@pytest.mark.parametrize(("host", "target", "tags", "body", "expected"),
                         [pytest.param(*c[1:], id=c[0]) for c in PATH_CASES])
def test_path_decided_as_the_provider_reads_it(
        host: str, target: str, tags: tuple[str, ...], body: bytes, expected: int | str,
        gate: Proxy, fake: FakeProvider, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    resp = send(gate, host, target, tags=tags, body=body)
    if isinstance(expected, int):
        assert_refused(fake, resp, expected)
    else:
        assert_forwarded_as(fake, resp, host, expected)
    record = record_of(gate, resp)
    assert record["inputs"]["path"] == (expected if isinstance(expected, str) else
                                        record["inputs"]["path"]).split("?")[0]
    shown = explained(gate, tmp_path, capsys, f"https://{host}{target}", tags, body)
    assert (shown["decision"], shown["code"], shown["url"], shown["places"]) == (
        record["decision"], record["code"], record["url"], record["places"])


@pytest.mark.parametrize("target", [
    vertex("europe-west4//x"), azure("gpt4o-dz;v=1"), bedrock(f"{HAIKU}%2F..%2F{US_SONNET}")])
def test_unsafe_path_without_requirement_is_forwarded_as_sent(
        target: str, gate: Proxy, fake: FakeProvider) -> None:
    host = {"/v1/": VERTEX_EU, "/ope": AZURE_HOST, "/mod": BEDROCK_EU}[target[:4]]
    resp = send(gate, host, target, body=CHAT_BODY)
    assert resp.header("X-Residency-Decision") == "allow"
    (rec,) = fake.requests
    assert rec.path == target
    assert record_of(gate, resp)["code"] == "no_requirement"


def test_sdk_model_id_with_dot_segments(gate: Proxy, fake: FakeProvider,
                                        bedrock_client: Any) -> None:
    """boto3 sends a model ID's '/' as %2F: `x/../us.y` cannot be normalised (it would
    depend on whether the server decodes %2F first), so it is refused with a requirement;
    without one it goes out exactly as signed, and the signature still holds."""
    model = "anthropic.claude-3-haiku-20240307-v1:0/../us.anthropic.claude-3-5-sonnet-20240620-v1:0"
    msg = [{"role": "user", "content": [{"text": "hi"}]}]
    client = bedrock_client(gate, "eu-central-1")
    tag_bedrock(client, "eu", signed=True)
    with pytest.raises(ClientError) as ei:
        client.converse(modelId=model, messages=msg)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "encoded '/'" in ei.value.response["Error"]["Message"]
    assert_nothing_received(fake)

    client = bedrock_client(gate, "eu-central-1")
    client.converse(modelId=model, messages=msg)
    (rec,) = fake.requests
    assert "%2F..%2F" in rec.path and rec.sigv4_valid is True


def test_signed_request_with_dot_segments_is_never_rewritten(
        gate: Proxy, fake: FakeProvider) -> None:
    """A SigV4 signature covers the path: a non-normal one is refused with a requirement,
    forwarded untouched (signature intact) without."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from .fakeprovider import AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY

    target = bedrock(f"{US_SONNET}/../{HAIKU}")

    def signed(tags: tuple[str, ...]) -> RawResponse:
        req = AWSRequest(method="POST", url=f"https://{BEDROCK_EU}{target}", data=CONVERSE_BODY,
                         headers={"Content-Type": "application/json"})
        SigV4Auth(Credentials(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), "bedrock",
                  "eu-central-1").add_auth(req)
        headers = [(k, v) for k, v in req.headers.items() if k.lower() != "content-type"]
        return tunnel_request(gate.host, gate.port, connect_host=BEDROCK_EU,
                              ssl_context=gate.ssl_context(), path=target, host_header=BEDROCK_EU,
                              headers=[*headers, ("Content-Type", "application/json"),
                                       *((TAG_HEADER, t) for t in tags)], body=CONVERSE_BODY)

    resp = signed(("eu",))
    assert_refused(fake, resp, 400)
    assert "SigV4" in json.loads(resp.body)["message"]
    resp = signed(())
    assert resp.header("X-Residency-Decision") == "allow"
    (rec,) = fake.requests
    assert rec.path == target and rec.sigv4_valid is True


# ---------------------------------------------------------------------------
# bodies: what the decision reads must mean the same to every parser

ANTHROPIC = "api.anthropic.com"
AZURE_V1 = "/openai/v1/chat/completions"


def claude(*geo_pairs: str, tail: bytes = b"") -> bytes:
    geos = "".join(f',"inference_geo":"{g}"' for g in geo_pairs)
    return f'{{"model":"claude-opus-4-6","max_tokens":1,"messages":[]{geos}}}'.encode() + tail


BODY_CASES = [
    ("dup-geo-last-us", ANTHROPIC, "/v1/messages", ("us",), claude("global", "us"), "repeats the key 'inference_geo'"),
    ("dup-geo-first-us", ANTHROPIC, "/v1/messages", ("us",), claude("us", "global"), "repeats the key 'inference_geo'"),
    ("escaped-dup-geo", ANTHROPIC, "/v1/messages", ("us",),
     b'{"model":"claude-opus-4-6","\\u0069nference_geo":"us","inference_geo":"global"}', "repeats the key"),
    ("bom", ANTHROPIC, "/v1/messages", ("us",), b"\xef\xbb\xbf" + claude("us"), "byte order mark"),
    ("trailing-value", ANTHROPIC, "/v1/messages", ("us",), claude("us", tail=b'{"inference_geo":"global"}'), "Extra data"),
    ("nan", ANTHROPIC, "/v1/messages", ("us",), claude("us")[:-1] + b',"temperature":NaN}', "NaN"),
    ("latin-1", ANTHROPIC, "/v1/messages", ("us",), claude("us")[:-1] + b',"metadata":{"user_id":"\xe9"}}', "not UTF-8"),
    ("deep", ANTHROPIC, "/v1/messages", ("us",), claude("us")[:-1] + b',"x":' + b"[" * 600 + b"]" * 600 + b"}", "deeper than 512"),
    ("azure-dup-deployment", AZURE_HOST, AZURE_V1, ("eu",), b'{"model":"gpt4o-dz","model":"gpt4o-global","messages":[]}', "repeats the key 'model'"),
    ("openai-dup-model", "eu.api.openai.com", "/v1/chat/completions", ("eea_ch",), b'{"model":"gpt-4o","messages":[],"model":"o3"}', "repeats the key 'model'"),
]  # fmt: skip


@pytest.mark.parametrize(("host", "target", "tags", "body", "message"),
                         [pytest.param(*c[1:], id=c[0]) for c in BODY_CASES])
def test_ambiguous_body_refused_when_a_requirement_applies(
        host: str, target: str, tags: tuple[str, ...], body: bytes, message: str,
        gate: Proxy, fake: FakeProvider, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    resp = send(gate, host, target, tags=tags, body=body)
    assert_refused(fake, resp, 400)
    text = resp.body.decode()
    assert message in text and "Nothing was forwarded" in text
    record = record_of(gate, resp)
    assert record["code"] == "bad_body"
    shown = explained(gate, tmp_path, capsys, f"https://{host}{target}", tags, body)
    assert (shown["decision"], shown["code"]) == ("block", "bad_body")

    # No requirement: forwarded byte for byte, audited, not located.
    resp = send(gate, host, target, body=body)
    assert resp.header("X-Residency-Decision") == "allow"
    (rec,) = fake.requests
    assert rec.body == body
    unlocated = record_of(gate, resp)
    assert (unlocated["code"], unlocated["places"]) == ("no_requirement", None)


def test_compressed_ambiguous_body_refused(gate: Proxy, fake: FakeProvider) -> None:
    resp = send(gate, ANTHROPIC, "/v1/messages", tags=("us",),
                body=gzip.compress(claude("global", "us")),
                headers=[("Content-Encoding", "gzip")])
    assert_refused(fake, resp, 400)


def test_unambiguous_body_still_decided(gate: Proxy, fake: FakeProvider) -> None:
    resp = send(gate, ANTHROPIC, "/v1/messages", tags=("us",), body=claude("us"))
    assert resp.status == 200 and resp.header("X-Residency-Decision") == "allow"
    assert fake.requests[0].json()["inference_geo"] == "us"


# ---------------------------------------------------------------------------
# IP-literal CONNECT targets: what is inside decides

GROQ_ELSEWHERE = {"api.groq.com": "127.0.0.9:443"}  # an LLM name that is not at the fake's address


@pytest.fixture(scope="module")
def echo_server() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


@pytest.fixture(scope="module")
def literal_gates(start_module_proxy: Callable[..., Proxy], fake: FakeProvider,
                  echo_server: int) -> dict[str, Proxy]:
    from .fakeprovider import HOSTS

    resolve = {**{h: fake.addr for h in HOSTS}, **GROQ_ELSEWHERE}
    # CONNECT goes to the fake's port, which access.connect_ports must allow (443 only by default)
    return {mode: start_module_proxy({"ip_literals": mode, "resolve": resolve,
                                      "access": {"connect_ports": [443, fake.port, echo_server]}})
            for mode in ("inspect", "refuse", "tunnel")}


def literal_request(proxy: Proxy, fake: FakeProvider, host_header: str, *,
                    tags: tuple[str, ...] = ("eu",), trust: str = "proxy") -> RawResponse:
    """CONNECT 127.0.0.1:<fake port>, TLS without SNI, `Host: host_header` inside."""
    sock = connect_tunnel(proxy.host, proxy.port, "127.0.0.1", fake.port)
    ctx = proxy.ssl_context() if trust == "proxy" else fake.client_ssl_context()
    try:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:  # an IP: no SNI sent
            return request_over(tls, "POST", "/v1/chat/completions", host_header,
                                [*((TAG_HEADER, t) for t in tags),
                                 ("Content-Type", "application/json")], CHAT_BODY)
    finally:
        sock.close()


def test_ip_literal_without_sni_is_decided_on_its_host(literal_gates: dict[str, Proxy],
                                                       fake: FakeProvider) -> None:
    gate = literal_gates["inspect"]
    resp = literal_request(gate, fake, "api.openai.com")  # the case: global, tag eu
    assert_refused(fake, resp, 451)
    assert record_of(gate, resp)["host"] == "api.openai.com"

    resp = literal_request(gate, fake, "us.api.openai.com", tags=("us",))
    assert resp.status == 200 and resp.header("X-Residency-Decision") == "allow"
    (rec,) = fake.requests
    # connected to by the name it was decided on: SNI and certificate check on that name
    assert (rec.host, rec.sni, rec.path) == ("us.api.openai.com", "us.api.openai.com",
                                             "/v1/chat/completions")
    assert not rec.has_header(TAG_HEADER)


def test_ip_literal_whose_host_does_not_resolve_there_is_421(
        literal_gates: dict[str, Proxy], fake: FakeProvider) -> None:
    resp = literal_request(literal_gates["inspect"], fake, "api.groq.com")
    assert_refused(fake, resp, 421)
    assert "does not resolve to 127.0.0.1" in resp.body.decode()


def test_ip_literal_to_another_host_is_forwarded_untouched(
        literal_gates: dict[str, Proxy], fake: FakeProvider) -> None:
    resp = literal_request(literal_gates["inspect"], fake, PLAIN_HOST)
    assert resp.status == 200 and resp.body == PLAIN_PAGE
    assert resp.header("X-Residency-Decision") is None
    (rec,) = fake.requests
    assert rec.host == PLAIN_HOST and rec.header(TAG_HEADER) == "eu"


def test_ip_literals_refuse(literal_gates: dict[str, Proxy], fake: FakeProvider) -> None:
    for name in ("us.api.openai.com", PLAIN_HOST):
        resp = literal_request(literal_gates["refuse"], fake, name, tags=("us",))
        assert_refused(fake, resp, 421)
        assert "ip_literals: refuse" in resp.body.decode()


def test_ip_literals_tunnel_is_blind(literal_gates: dict[str, Proxy], fake: FakeProvider) -> None:
    """The old behaviour, now only by choice: nothing is decided inside."""
    resp = literal_request(literal_gates["tunnel"], fake, "api.openai.com", trust="fake")
    assert resp.status == 200 and resp.header("X-Residency-Decision") is None
    (rec,) = fake.requests
    assert rec.header(TAG_HEADER) == "eu" and rec.sni is None




def test_ip_literal_non_tls_bytes_stay_a_plain_tunnel(literal_gates: dict[str, Proxy],
                                                      echo_server: int) -> None:
    gate = literal_gates["inspect"]
    sock = connect_tunnel(gate.host, gate.port, "127.0.0.1", echo_server)
    try:
        sock.sendall(b"\x00\x01 not TLS, not HTTP\r\n")
        assert sock.recv(1024).startswith(b"echo:\x00\x01 not TLS")
    finally:
        sock.close()
