"""Reroute planning, table-driven: where a violating request may go instead, and why not."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from helpers import decide_url, policy_from

VERTEX_GLOBAL = ("https://aiplatform.googleapis.com/v1/projects/p/locations/global/publishers/"
                 "google/models/{model}:generateContent")
CONFIG = {
    "residency": {"on_violation": "reroute"},
    "azure": {"resources": {
        "res-global": {"region": "swedencentral", "deployments": {"gpt4o": "GlobalStandard"}},
        "res-eu": {"region": "swedencentral", "deployments": {"gpt4o": "DataZoneStandard",
                                                              "other": "DataZoneStandard"},
                   "api_key_env": "RES_EU_KEY"},
        "res-nokey": {"region": "germanywestcentral", "deployments": {"gpt4o": "Standard"}},
    }},
    "private_endpoints": [
        {"name": "onprem", "url": "http://10.1.2.3:8000/v1", "region": "private",
         "models": {"gpt-4o": "llama-3.3-70b", "*": "qwen-2.5"}, "api_key_env": "ONPREM"},
        {"name": "frankfurt", "url": "https://llm.de.internal/v1", "region": "de",
         "models": {"gpt-4o": "*"}},
    ],
}


KEYS = {"RES_EU_KEY": "k-res-eu", "ONPREM": "k-onprem"}  # set where the proxy loads its policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    with mock.patch.dict(os.environ, KEYS):
        return policy_from(tmp_path_factory.mktemp("rr"), CONFIG)


@pytest.mark.parametrize(
    ("url", "body", "tags", "verdict", "routed_url", "fields"),
    [
        # OpenAI: host swap to the regional host whose processing complies.
        ("https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}, ["eea_ch"],
         "reroute", "https://eu.api.openai.com/v1/chat/completions", {}),
        ("https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}, ["us"],
         "reroute", "https://us.api.openai.com/v1/chat/completions", {}),
        # Strict `eu`: OpenAI's EU region includes Switzerland; a private endpoint in de complies.
        ("https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}, ["eu"],
         "reroute", "https://llm.de.internal/v1/chat/completions", {}),
        # Vertex: location in host and path, broadest compliant first.
        (VERTEX_GLOBAL.format(model="gemini-2.5-flash"), None, ["eu"], "reroute",
         "https://aiplatform.eu.rep.googleapis.com/v1/projects/p/locations/eu/publishers/google/"
         "models/gemini-2.5-flash:generateContent", {}),
        (VERTEX_GLOBAL.format(model="gemini-2.5-flash"), None, ["nl"], "reroute",
         "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4/"
         "publishers/google/models/gemini-2.5-flash:generateContent", {}),
        (VERTEX_GLOBAL.format(model="gemini-3-ultra"), None, ["eu"], "block", None, {}),
        # Mistral: host swap.
        ("https://api.mistral.ai/v1/chat/completions", {"model": "mistral-large-latest"},
         ["eea_ch"], "reroute", "https://api.eu.mistral.ai/v1/chat/completions", {}),
        # Anthropic: body field, only for models that accept it.
        ("https://api.anthropic.com/v1/messages", {"model": "claude-opus-4-6"}, ["us"],
         "reroute", "https://api.anthropic.com/v1/messages", {"inference_geo": "us"}),
        ("https://api.anthropic.com/v1/messages", {"model": "claude-3-5-haiku"}, ["us"],
         "block", None, {}),
        # Azure: same deployment name on a compliant resource that has a key configured.
        ("https://res-global.openai.azure.com/openai/deployments/gpt4o/chat/completions",
         {"messages": []}, ["eu"], "reroute",
         "https://res-eu.openai.azure.com/openai/deployments/gpt4o/chat/completions", {}),
        ("https://res-global.openai.azure.com/openai/deployments/gpt4o/chat/completions",
         {"messages": []}, ["de"], "block", None, {}),  # res-nokey complies but has no key
        # Bedrock: never rewritten.
        ("https://bedrock-runtime.us-east-1.amazonaws.com/model/us.anthropic.claude-x/converse",
         {"messages": []}, ["eu"], "block", None, {}),
        # Private only.
        ("https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}, ["private"],
         "reroute", "http://10.1.2.3:8000/v1/chat/completions", {"model": "llama-3.3-70b"}),
        ("https://api.openai.com/v1/embeddings", {"model": "text-embedding-3-small"},
         ["private"], "reroute", "http://10.1.2.3:8000/v1/embeddings", {"model": "qwen-2.5"}),
        ("https://api.anthropic.com/v1/messages", {"model": "claude-opus-4-6"}, ["private"],
         "block", None, {}),  # not the OpenAI wire format
    ],
)
def test_reroute_plan(policy, url, body, tags, verdict, routed_url, fields):
    d = decide_url(policy, url, body=body, tags=tags)
    assert d.verdict == verdict, d.reason
    if verdict == "reroute":
        assert d.route.url == routed_url
        assert dict(d.route.body_fields) == fields
        assert d.route.location.places <= d.requirement.places  # provably compliant
    else:
        assert d.code == "no_compliant_route" and "No reroute:" in d.reason


def test_private_route_replaces_credentials(policy):
    d = decide_url(policy, "https://api.openai.com/v1/chat/completions", body={"model": "gpt-4o"},
                   tags=["private"])
    assert (d.route.credential.header, d.route.credential.env) == ("authorization", "ONPREM")
    assert d.route.credential.format == "Bearer {key}"
    for name in ("authorization", "api-key", "x-api-key", "openai-organization", "cookie"):
        assert name in d.route.remove_headers


def test_signed_requests_are_never_rewritten(policy):
    from dataclasses import replace

    from helpers import request
    req = replace(request("https://api.anthropic.com/v1/messages",
                          body={"model": "claude-opus-4-6"}, tags=["us"]), signed=True)
    d = policy.decide(req)
    assert d.verdict == "block" and "SigV4" in d.reason


def test_block_mode_never_reroutes(tmp_path):
    p = policy_from(tmp_path, {"private_endpoints": CONFIG["private_endpoints"]})
    d = decide_url(p, "https://api.openai.com/v1/chat/completions", body={"model": "gpt-4o"},
                   tags=["private"])
    assert (d.verdict, d.code) == ("block", "outside_requirement")


def test_apply_route_takes_keys_from_the_environment_only(policy, monkeypatch):
    from mitmproxy.test import tflow

    from residency_gate.proxy.flows import MissingKey, apply_route

    d = decide_url(policy, "https://api.openai.com/v1/chat/completions",
                   body={"model": "gpt-4o"}, tags=["private"])
    f = tflow.tflow()
    f.request.host, f.request.path = "api.openai.com", "/v1/chat/completions"
    f.request.headers["authorization"] = "Bearer sk-client"
    f.request.headers["openai-organization"] = "org-client"
    f.request.content = b'{"model":"gpt-4o","messages":[]}'
    monkeypatch.delenv("ONPREM", raising=False)
    with pytest.raises(MissingKey, match="ONPREM"):
        apply_route(f, d.route)
    monkeypatch.setenv("ONPREM", "k-onprem")
    apply_route(f, d.route)
    assert (f.request.scheme, f.request.host, f.request.port, f.request.path) == (
        "http", "10.1.2.3", 8000, "/v1/chat/completions")
    assert f.request.headers["authorization"] == "Bearer k-onprem"
    assert "openai-organization" not in f.request.headers
    assert f.request.headers["host"] == "10.1.2.3:8000"
    assert b'"model":"llama-3.3-70b"' in f.request.content


def test_route_whose_key_is_not_set_is_not_offered(tmp_path, monkeypatch):
    """A route needing a key variable the proxy does not have is no route: the refusal
    says which variable, and the decision carries no route (nothing claims a reroute)."""
    for name in KEYS:
        monkeypatch.delenv(name, raising=False)
    p = policy_from(tmp_path, CONFIG)
    d = decide_url(p, "https://api.openai.com/v1/chat/completions", body={"model": "gpt-4o"},
                   tags=["private"])
    assert (d.verdict, d.code, d.route) == ("block", "no_compliant_route", None)
    assert "ONPREM" in d.reason and "not set on the proxy" in d.reason
    d = decide_url(p, "https://res-global.openai.azure.com/openai/deployments/gpt4o/chat/"
                   "completions", body={"messages": []}, tags=["eu"])
    assert (d.verdict, d.route) == ("block", None) and "RES_EU_KEY" in d.reason


def test_reroute_credentials_follow_the_catalog_and_the_config(tmp_path, monkeypatch):
    """OpenAI's regional host accepts the client's key only for some projects
    (`credentials: conditional`): kept unless the operator names a key for that host, which
    then replaces it; a key variable that is not set means no reroute there."""
    url, body = "https://api.openai.com/v1/chat/completions", {"model": "gpt-4o"}
    d = decide_url(policy_from(tmp_path, CONFIG), url, body=body, tags=["eea_ch"])
    assert d.route.credential is None and "client's key kept" in d.route.description
    cfg = {"residency": {"on_violation": "reroute"},
           "reroute": {"credentials": {"eu.api.openai.com": {"api_key_env": "OAI_EU"}}}}
    monkeypatch.setenv("OAI_EU", "sk-eu-project")
    d = decide_url(policy_from(tmp_path, cfg), url, body=body, tags=["eea_ch"])
    assert (d.route.host, d.route.credential.env) == ("eu.api.openai.com", "OAI_EU")
    assert "authorization" in d.route.remove_headers
    monkeypatch.delenv("OAI_EU")
    d = decide_url(policy_from(tmp_path, cfg), url, body=body, tags=["eea_ch"])
    assert d.verdict == "block" and "OAI_EU" in d.reason and "not set on the proxy" in d.reason
