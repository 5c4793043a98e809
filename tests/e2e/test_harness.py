"""The harness itself, without the proxy: the official SDKs talk straight to the
fake provider (https://localhost:PORT, trusting its trustme CA) and parse what
it answers; the SigV4 check tells a valid signature from a tampered one."""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Any

import httpx2
import pytest
import websockets.sync.client as ws_client

from .conftest import TAG_HEADER, tag_bedrock
from .fakeprovider import AWS_ACCESS_KEY_ID, PLAIN_PAGE, FakeProvider, verify_sigv4

pytestmark = pytest.mark.e2e

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"


def direct(fake: FakeProvider) -> str:
    return f"https://localhost:{fake.port}"


def test_openai_chat_json_and_stream(fake: FakeProvider, openai_client: Any) -> None:
    client = openai_client(None, ca_pem=fake.ca_pem, base_url=direct(fake) + "/v1")
    out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "hello from localhost"
    assert out.usage.total_tokens == 7

    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("hello from localhost")
    assert chunks[-1].choices[0].finish_reason == "stop"

    reqs = fake.received(path_prefix="/v1/chat/completions")
    assert [r.json().get("stream", False) for r in reqs] == [False, True]
    assert reqs[0].sni == "localhost"
    assert reqs[0].header("authorization") == "Bearer sk-test-key"


def test_openai_responses(fake: FakeProvider, openai_client: Any) -> None:
    client = openai_client(None, ca_pem=fake.ca_pem, base_url=direct(fake) + "/v1")
    out = client.responses.create(model="gpt-4o", input="hi")
    assert out.output_text == "hello from localhost"
    assert fake.received(path_prefix="/v1/responses")[0].json()["input"] == "hi"


def test_azure_deployment_and_v1(fake: FakeProvider, azure_client: Any, openai_client: Any) -> None:
    az = azure_client(None, "ignored", ca_pem=fake.ca_pem, azure_endpoint=direct(fake))
    out = az.chat.completions.create(model="gpt4o-dz", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "hello from localhost"
    rec = fake.received()[-1]
    assert rec.url_path == "/openai/deployments/gpt4o-dz/chat/completions"
    assert rec.query["api-version"] == ["2024-10-21"]

    v1 = openai_client(None, ca_pem=fake.ca_pem, base_url=direct(fake) + "/openai/v1")
    out = v1.chat.completions.create(model="gpt4o-dz", messages=[{"role": "user", "content": "hi"}])
    assert out.model == "gpt4o-dz"
    assert fake.received()[-1].url_path == "/openai/v1/chat/completions"


def test_anthropic_json_and_stream(fake: FakeProvider, anthropic_client: Any) -> None:
    client = anthropic_client(None, ca_pem=fake.ca_pem, base_url=direct(fake))
    msg = client.messages.create(
        model="claude-opus-4-6",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        inference_geo="us",
    )
    assert msg.content[0].text == "hello from localhost"
    assert msg.usage.inference_geo == "us"

    with client.messages.stream(
        model="claude-opus-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.startswith("hello from localhost")
    assert final.stop_reason == "end_turn"
    assert final.usage.inference_geo == "global"


def test_gemini_generate_and_stream(fake: FakeProvider, genai_client: Any) -> None:
    client = genai_client(None, ca_pem=fake.ca_pem, base_url=direct(fake) + "/")
    out = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert out.text == "hello from localhost"
    rec = fake.received()[-1]
    assert rec.url_path.endswith("/models/gemini-2.5-flash:generateContent")
    assert rec.header("x-goog-api-key") == "gemini-test-key"

    text = "".join(
        c.text or "" for c in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")
    )
    assert text.startswith("hello from localhost")
    rec = fake.received()[-1]
    assert rec.url_path.endswith(":streamGenerateContent")
    assert rec.query.get("alt") == ["sse"]


def test_vertex_generate(fake: FakeProvider, genai_client: Any) -> None:
    client = genai_client(
        None, vertexai=True, location="europe-west4", ca_pem=fake.ca_pem, base_url=direct(fake) + "/"
    )
    out = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert out.text == "hello from localhost"
    rec = fake.received()[-1]
    assert rec.url_path == (
        "/v1beta1/projects/p/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
    )
    assert rec.header("authorization") == "Bearer test-token"


def test_bedrock_converse_invoke_and_sigv4(fake: FakeProvider, bedrock_client: Any) -> None:
    client = bedrock_client(None, "eu-central-1", endpoint_url=direct(fake), ca_pem=fake.ca_pem)
    out = client.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert out["output"]["message"]["content"][0]["text"] == "hello from localhost"
    rec = fake.received()[-1]
    assert rec.url_path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert rec.sigv4_valid is True
    assert "host" in rec.sigv4_signed_headers
    assert f"Credential={AWS_ACCESS_KEY_ID}/" in rec.header("authorization")
    assert "/eu-central-1/bedrock/aws4_request" in rec.header("authorization")

    body = client.invoke_model(modelId=CLAUDE, body=json.dumps({"messages": []}))["body"].read()
    assert json.loads(body)["content"][0]["text"] == "hello from localhost"
    assert fake.received()[-1].sigv4_valid is True

    events = list(
        client.converse_stream(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "hi"}]}])[
            "stream"
        ]
    )
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e]
    assert deltas == ["hello from localhost"]


