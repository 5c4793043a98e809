"""Issue 3, "Done when": `residency-gate run` as a separate process, real TLS, the
official openai / anthropic / boto3 / google-genai clients through HTTPS_PROXY,
local HTTPS servers standing in for each provider.

Every test asserts what the proxy answered AND what the fake provider received
(or that it received nothing).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import ssl
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import brotli
import httpx2
import openai
import pytest
import websockets.exceptions
import websockets.sync.client as ws_client
from botocore.exceptions import ClientError
from google.genai import errors as genai_errors

from .conftest import TAG_HEADER, Proxy, tag_bedrock
from .fakeprovider import PLAIN_HOST, PLAIN_PAGE, FakeProvider, zstd_raw_encode
from .rawhttp import connect_tunnel, request_over, tunnel_request

pytestmark = pytest.mark.e2e

CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
GEMINI = "gemini-2.5-flash"
MSG = [{"role": "user", "content": "hi"}]
BEDROCK_MSG = [{"role": "user", "content": [{"text": "hi"}]}]

AZURE = {
    "resources": {
        "myres-eu": {
            "region": "swedencentral",
            "deployments": {"gpt4o-dz": "DataZoneStandard", "gpt4o-global": "GlobalStandard"},
        }
    }
}
MAIN_CONFIG: dict[str, Any] = {"azure": AZURE}
CLIENTS_CONFIG: dict[str, Any] = {
    "azure": AZURE,
    "residency": {"clients": [{"cidr": "127.0.0.0/8", "require": "eu"}]},
}


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def gate(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    """The main proxy: no default requirement, Azure resources declared."""
    return start_module_proxy(MAIN_CONFIG)


@pytest.fixture(scope="module")
def gate_eu_clients(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    """A proxy whose client rule puts every 127.0.0.0/8 client under `eu`."""
    return start_module_proxy(CLIENTS_CONFIG)


@dataclass
class SDKs:
    openai: Callable[..., Any]
    azure: Callable[..., Any]
    anthropic: Callable[..., Any]
    genai: Callable[..., Any]
    bedrock: Callable[..., Any]


@pytest.fixture
def sdks(
    openai_client: Any, azure_client: Any, anthropic_client: Any, genai_client: Any, bedrock_client: Any
) -> SDKs:
    return SDKs(openai_client, azure_client, anthropic_client, genai_client, bedrock_client)


# ---------------------------------------------------------------------------
# one call per provider; each returns (response headers, text the SDK parsed)


def _hdrs(tag: str | None) -> dict[str, str] | None:
    return {TAG_HEADER: tag} if tag else None


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in dict(headers).items()}


def call_openai_chat(s: SDKs, proxy: Proxy, tag: str | None, **client_kw: Any) -> tuple[dict, str]:
    client = s.openai(proxy, default_headers=_hdrs(tag), **client_kw)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    return _lower(raw.headers), raw.parse().choices[0].message.content


def call_openai_responses(s: SDKs, proxy: Proxy, tag: str | None, **client_kw: Any) -> tuple[dict, str]:
    client = s.openai(proxy, default_headers=_hdrs(tag), **client_kw)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="hi")
    return _lower(raw.headers), raw.parse().output_text


def call_anthropic(s: SDKs, proxy: Proxy, tag: str | None, **create_kw: Any) -> tuple[dict, str]:
    client = s.anthropic(proxy, default_headers=_hdrs(tag))
    raw = client.messages.with_raw_response.create(
        model="claude-opus-4-6", max_tokens=16, messages=MSG, **create_kw
    )
    msg = raw.parse()
    return _lower(raw.headers), f"{msg.content[0].text}|geo={msg.usage.inference_geo}"


def call_genai(s: SDKs, proxy: Proxy, tag: str | None, **client_kw: Any) -> tuple[dict, str]:
    client = s.genai(proxy, headers=_hdrs(tag), **client_kw)
    out = client.models.generate_content(model=GEMINI, contents="hi")
    return _lower(out.sdk_http_response.headers or {}), out.text


def call_bedrock(
    s: SDKs, proxy: Proxy, tag: str | None, region: str = "eu-central-1", model: str = CLAUDE, signed: bool = False
) -> tuple[dict, str]:
    client = s.bedrock(proxy, region)
    if tag:
        tag_bedrock(client, tag, signed=signed)
    out = client.converse(modelId=model, messages=BEDROCK_MSG)
    return _lower(out["ResponseMetadata"]["HTTPHeaders"]), out["output"]["message"]["content"][0]["text"]


def call_azure(s: SDKs, proxy: Proxy, tag: str | None, resource: str, deployment: str) -> tuple[dict, str]:
    client = s.azure(proxy, resource, default_headers=_hdrs(tag))
    raw = client.chat.completions.with_raw_response.create(model=deployment, messages=MSG)
    return _lower(raw.headers), raw.parse().choices[0].message.content


def call_azure_v1(s: SDKs, proxy: Proxy, tag: str | None, resource: str, deployment: str) -> tuple[dict, str]:
    client = s.openai(
        proxy, base_url=f"https://{resource}.openai.azure.com/openai/v1", default_headers=_hdrs(tag)
    )
    raw = client.chat.completions.with_raw_response.create(model=deployment, messages=MSG)
    return _lower(raw.headers), raw.parse().choices[0].message.content


@dataclass
class Case:
    """One request: how to make it, and where it goes."""

    id: str
    call: Callable[[SDKs, Proxy, str | None], tuple[dict, str]]
    host: str
    path: str  # path prefix the provider should see

    def __repr__(self) -> str:
        return self.id


def case(id: str, host: str, path: str, fn: Callable[..., Any], **kw: Any) -> Any:
    return pytest.param(Case(id, lambda s, p, t: fn(s, p, t, **kw), host, path), id=id)


VERTEX_PATH = "/v1beta1/projects/p/locations/{loc}/publishers/google/models/" + GEMINI + ":generateContent"
CLAUDE_PATH = "/model/{prefix}anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"

UNTAGGED_ALLOWED = [
    case("openai-chat", "api.openai.com", "/v1/chat/completions", call_openai_chat),
    case("openai-responses", "api.openai.com", "/v1/responses", call_openai_responses),
    case("anthropic", "api.anthropic.com", "/v1/messages", call_anthropic),
    case("gemini-api", "generativelanguage.googleapis.com", f"/v1/models/{GEMINI}:generateContent", call_genai),
    case(
        "vertex-global", "aiplatform.googleapis.com", VERTEX_PATH.format(loc="global"),
        call_genai, vertexai=True, location="global",
    ),
    case(
        "bedrock-us-east-1", "bedrock-runtime.us-east-1.amazonaws.com", CLAUDE_PATH.format(prefix=""),
        call_bedrock, region="us-east-1",
    ),
    case(
        "azure-globalstandard", "myres-eu.openai.azure.com", "/openai/deployments/gpt4o-global/chat/completions",
        call_azure, resource="myres-eu", deployment="gpt4o-global",
    ),
]  # fmt: skip

EU_BLOCKED = [
    case("openai-global", "api.openai.com", "/v1/chat/completions", call_openai_chat),
    case("openai-responses-global", "api.openai.com", "/v1/responses", call_openai_responses),
    case("anthropic", "api.anthropic.com", "/v1/messages", call_anthropic),
    case("gemini-api", "generativelanguage.googleapis.com", "/v1/models/", call_genai),
    case(
        "vertex-global", "aiplatform.googleapis.com", VERTEX_PATH.format(loc="global"),
        call_genai, vertexai=True, location="global",
    ),
    case(
        "bedrock-global-profile", "bedrock-runtime.eu-central-1.amazonaws.com",
        CLAUDE_PATH.format(prefix="global."), call_bedrock, model="global." + CLAUDE,
    ),
    case(
        "bedrock-us-profile", "bedrock-runtime.eu-central-1.amazonaws.com",
        CLAUDE_PATH.format(prefix="us."), call_bedrock, model="us." + CLAUDE,
    ),
    case(
        "bedrock-us-east-1", "bedrock-runtime.us-east-1.amazonaws.com", CLAUDE_PATH.format(prefix=""),
        call_bedrock, region="us-east-1",
    ),
    # the eu. profile may run in eu-central-2 (Zurich) and eu-west-2 (London): not EU member states
    case(
        "bedrock-eu-profile", "bedrock-runtime.eu-central-1.amazonaws.com",
        CLAUDE_PATH.format(prefix="eu."), call_bedrock, model="eu." + CLAUDE,
    ),
    case(
        "azure-globalstandard", "myres-eu.openai.azure.com", "/openai/deployments/gpt4o-global/",
        call_azure, resource="myres-eu", deployment="gpt4o-global",
    ),
    case(
        "azure-v1-globalstandard", "myres-eu.openai.azure.com", "/openai/v1/chat/completions",
        call_azure_v1, resource="myres-eu", deployment="gpt4o-global",
    ),
    case(
        "azure-undeclared-resource", "unknownres.openai.azure.com", "/openai/deployments/gpt4o-dz/",
        call_azure, resource="unknownres", deployment="gpt4o-dz",
    ),
]  # fmt: skip

EU_ALLOWED = [
    case(
        "vertex-europe-west4", "europe-west4-aiplatform.googleapis.com", VERTEX_PATH.format(loc="europe-west4"),
        call_genai, vertexai=True, location="europe-west4",
    ),
    case(
        "vertex-eu-multiregion", "aiplatform.eu.rep.googleapis.com", VERTEX_PATH.format(loc="eu"),
        call_genai, vertexai=True, location="eu",
    ),
    case(
        "bedrock-eu-central-1", "bedrock-runtime.eu-central-1.amazonaws.com", CLAUDE_PATH.format(prefix=""),
        call_bedrock,
    ),
    case(
        "azure-datazone-eu", "myres-eu.openai.azure.com", "/openai/deployments/gpt4o-dz/chat/completions",
        call_azure, resource="myres-eu", deployment="gpt4o-dz",
    ),
    case(
        "azure-v1-datazone-eu", "myres-eu.openai.azure.com", "/openai/v1/chat/completions",
        call_azure_v1, resource="myres-eu", deployment="gpt4o-dz",
    ),
]  # fmt: skip


# ---------------------------------------------------------------------------
# what a refusal looks like, whatever the SDK


@dataclass
class Refusal:
    status: int
    headers: dict[str, str]
    shown: str  # what the SDK exception shows a developer (str(exc))
    message: str  # the message in the provider-shaped error body
    body: Any


def refusal(exc: BaseException) -> Refusal:
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        body = exc.response.json()
        if isinstance(exc, anthropic.APIStatusError):
            assert body.get("type") == "error", f"not Anthropic's error shape: {body}"
        assert isinstance(body.get("error"), dict), f"not the provider's error shape: {body}"
        message = body["error"].get("message")
        return Refusal(exc.status_code, _lower(exc.response.headers), str(exc), message, body)
    if isinstance(exc, genai_errors.APIError):
        body = exc.response.json() if exc.response is not None else exc.details
        assert isinstance(body.get("error"), dict), f"not Google's error shape: {body}"
        assert body["error"].get("code") == exc.code
        headers = _lower(exc.response.headers) if exc.response is not None else {}
        return Refusal(exc.code, headers, str(exc), body["error"].get("message"), body)
    if isinstance(exc, ClientError):
        meta = exc.response["ResponseMetadata"]
        err = exc.response.get("Error", {})
        return Refusal(meta["HTTPStatusCode"], _lower(meta["HTTPHeaders"]), str(exc), err.get("Message"), err)
    raise AssertionError(f"expected an SDK status error, got {type(exc).__name__}: {exc}") from exc


def assert_blocked(exc: BaseException, requirement: str = "eu") -> Refusal:
    r = refusal(exc)
    assert r.status == 451, f"status {r.status}, body {r.body}"
    assert r.headers.get("x-residency-decision") == "block"
    assert r.headers.get("x-residency-audit-id"), "no X-Residency-Audit-Id on a block"
    assert isinstance(r.message, str) and len(r.message) > 30, f"uninformative message: {r.message!r}"
    assert r.message in r.shown or r.message[:60] in r.shown, "the SDK exception does not show the message"
    words = r.message.lower().replace(",", " ").replace("(", " ").replace(")", " ").replace(":", " ").split()
    assert requirement in words, f"message does not name the requirement {requirement!r}: {r.message}"
    return r


def assert_nothing_received(fake: FakeProvider, settle: float = 0.2) -> None:
    time.sleep(settle)  # a forwarded request would have arrived by now
    got = fake.requests
    assert not got, "the provider received: " + ", ".join(f"{r.method} {r.host}{r.path}" for r in got)


def assert_allowed_and_received(
    fake: FakeProvider, headers: dict[str, str], text: str, host: str, path: str, *, tag_expected: bool = False
) -> Any:
    assert headers.get("x-residency-decision") == "allow", headers
    assert text.startswith(f"hello from {host}"), f"answer not from {host}: {text!r}"
    got = fake.requests
    assert [(r.host, r.url_path.startswith(path)) for r in got] == [(host, True)], [
        (r.host, r.path) for r in got
    ]
    rec = got[0]
    assert rec.sni == host
    if not tag_expected:
        assert not rec.has_header(TAG_HEADER), f"tag header reached the provider: {rec.header(TAG_HEADER)!r}"
    return rec


# ---------------------------------------------------------------------------
# untagged: allowed, marked, forwarded untouched


@pytest.mark.parametrize("c", UNTAGGED_ALLOWED)
def test_untagged_reaches_provider_marked_allow(c: Case, gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    headers, text = c.call(sdks, gate, None)
    rec = assert_allowed_and_received(fake, headers, text, c.host, c.path)
    if rec.host.startswith("bedrock-runtime."):
        assert rec.sigv4_valid is True


# ---------------------------------------------------------------------------
# tag eu: blocked where processing may leave the EU; nothing reaches the provider


@pytest.mark.parametrize("c", EU_BLOCKED)
def test_eu_tag_blocked_with_reason_and_nothing_forwarded(
    c: Case, gate: Proxy, fake: FakeProvider, sdks: SDKs
) -> None:
    with pytest.raises(Exception) as ei:
        c.call(sdks, gate, "eu")
    assert_blocked(ei.value, "eu")
    assert_nothing_received(fake)


# ---------------------------------------------------------------------------
# tag eu: allowed where processing stays in the EU; the tag does not leave


@pytest.mark.parametrize("c", EU_ALLOWED)
def test_eu_tag_allowed_in_eu(c: Case, gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    headers, text = c.call(sdks, gate, "eu")
    rec = assert_allowed_and_received(fake, headers, text, c.host, c.path)
    if rec.host.startswith("bedrock-runtime."):
        assert rec.sigv4_valid is True, "the Bedrock request arrived with a broken SigV4 signature"


def test_openai_eu_host_allowed_for_eea_ch(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    """OpenAI's "eu" residency is EEA + Switzerland: it satisfies `eea_ch` (but not `eu`)."""
    headers, text = call_openai_chat(sdks, gate, "eea_ch", data_residency="eu")
    assert_allowed_and_received(fake, headers, text, "eu.api.openai.com", "/v1/chat/completions")

    fake.reset()
    with pytest.raises(openai.APIStatusError) as ei:
        call_openai_chat(sdks, gate, "eu", data_residency="eu")
    assert_blocked(ei.value, "eu")
    assert_nothing_received(fake)


