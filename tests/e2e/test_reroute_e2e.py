"""Issue 5, "Done when": reroutes through the running proxy with the official SDKs.

Each test asserts where the request really arrived (host, SNI, path, body,
credentials) and what the client was told; refusals assert nothing arrived.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from botocore.exceptions import ClientError
from google.genai import errors as genai_errors

from .conftest import TAG_HEADER, Proxy
from .fakeprovider import FakeProvider
from .test_proxy_sdks import (
    BEDROCK_MSG,
    MSG,
    SDKs,
    _lower,
    assert_nothing_received,
    refusal,
)

pytestmark = pytest.mark.e2e

CLIENT_KEY = "sk-client-secret-do-not-forward"
ONPREM_KEY = "onprem-key-1234"
AZURE_EU_KEY = "azure-eu-key-5678"

REROUTE_CONFIG: dict[str, Any] = {
    "residency": {"on_violation": "reroute"},
    "azure": {
        "resources": {
            "myres-global": {"region": "swedencentral", "deployments": {"gpt4o": "GlobalStandard"}},
            "myres-eu": {"region": "swedencentral", "deployments": {"gpt4o": "DataZoneStandard"},
                         "api_key_env": "RG_TEST_AZURE_EU_KEY"},
        }
    },
    "private_endpoints": [
        {"name": "onprem", "url": "https://onprem.llm.test/v1", "region": "private",
         "models": {"gpt-4o": "llama-3.3-70b"}, "api_key_env": "RG_TEST_ONPREM_KEY"},
    ],
}


@pytest.fixture(scope="module")
def gate(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    mp = pytest.MonkeyPatch()
    mp.setenv("RG_TEST_ONPREM_KEY", ONPREM_KEY)
    mp.setenv("RG_TEST_AZURE_EU_KEY", AZURE_EU_KEY)
    try:
        return start_module_proxy(REROUTE_CONFIG)
    finally:
        mp.undo()


@pytest.fixture
def sdks(openai_client: Any, azure_client: Any, anthropic_client: Any, genai_client: Any,
         bedrock_client: Any) -> SDKs:
    return SDKs(openai_client, azure_client, anthropic_client, genai_client, bedrock_client)


def only_request(fake: FakeProvider):
    got = fake.requests
    assert len(got) == 1, [(r.host, r.path) for r in got]
    return got[0]


def assert_rerouted(headers: dict[str, str], to: str) -> None:
    assert headers.get("x-residency-decision") == "reroute", headers
    assert headers.get("x-residency-routed-to") == to, headers
    assert headers.get("x-residency-audit-id"), headers


def decision_record(proxy: Proxy, audit_id: str) -> dict:
    for path in sorted(proxy.audit_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("id") == audit_id:
                return record
    raise AssertionError(f"no audit record {audit_id}")


def test_openai_global_rerouted_to_eu_host(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.openai(gate, api_key=CLIENT_KEY, default_headers={TAG_HEADER: "eea_ch"})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    headers = _lower(raw.headers)
    assert_rerouted(headers, "eu.api.openai.com")
    assert raw.parse().choices[0].message.content.startswith("hello from eu.api.openai.com")
    rec = only_request(fake)
    assert (rec.host, rec.sni, rec.url_path) == ("eu.api.openai.com", "eu.api.openai.com",
                                                 "/v1/chat/completions")
    assert not rec.has_header(TAG_HEADER)
    # Same provider, same organisation: the client's own key stays valid there.
    assert rec.header("authorization") == f"Bearer {CLIENT_KEY}"
    record = decision_record(gate, headers["x-residency-audit-id"])
    assert (record["decision"], record["routed_to"], record["host"]) == (
        "reroute", "eu.api.openai.com", "api.openai.com")
    assert record["routed_places"] == ["eea_ch"]  # region names; the record names the catalog revision


def test_vertex_global_rerouted_to_eu_location(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.genai(gate, vertexai=True, location="global", headers={TAG_HEADER: "eu"})
    out = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    headers = _lower(out.sdk_http_response.headers or {})
    assert_rerouted(headers, "aiplatform.eu.rep.googleapis.com")
    rec = only_request(fake)
    assert rec.host == rec.sni == "aiplatform.eu.rep.googleapis.com"
    # Host and path agree on the location.
    assert "/locations/eu/" in rec.url_path and "/locations/global/" not in rec.url_path
    assert rec.url_path.endswith("/models/gemini-2.5-flash:generateContent")


def test_vertex_no_reroute_when_model_not_offered(gate: Proxy, fake: FakeProvider,
                                                  sdks: SDKs) -> None:
    client = sdks.genai(gate, vertexai=True, location="global", headers={TAG_HEADER: "eu"})
    with pytest.raises(genai_errors.APIError) as ei:
        client.models.generate_content(model="gemini-3-ultra-preview", contents="hi")
    r = refusal(ei.value)
    assert r.status == 451
    assert r.headers.get("x-residency-decision") == "block"
    assert "not offered" in r.message and "gemini-3-ultra-preview" in r.message
    assert_nothing_received(fake)


def test_anthropic_inference_geo_set_for_us(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.anthropic(gate, default_headers={TAG_HEADER: "us"})
    raw = client.messages.with_raw_response.create(model="claude-opus-4-6", max_tokens=16,
                                                   messages=MSG)
    headers = _lower(raw.headers)
    assert_rerouted(headers, "api.anthropic.com")
    assert raw.parse().usage.inference_geo == "us"
    rec = only_request(fake)
    body = json.loads(rec.decoded_body)
    assert body["inference_geo"] == "us"
    assert body["messages"] == MSG and body["model"] == "claude-opus-4-6"


def test_anthropic_model_without_inference_geo_refused(gate: Proxy, fake: FakeProvider,
                                                        sdks: SDKs) -> None:
    client = sdks.anthropic(gate, default_headers={TAG_HEADER: "us"})
    with pytest.raises(anthropic.APIStatusError) as ei:
        client.messages.create(model="claude-3-5-sonnet-20241022", max_tokens=16, messages=MSG)
    r = refusal(ei.value)
    assert r.status == 451 and "not offered" in r.message
    assert_nothing_received(fake)


def test_private_tag_served_by_private_endpoint(gate: Proxy, fake: FakeProvider,
                                                sdks: SDKs) -> None:
    client = sdks.openai(gate, api_key=CLIENT_KEY, default_headers={
        TAG_HEADER: "private", "OpenAI-Organization": "org-client"})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    headers = _lower(raw.headers)
    assert_rerouted(headers, "onprem.llm.test")
    rec = only_request(fake)
    assert (rec.host, rec.url_path) == ("onprem.llm.test", "/v1/chat/completions")
    assert json.loads(rec.decoded_body)["model"] == "llama-3.3-70b"
    assert rec.header("authorization") == f"Bearer {ONPREM_KEY}"
    # The client's provider credential goes nowhere: not to the private endpoint,
    # not in any header or body the fake saw.
    assert not rec.has_header("openai-organization")
    everything = json.dumps([r.headers for r in fake.requests]) + rec.decoded_body.decode()
    assert CLIENT_KEY not in everything
    record = decision_record(gate, headers["x-residency-audit-id"])
    assert CLIENT_KEY not in json.dumps(record)


def test_private_endpoint_without_mapped_model_refused(gate: Proxy, fake: FakeProvider,
                                                       sdks: SDKs) -> None:
    client = sdks.openai(gate, api_key=CLIENT_KEY, default_headers={TAG_HEADER: "private"})
    with pytest.raises(Exception) as ei:
        client.chat.completions.create(model="o3", messages=MSG)
    r = refusal(ei.value)
    assert r.status == 451 and "onprem" in r.message and "'o3'" in r.message
    assert_nothing_received(fake)


def test_azure_rerouted_to_compliant_resource_with_its_own_key(gate: Proxy, fake: FakeProvider,
                                                                sdks: SDKs) -> None:
    client = sdks.azure(gate, "myres-global", api_key=CLIENT_KEY,
                        default_headers={TAG_HEADER: "eu"})
    raw = client.chat.completions.with_raw_response.create(model="gpt4o", messages=MSG)
    headers = _lower(raw.headers)
    assert_rerouted(headers, "myres-eu.openai.azure.com")
    rec = only_request(fake)
    assert rec.host == rec.sni == "myres-eu.openai.azure.com"
    assert rec.url_path.startswith("/openai/deployments/gpt4o/chat/completions")
    assert rec.header("api-key") == AZURE_EU_KEY
    assert CLIENT_KEY not in json.dumps(rec.headers)


def test_bedrock_refused_with_advice(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.bedrock(gate, "us-east-1")
    from .conftest import tag_bedrock

    tag_bedrock(client, "eu", signed=False)
    with pytest.raises(ClientError) as ei:
        client.converse(modelId="us.anthropic.claude-3-5-sonnet-20240620-v1:0",
                        messages=BEDROCK_MSG)
    r = refusal(ei.value)
    assert r.status == 451
    assert "SigV4" in r.message  # why it was not rerouted
    assert "bedrock-runtime.eu-central-1.amazonaws.com" in r.message  # what to call instead
    assert_nothing_received(fake)


def test_compliant_request_is_not_rerouted(gate: Proxy, fake: FakeProvider, sdks: SDKs) -> None:
    client = sdks.openai(gate, api_key=CLIENT_KEY, default_headers={TAG_HEADER: "us"},
                         base_url="https://us.api.openai.com/v1")
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    headers = _lower(raw.headers)
    assert headers.get("x-residency-decision") == "allow"
    assert "x-residency-routed-to" not in headers
    assert only_request(fake).host == "us.api.openai.com"
