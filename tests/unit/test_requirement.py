"""Requirement semantics: tags, client rules, users, zones and the default intersect."""

from __future__ import annotations

import pytest

from helpers import decide_url, policy_from
from residency_gate.core.requirement import UnknownTag

VERTEX_NL = ("https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4/"
             "publishers/google/models/gemini-2.5-flash:generateContent")
OPENAI_US = "https://us.api.openai.com/v1/chat/completions"

CONFIG = {
    "residency": {
        "zones": {"benelux": ["be", "nl", "lu"], "emea": ["eea", "ch", "gb"]},
        "default": "global",
        "clients": [
            {"cidr": "10.20.0.0/16", "require": "eu"},
            {"cidr": "10.20.5.0/24", "require": "de"},
            {"cidr": "fd00::/8", "require": "eu"},
            {"user": "hr-bot", "require": ["de", "nl"]},
        ],
    }
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return policy_from(tmp_path_factory.mktemp("r"), CONFIG)


@pytest.mark.parametrize(
    ("tags", "client", "user", "expected", "sources"),
    [
        ((), "192.0.2.1", None, "anywhere", ["default"]),
        (("eu",), "192.0.2.1", None, "eu", ["default", "tag"]),  # tag narrows the default
        ((), "10.20.1.1", None, "eu", ["client"]),  # client rule replaces the default
        (("global",), "10.20.1.1", None, "eu", ["client", "tag"]),  # tag cannot widen
        ((), "10.20.5.7", None, "de", ["client", "client"]),  # nested rules intersect
        (("eu", "benelux"), None, None, "be + lu + nl", ["default", "tag", "tag"]),
        (("eu,benelux",), None, None, "be + lu + nl", ["default", "tag"]),  # comma = repeated
        ((), "::ffff:10.20.1.1", None, "eu", ["client"]),  # IPv4-mapped IPv6
        ((), "fd00::1", None, "eu", ["client"]),
        ((), "192.0.2.1", "hr-bot", "de + nl", ["user"]),
        (("EU ",), None, None, "eu", ["default", "tag"]),  # case and spaces
        (("emea",), None, None, "eea_ch + gb", ["default", "tag"]),
    ],
)
def test_requirement_intersection(policy, tags, client, user, expected, sources):
    requirement = policy.policy.requirements.resolve(tags, client, user)
    assert policy.regions.describe(requirement.places) == expected
    assert [p.source for p in requirement.parts] == sources


def test_unknown_tag_is_an_error(policy):
    with pytest.raises(UnknownTag):
        policy.policy.requirements.resolve(["atlantis"], None, None)
    d = decide_url(policy, OPENAI_US, tags=["atlantis"], body={"model": "gpt-4o"})
    assert (d.verdict, d.status, d.code) == ("block", 400, "unknown_tag")
    assert "atlantis" in d.reason and "benelux" in d.reason


def test_no_requirement_allows(tmp_path):
    policy = policy_from(tmp_path, {})
    d = decide_url(policy, "https://api.openai.com/v1/chat/completions", body={"model": "x"})
    assert (d.verdict, d.code) == ("allow", "no_requirement")


def test_empty_intersection_blocks_everything(policy):
    d = decide_url(policy, VERTEX_NL, tags=["de", "fr"])
    assert (d.verdict, d.status, d.code) == ("block", 451, "empty_requirement")


@pytest.mark.parametrize(
    ("url", "tags", "client", "verdict"),
    [
        (VERTEX_NL, ["eu"], None, "allow"),
        (VERTEX_NL, ["benelux"], None, "allow"),
        (VERTEX_NL, ["de"], None, "block"),
        (VERTEX_NL, [], "10.20.5.1", "block"),  # client rule de, Vertex in nl
        (VERTEX_NL, ["global"], "10.20.5.1", "block"),  # and a tag cannot widen it
        (OPENAI_US, ["us"], None, "allow"),
        (OPENAI_US, [], "10.20.1.1", "block"),
    ],
)
def test_decisions(policy, url, tags, client, verdict):
    d = decide_url(policy, url, tags=tags, client=client, body={"model": "gpt-4o"})
    assert d.verdict == verdict, d.reason


@pytest.mark.parametrize(
    ("raw", "tags", "verdict", "code"),
    [
        (b"{not json", ["us"], "block", "bad_body"),
        (b"{not json", [], "allow", "no_requirement"),
        (b"", ["us"], "block", "outside_requirement"),  # no inference_geo: global default
        (b'{"model":"claude-opus-4-6","inference_geo":"us"}', ["us"], "allow", "compliant"),
        (b'{"model":"claude-opus-4-6","inference_geo":"mars"}', ["global"], "block",
         "unknown_place"),
    ],
)
def test_body_problems_fail_closed_only_when_required(tmp_path, raw, tags, verdict, code):
    policy = policy_from(tmp_path, {})
    d = decide_url(policy, "https://api.anthropic.com/v1/messages", tags=tags, raw_body=raw)
    assert (d.verdict, d.code) == (verdict, code), d.reason


def test_block_message_names_requirement_place_and_fix(tmp_path):
    policy = policy_from(tmp_path, {})
    d = decide_url(policy, "https://bedrock-runtime.eu-central-1.amazonaws.com/model/"
                   "eu.anthropic.claude-sonnet-4-20250514-v1%3A0/converse", tags=["eu"])
    assert d.status == 451
    assert "requirement eu" in d.reason
    assert "ch + gb" in d.reason  # what lies outside
    assert "eu-central-1" in d.reason and "no geography prefix" in d.reason  # what complies


def test_decision_is_fast(tmp_path):
    """Not a timing test: checks the allow path does not scan the catalog's options."""
    policy = policy_from(tmp_path, {})
    calls = []
    original = policy.policy.compliant_options
    policy.policy.compliant_options = lambda *a: calls.append(a) or original(*a)
    decide_url(policy, VERTEX_NL, tags=["eu"])
    assert calls == []