def test_bedrock_tag_signed_or_not(fake: FakeProvider, bedrock_client: Any) -> None:
    signed = bedrock_client(None, "eu-central-1", endpoint_url=direct(fake), ca_pem=fake.ca_pem)
    tag_bedrock(signed, "eu", signed=True)
    signed.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    rec = fake.received()[-1]
    assert rec.header(TAG_HEADER) == "eu"
    assert TAG_HEADER.lower() in rec.sigv4_signed_headers
    assert rec.sigv4_valid is True

    unsigned = bedrock_client(None, "eu-central-1", endpoint_url=direct(fake), ca_pem=fake.ca_pem)
    tag_bedrock(unsigned, "eu", signed=False)
    unsigned.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    rec = fake.received()[-1]
    assert rec.header(TAG_HEADER) == "eu"
    assert TAG_HEADER.lower() not in rec.sigv4_signed_headers
    assert rec.sigv4_valid is True


def _tamper(headers: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k.lower() == name else v) for k, v in headers]


def test_sigv4_check_detects_tampering(fake: FakeProvider, bedrock_client: Any) -> None:
    client = bedrock_client(None, "eu-central-1", endpoint_url=direct(fake), ca_pem=fake.ca_pem)
    tag_bedrock(client, "eu", signed=True)
    client.converse(modelId=CLAUDE, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    rec = fake.received()[-1]
    args = (rec.method, rec.host_header, rec.path)
    assert verify_sigv4(*args, rec.headers, rec.body)[0] is True
    # a signed header changed, removed, the host changed, the path changed, the body changed:
    assert verify_sigv4(*args, _tamper(rec.headers, "x-data-residency", "us"), rec.body)[0] is False
    assert verify_sigv4(*args, [(k, v) for k, v in rec.headers if k.lower() != "x-data-residency"], rec.body)[0] is False
    assert verify_sigv4(*args, _tamper(rec.headers, "host", "bedrock-runtime.us-east-1.amazonaws.com"), rec.body)[0] is False
    assert verify_sigv4(rec.method, rec.host_header, rec.path.replace("converse", "invoke"), rec.headers, rec.body)[0] is False
    assert verify_sigv4(*args, rec.headers, rec.body + b" ")[0] is False
    # an unsigned header may change freely
    assert verify_sigv4(*args, [*rec.headers, ("X-Unsigned", "1")], rec.body)[0] is True


def test_sse_pacing_and_big(fake: FakeProvider) -> None:
    with httpx2.Client(verify=fake.client_ssl_context(), timeout=30) as c:
        t0 = time.monotonic()
        with c.stream("GET", direct(fake) + "/slow?n=4&seconds=1.5") as r:
            it = r.iter_lines()
            first = next(line for line in it if line.startswith("data:"))
            t_first = time.monotonic() - t0
            rest = [line for line in it if line.startswith("data:")]
        t_end = time.monotonic() - t0
        assert json.loads(first[5:]) == {"i": 0}
        assert rest[-1] == "data: [DONE]"
        assert t_first < 0.5 < 1.3 < t_end

        with c.stream("GET", direct(fake) + "/big?mb=3") as r:
            assert r.headers["content-length"] == str(3 * 1024 * 1024)
            assert sum(len(b) for b in r.iter_bytes()) == 3 * 1024 * 1024


def test_plain_site_and_sni(fake: FakeProvider) -> None:
    ctx = fake.client_ssl_context()
    with socket.create_connection(("127.0.0.1", fake.port)) as raw, ctx.wrap_socket(
        raw, server_hostname="plain.example.test"
    ) as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: plain.example.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.endswith(PLAIN_PAGE)
    rec = fake.received(host="plain.example.test")[-1]
    assert rec.sni == "plain.example.test"


def test_realtime_websocket(fake: FakeProvider) -> None:
    ctx = fake.client_ssl_context()
    with ws_client.connect(
        f"wss://localhost:{fake.port}/v1/realtime?model=gpt-realtime",
        ssl=ctx,
        proxy=None,
        open_timeout=5,
    ) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "session.created"
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
    rec = fake.received(path_prefix="/v1/realtime")[-1]
    assert rec.header("upgrade").lower() == "websocket"


def test_fake_cert_names(fake: FakeProvider) -> None:
    """The one server certificate is valid for every provider host."""
    ctx = fake.client_ssl_context()
    for host in ("api.openai.com", "bedrock-runtime.us-east-1.amazonaws.com", "onprem.llm.test"):
        with socket.create_connection(("127.0.0.1", fake.port)) as raw, ctx.wrap_socket(
            raw, server_hostname=host
        ) as tls:
            assert tls.version() is not None
    bad = ssl.create_default_context(cafile=str(fake.ca_pem))
    with socket.create_connection(("127.0.0.1", fake.port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        bad.wrap_socket(raw, server_hostname="not-in-cert.example")
