"""Every provider rule, case by case, from the providers' documentation.

The table is tests/unit/provider_cases.yaml; each case says where a request is
processed and which requirements it satisfies or violates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import decide_url, policy_from, shipped_catalog
from residency_gate.core.decision import ALLOW, BLOCK
from residency_gate.core.extract import first_match
from residency_gate.core.request import RequestView

CASES = yaml.safe_load((Path(__file__).parent / "provider_cases.yaml").read_text())


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    cache: dict = {}

    def get(azure):
        key = repr(azure)
        if key not in cache:
            config = {"azure": {"resources": azure}} if azure else {}
            cache[key] = policy_from(tmp_path_factory.mktemp("p"), config)
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_provider_case(case, policies):
    policy = policies(case.get("azure"))
    expect = case["expect"]
    method = case.get("method", "POST")
    body = case.get("body")
    untagged = decide_url(policy, case["url"], method=method, body=body)
    assert untagged.provider == expect["provider"]
    if expect["provider"] is None:
        assert untagged.code == "not_llm"
        return
    assert untagged.verdict == ALLOW, "no requirement: always allowed"
    assert untagged.endpoint_id == expect["endpoint"]
    if "model" in expect:
        assert untagged.model == expect["model"]
    places = untagged.location.places
    if expect.get("unknown"):
        assert places is None, untagged.location
    else:
        assert places is not None, untagged.location.detail
        for p in expect.get("places_include", ()):
            assert p in places, f"{p} should be possible: {untagged.location.detail}"
        for p in expect.get("places_exclude", ()):
            assert p not in places, f"{p} should not be possible: {untagged.location.detail}"
    for tag in expect.get("satisfies", ()):
        d = decide_url(policy, case["url"], method=method, body=body, tags=[tag])
        assert d.verdict == ALLOW, f"tag {tag}: {d.reason}"
    for tag in expect.get("violates", ()):
        d = decide_url(policy, case["url"], method=method, body=body, tags=[tag])
        assert d.verdict == BLOCK and d.status == 451, f"tag {tag}: {d.reason}"
        assert tag in d.reason


def test_every_provider_has_a_case():
    covered = {c["expect"]["provider"] for c in CASES}
    assert set(shipped_catalog().providers) <= covered


@pytest.mark.parametrize(
    ("url", "model"),
    [
        ("https://bedrock-runtime.us-east-1.amazonaws.com/model/"
         "arn%3Aaws%3Abedrock%3Aeu-west-1%3A123456789012%3Ainference-profile%2Feu.meta.llama3/converse",
         "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.meta.llama3"),
        ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
         "gemini-2.5-flash"),
    ],
)
def test_model_extraction_decodes_and_stops_at_separators(url, model):
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    endpoint, captures = shipped_catalog().match(parts.hostname)
    view = RequestView(parts.hostname, parts.path, parts.query, None, captures)
    assert first_match(endpoint.model, view) == model