def test_anthropic_inference_geo_body_field(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    """`inference_geo: us` in the body makes api.anthropic.com satisfy `us`; without it, not."""
    headers, text = call_anthropic(sdks, gate, "us", inference_geo="us")
    rec = assert_allowed_and_received(fake, headers, text, "api.anthropic.com", "/v1/messages")
    assert text.endswith("|geo=us")
    assert rec.json()["inference_geo"] == "us"

    fake.reset()
    with pytest.raises(anthropic.APIStatusError) as ei:
        call_anthropic(sdks, gate, "us")
    assert_blocked(ei.value, "us")
    assert_nothing_received(fake)


# ---------------------------------------------------------------------------
# the tag header: removed unless a signature covers it


def test_bedrock_signed_tag_kept_and_signature_valid(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    headers, text = call_bedrock(sdks, gate, "eu", signed=True)
    host = "bedrock-runtime.eu-central-1.amazonaws.com"
    rec = assert_allowed_and_received(fake, headers, text, host, "/model/", tag_expected=True)
    assert "x-data-residency" in rec.sigv4_signed_headers
    assert rec.header(TAG_HEADER) == "eu", "a signed tag header must stay (removing it breaks SigV4)"
    assert rec.sigv4_valid is True


def test_bedrock_unsigned_tag_removed_and_signature_valid(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    headers, text = call_bedrock(sdks, gate, "eu", signed=False)
    host = "bedrock-runtime.eu-central-1.amazonaws.com"
    rec = assert_allowed_and_received(fake, headers, text, host, "/model/")
    assert "x-data-residency" not in rec.sigv4_signed_headers
    assert rec.sigv4_valid is True


def test_bedrock_signed_tag_still_enforced(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    """A signed tag is kept on the wire, but it is still a requirement."""
    with pytest.raises(ClientError) as ei:
        call_bedrock(sdks, gate, "eu", model="us." + CLAUDE, signed=True)
    assert_blocked(ei.value, "eu")
    assert_nothing_received(fake)


# ---------------------------------------------------------------------------
# unknown tag: 400, nothing forwarded


def test_unknown_tag_is_400_and_not_forwarded(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        call_openai_chat(sdks, gate, "atlantis")
    assert ei.value.status_code == 400
    assert "atlantis" in str(ei.value).lower()
    assert ei.value.response.headers.get("x-residency-decision") != "allow"
    assert_nothing_received(fake)
    # ... and audited
    audit_id = ei.value.response.headers.get("x-residency-audit-id")
    records = [r for r in audit_records(gate) if r.get("kind") == "decision" and r["id"] == audit_id]
    assert len(records) == 1, "the unknown-tag refusal was not audited"
    (rec,) = records
    # the tag as sent is a field a security team can filter on, not just words in `reason`
    assert (rec["decision"], rec["status"], rec["code"], rec["tags"]) == (
        "block", 400, "unknown_tag", ["atlantis"])


# ---------------------------------------------------------------------------
# client CIDR rules; narrowing and intersecting


def test_client_rule_applies_without_tag(gate_eu_clients: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    with pytest.raises(openai.APIStatusError) as ei:
        call_openai_chat(sdks, gate_eu_clients, None)
    assert_blocked(ei.value, "eu")
    assert_nothing_received(fake)

    headers, text = call_genai(sdks, gate_eu_clients, None, vertexai=True, location="europe-west4")
    assert_allowed_and_received(
        fake, headers, text, "europe-west4-aiplatform.googleapis.com", VERTEX_PATH.format(loc="europe-west4")
    )


@pytest.mark.parametrize("widening_tag", ["global", "us", "eu, global"])
def test_client_rule_cannot_be_widened_by_tag(
    widening_tag: str, gate_eu_clients: Proxy, fake: FakeProvider, sdks: SDKs
) -> None:
    with pytest.raises(openai.APIStatusError) as ei:
        call_openai_chat(sdks, gate_eu_clients, widening_tag)
    r = refusal(ei.value)
    assert r.status == 451
    assert r.headers.get("x-residency-decision") == "block"
    assert_nothing_received(fake)


def test_client_rule_can_be_narrowed_by_tag(gate_eu_clients: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    # eu ∩ de: the Netherlands (europe-west4) no longer complies, Frankfurt (europe-west3) does
    with pytest.raises(genai_errors.APIError) as ei:
        call_genai(sdks, gate_eu_clients, "de", vertexai=True, location="europe-west4")
    assert_blocked(ei.value, "de")
    assert_nothing_received(fake)

    headers, text = call_genai(sdks, gate_eu_clients, "de", vertexai=True, location="europe-west3")
    assert_allowed_and_received(
        fake, headers, text, "europe-west3-aiplatform.googleapis.com", VERTEX_PATH.format(loc="europe-west3")
    )


def _raw_client(proxy: Proxy) -> httpx2.Client:
    return httpx2.Client(proxy=proxy.url, verify=proxy.ssl_context(), timeout=30, trust_env=False)


VERTEX_BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()


@pytest.mark.parametrize("form", ["comma", "repeated"])
def test_two_tags_intersect(form: str, gate: Proxy, fake: FakeProvider) -> None:
    tags = [(TAG_HEADER, "eu, de")] if form == "comma" else [(TAG_HEADER, "eu"), (TAG_HEADER, "de")]
    with _raw_client(gate) as c:
        nl = c.post(
            "https://europe-west4-aiplatform.googleapis.com" + VERTEX_PATH.format(loc="europe-west4"),
            headers=[*tags, ("Authorization", "Bearer t"), ("Content-Type", "application/json")],
            content=VERTEX_BODY,
        )
        assert nl.status_code == 451, nl.text
        assert nl.headers.get("x-residency-decision") == "block"
        assert_nothing_received(fake)

        de = c.post(
            "https://europe-west3-aiplatform.googleapis.com" + VERTEX_PATH.format(loc="europe-west3"),
            headers=[*tags, ("Authorization", "Bearer t"), ("Content-Type", "application/json")],
            content=VERTEX_BODY,
        )
        assert de.status_code == 200, de.text
        assert de.headers.get("x-residency-decision") == "allow"
    got = fake.received()
    assert [r.host for r in got] == ["europe-west3-aiplatform.googleapis.com"]
    assert not got[0].has_header(TAG_HEADER)


def test_disjoint_tags_allow_nothing(gate: Proxy, fake: FakeProvider) -> None:
    """eu ∩ us is empty: not even an EU or a US endpoint complies."""
    with _raw_client(gate) as c:
        for loc in ("europe-west4", "us-central1"):
            r = c.post(
                f"https://{loc}-aiplatform.googleapis.com" + VERTEX_PATH.format(loc=loc),
                headers={TAG_HEADER: "eu,us", "Authorization": "Bearer t", "Content-Type": "application/json"},
                content=VERTEX_BODY,
            )
            assert r.status_code == 451, (loc, r.status_code, r.text)
    assert_nothing_received(fake)


# ---------------------------------------------------------------------------
# streaming


def test_sse_first_byte_long_before_end(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.openai(gate, default_headers={TAG_HEADER: "eea_ch"}, data_residency="eu")
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MSG,
        stream=True,
        extra_headers={"X-Fake-Stream-Seconds": "2.5", "X-Fake-Stream-Events": "6"},
    )
    assert stream.response.headers.get("x-residency-decision") == "allow"
    times, text = [], ""
    for chunk in stream:
        times.append(time.monotonic() - t0)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text.startswith("hello from eu.api.openai.com")
    assert len(times) >= 6
    # the fake sends the first event at once and the last chunk ~2.1 s later
    assert times[0] < 1.2, f"first event after {times[0]:.2f}s (last at {times[-1]:.2f}s): the proxy buffers SSE"
    assert times[-1] - times[0] > 1.5, f"events arrived together ({times}): the proxy buffers SSE"
    assert fake.received()[0].json()["stream"] is True


def test_gemini_sse_streams(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.genai(gate, vertexai=True, location="europe-west4", headers={TAG_HEADER: "eu"})
    t0 = time.monotonic()
    times, text = [], ""
    for chunk in client.models.generate_content_stream(model=GEMINI, contents="hi"):
        times.append(time.monotonic() - t0)
        text += chunk.text or ""
    assert text.startswith("hello from europe-west4-aiplatform.googleapis.com")
    rec = fake.received()[0]
    assert rec.url_path.endswith(":streamGenerateContent") and rec.query.get("alt") == ["sse"]
    assert not rec.has_header(TAG_HEADER)


@pytest.mark.slow
def test_big_response_streams_with_flat_memory(gate: Proxy, fake: FakeProvider) -> None:
    mb = 100
    before = gate.memory_kb()
    total = 0
    with _raw_client(gate) as c, c.stream("GET", f"https://api.openai.com/big?mb={mb}") as r:
        assert r.status_code == 200
        assert r.headers.get("x-residency-decision") == "allow"
        for chunk in r.iter_raw(1 << 20):
            total += len(chunk)
    after = gate.memory_kb()
    assert total == mb * 1024 * 1024
    grew_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert grew_mb < 40, f"proxy peak memory grew by {grew_mb:.0f} MB for a {mb} MB response: it buffers"


# ---------------------------------------------------------------------------
# WebSocket (OpenAI Realtime): decided on the upgrade request


def test_realtime_upgrade_refused_451(gate: Proxy, fake: FakeProvider) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as ei:
        ws_client.connect(
            "wss://api.openai.com/v1/realtime?model=gpt-realtime",
            proxy=gate.url,
            ssl=gate.ssl_context(),
            additional_headers={TAG_HEADER: "eu", "Authorization": "Bearer sk-test"},
            open_timeout=10,
        )
    resp = ei.value.response
    assert resp.status_code == 451
    assert resp.headers.get("X-Residency-Decision") == "block"
    assert resp.headers.get("X-Residency-Audit-Id")
    assert_nothing_received(fake)


def test_realtime_upgrade_allowed_when_compliant(gate: Proxy, fake: FakeProvider) -> None:
    with ws_client.connect(
        "wss://eu.api.openai.com/v1/realtime?model=gpt-realtime",
        proxy=gate.url,
        ssl=gate.ssl_context(),
        additional_headers={TAG_HEADER: "eea_ch", "Authorization": "Bearer sk-test"},
        open_timeout=10,
    ) as ws:
        assert ws.response.headers.get("X-Residency-Decision") == "allow"
        hello = json.loads(ws.recv(timeout=10))
        assert hello == {"type": "session.created", "host": "eu.api.openai.com"}
        ws.send('{"type":"response.create"}')
        assert ws.recv(timeout=10) == '{"type":"response.create"}'
    rec = fake.received(path_prefix="/v1/realtime")[0]
    assert rec.host == "eu.api.openai.com"
    assert not rec.has_header(TAG_HEADER)


# ---------------------------------------------------------------------------
# non-LLM site: a plain tunnel, its own certificate


def test_non_llm_site_tunnelled_with_own_certificate(gate: Proxy, fake: FakeProvider) -> None:
    # trusting ONLY the site's own CA (not the proxy's) must work ...
    sock = connect_tunnel(gate.host, gate.port, PLAIN_HOST)
    with fake.client_ssl_context().wrap_socket(sock, server_hostname=PLAIN_HOST) as tls:
        issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
        resp = request_over(tls, "GET", "/", PLAIN_HOST, [(TAG_HEADER, "eu")])
    assert resp.status == 200 and resp.body == PLAIN_PAGE
    assert resp.header("X-Residency-Decision") is None, "the proxy looked inside a non-LLM tunnel"
    assert "mitmproxy" not in json.dumps(issuer).lower()
    rec = fake.received(host=PLAIN_HOST)[0]
    assert rec.sni == PLAIN_HOST
    assert rec.header(TAG_HEADER) == "eu", "the tunnel is untouched: nothing removes headers inside it"

    # ... and trusting only the proxy's CA must fail: the proxy did not intercept
    sock = connect_tunnel(gate.host, gate.port, PLAIN_HOST)
    with pytest.raises(ssl.SSLCertVerificationError):
        gate.ssl_context().wrap_socket(sock, server_hostname=PLAIN_HOST)
    sock.close()


def test_llm_host_is_intercepted(gate: Proxy, fake: FakeProvider) -> None:
    """The converse of the tunnel test: an LLM host is served with the proxy's certificate."""
    sock = connect_tunnel(gate.host, gate.port, "api.openai.com")
    with pytest.raises(ssl.SSLCertVerificationError):
        fake.client_ssl_context().wrap_socket(sock, server_hostname="api.openai.com")
    sock.close()
    sock = connect_tunnel(gate.host, gate.port, "api.openai.com")
    with gate.ssl_context().wrap_socket(sock, server_hostname="api.openai.com") as tls:
        assert tls.getpeercert()["subjectAltName"]


# ---------------------------------------------------------------------------
# domain fronting: the proxy decides on what it connects to


CHAT_BODY = json.dumps({"model": "gpt-4o", "messages": MSG}).encode()
FRONTING = [
    # (CONNECT target, TLS SNI, Host header)
    pytest.param("eu.api.openai.com", "eu.api.openai.com", "api.openai.com", id="connect-eu-host-global"),
    pytest.param("api.openai.com", "api.openai.com", "eu.api.openai.com", id="connect-global-host-eu"),
    pytest.param("api.openai.com", "eu.api.openai.com", "eu.api.openai.com", id="connect-global-sni-eu"),
    pytest.param("plain.example.test", "eu.api.openai.com", "eu.api.openai.com", id="connect-nonllm-sni-eu"),
]


@pytest.mark.parametrize(("connect", "sni", "host"), FRONTING)
def test_domain_fronting_never_allowed(
    connect: str, sni: str, host: str, gate: Proxy, fake: FakeProvider
) -> None:
    try:
        resp = tunnel_request(
            gate.host,
            gate.port,
            connect_host=connect,
            ssl_context=gate.ssl_context(),
            sni=sni,
            path="/v1/chat/completions",
            host_header=host,
            headers=[(TAG_HEADER, "eea_ch"), ("Content-Type", "application/json"), ("Authorization", "Bearer k")],
            body=CHAT_BODY,
        )
    except (ssl.SSLError, ConnectionError, OSError):
        resp = None  # refusing the handshake or the tunnel is a refusal too
    if resp is not None:
        assert resp.header("X-Residency-Decision") != "allow"
        assert resp.status in (421, 451), (resp.status, resp.body[:300])
    time.sleep(0.2)
    forwarded = [(r.sni, r.host, r.path) for r in fake.requests if r.url_path.startswith("/v1/")]
    assert not forwarded, f"fronted request forwarded: {forwarded}"


# ---------------------------------------------------------------------------
# request bodies: compressed ones are classified, malformed ones refused


AZURE_V1 = "https://myres-eu.openai.azure.com/openai/v1/chat/completions"
COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd_raw_encode,  # a valid zstd frame of stored blocks
}


@pytest.mark.parametrize("encoding", list(COMPRESS))
def test_compressed_body_is_classified(encoding: str, gate: Proxy, fake: FakeProvider) -> None:
    """The Azure v1 path names the deployment only in the body: the proxy must decode it."""
    headers = {
        TAG_HEADER: "eu",
        "Content-Type": "application/json",
        "Content-Encoding": encoding,
        "api-key": "k",
    }
    good = {"model": "gpt4o-dz", "messages": MSG}
    bad = {"model": "gpt4o-global", "messages": MSG}
    with _raw_client(gate) as c:
        r = c.post(AZURE_V1, headers=headers, content=COMPRESS[encoding](json.dumps(bad).encode()))
        assert r.status_code == 451, r.text
        assert_nothing_received(fake)
        r = c.post(AZURE_V1, headers=headers, content=COMPRESS[encoding](json.dumps(good).encode()))
        assert r.status_code == 200, r.text
        assert r.headers.get("x-residency-decision") == "allow"
    [rec] = fake.received()
    assert rec.json() == good, "the body reached the provider altered"


@pytest.mark.parametrize(
    ("url", "tag"),
    [
        pytest.param(AZURE_V1, "eu", id="azure-v1"),
        pytest.param("https://eu.api.openai.com/v1/chat/completions", "eea_ch", id="openai-eu"),
        pytest.param("https://api.anthropic.com/v1/messages", "us", id="anthropic"),
    ],
)
def test_malformed_json_with_requirement_refused(url: str, tag: str, gate: Proxy, fake: FakeProvider) -> None:
    with _raw_client(gate) as c:
        r = c.post(
            url,
            headers={TAG_HEADER: tag, "Content-Type": "application/json", "Authorization": "Bearer k"},
            content=b'{"model": "gpt4o-dz", "messages": [',
        )
    assert r.status_code in (400, 451), (r.status_code, r.text)
    assert r.headers.get("x-residency-decision") != "allow"
    assert_nothing_received(fake)


def test_corrupt_gzip_with_requirement_refused(gate: Proxy, fake: FakeProvider) -> None:
    with _raw_client(gate) as c:
        r = c.post(
            AZURE_V1,
            headers={TAG_HEADER: "eu", "Content-Type": "application/json", "Content-Encoding": "gzip"},
            # cut inside the deflate stream: no decoder can recover the JSON
            content=gzip.compress(json.dumps({"model": "gpt4o-dz", "messages": MSG}).encode())[:30],
        )
    assert r.status_code in (400, 451), (r.status_code, r.text)
    assert r.headers.get("x-residency-decision") != "allow"
    assert_nothing_received(fake)


# ---------------------------------------------------------------------------
# the audit id names a decision


def audit_records(proxy: Proxy) -> list[dict[str, Any]]:
    out = []
    for line in proxy.audit_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_decision_record_names_the_request_without_secrets(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    prompt = "PROMPT-d3c1a2f9-never-in-the-audit"
    api_key = "azure-key-7b0e4c55-never-in-the-audit"
    client = sdks.azure(gate, "myres-eu", api_key=api_key, default_headers={TAG_HEADER: "eu"})
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="gpt4o-global", messages=[{"role": "user", "content": prompt}])
    r = assert_blocked(ei.value)
    sent = ei.value.response.request
    assert_nothing_received(fake)
    by_id = {rec.get("id"): rec for rec in audit_records(gate) if rec.get("kind") == "decision"}
    rec = by_id.get(r.headers["x-residency-audit-id"])
    assert rec is not None, "no decision record with the X-Residency-Audit-Id"
    assert rec["decision"] == "block"
    assert rec["method"] == "POST"
    assert rec["url"] == "https://myres-eu.openai.azure.com/openai/deployments/gpt4o-global/chat/completions"
    assert rec.get("model") == "gpt4o-global"
    assert "127.0.0.1" in json.dumps(rec.get("client"))
    assert "eu" in json.dumps(rec.get("requirement"))
    assert rec.get("body_sha256") == hashlib.sha256(sent.content).hexdigest()
    everything = gate.audit_text()
    assert prompt not in everything, "a prompt was written to the audit log"
    assert api_key not in everything, "a credential was written to the audit log"


def test_audit_id_identifies_each_decision(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    ids = []
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as ei:
            call_openai_chat(sdks, gate, "eu")
        ids.append(assert_blocked(ei.value).headers["x-residency-audit-id"])
    assert len(set(ids)) == 2, f"audit ids are not unique: {ids}"
    deadline = time.monotonic() + 5
    while True:
        text = gate.audit_text() + gate.log_text()
        missing = [i for i in ids if i not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not missing, f"audit ids {missing} not found in {gate.audit_dir} or the proxy log"
    records = [json.loads(line) for line in gate.audit_text().splitlines() if line.startswith("{")]
    by_id = {r.get("id"): r for r in records if r.get("id")}
    for i in ids:
        assert i in by_id, f"no audit record with id {i}"
        assert by_id[i].get("decision") == "block"


# ---------------------------------------------------------------------------
# clean shutdown


def test_sigterm_stops_cleanly_with_open_connections(
    start_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    proxy = start_proxy(MAIN_CONFIG)
    c = _raw_client(proxy)  # keep-alive connections stay open across the SIGTERM
    r = c.post(
        "https://api.openai.com/v1/chat/completions",
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        content=CHAT_BODY,
    )
    assert r.status_code == 200 and r.headers.get("x-residency-decision") == "allow"
    try:
        rc = proxy.stop()
    finally:
        c.close()
    log = proxy.log_text()
    assert rc == 0, f"exit status {rc} after SIGTERM\n{log[-3000:]}"
    assert "Traceback" not in log, f"tracebacks in the log of a clean shutdown:\n{log[-3000:]}"
    decisions = [rec for rec in audit_records(proxy) if rec.get("kind") == "decision"]
    assert any(rec.get("url") == "https://api.openai.com/v1/chat/completions" for rec in decisions), (
        "the decision record is not in the audit files after shutdown"
    )
