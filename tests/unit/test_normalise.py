"""The path a provider acts on (RFC 3986 normal form) and strict JSON bodies: what is
normalised, what is refused, and that the decision reads exactly what is forwarded."""

from __future__ import annotations

import json

import pytest

from helpers import decide_url, policy_from, request
from residency_gate.core.normalise import UnsafePath, normalise_path, normalise_target
from residency_gate.core.strict_json import BodyError, parse

AZURE = {"resources": {"myres-eu": {"region": "swedencentral", "deployments": {
    "gpt4o-dz": "DataZoneStandard", "gpt4o-global": "GlobalStandard"}}}}
VERTEX = "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/{}/publishers/google/models/gemini-2.5-flash:generateContent"
AZURE_URL = "https://myres-eu.openai.azure.com/openai/deployments/{}/chat/completions?api-version=2024-10-21"
BEDROCK = "https://bedrock-runtime.eu-central-1.amazonaws.com/model/{}/converse"
HAIKU = "anthropic.claude-3-haiku-20240307-v1%3A0"
US_SONNET = "us.anthropic.claude-3-5-sonnet-20240620-v1%3A0"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return policy_from(tmp_path_factory.mktemp("n"), {"azure": AZURE})


@pytest.mark.parametrize(("raw", "normal"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/a/b/../c", "/a/c"),
    ("/a/%2e%2e/c", "/c"),
    ("/a/b/.%2E/c", "/a/c"),
    ("/a/./b/./", "/a/b/"),
    ("/a/b/..", "/a/"),
    ("/..", "/"),
    ("/%61%2D%7e", "/a-~"),  # unreserved characters are decoded
    ("/model/x%3A0/converse", "/model/x%3A0/converse"),  # reserved ones are kept as sent
    ("/model/arn%3Aaws%3Abedrock%3Aeu-central-1%3A1%3Ainference-profile%2Feu.x/converse",
     "/model/arn%3Aaws%3Abedrock%3Aeu-central-1%3A1%3Ainference-profile%2Feu.x/converse"),
    ("/a/%C3%A9", "/a/%C3%A9"),
])
def test_normal_form(raw, normal):
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal  # idempotent


@pytest.mark.parametrize(("raw", "what"), [
    ("/a//b", "empty segment"),
    ("/a;v=1/b", "';' path parameter"),
    ("/a/%5Cb", "encoded backslash"),
    ("/a\\b", "backslash"),
    ("/a/%00", "NUL"),
    ("/a/%0d%0a", "control character"),
    ("/a/%zz", "invalid percent escape"),
    ("/a/%4", "invalid percent escape"),
    ("/a/%252e%252e/b", "double-encoded"),
    ("/model/eu.x%2F..%2Fus.y/converse", "encoded '/'"),
    ("/model/eu.x%2Fy/../us.z/converse", "encoded '/' together with"),
    ("/a/%2F/b", "encoded '/'"),
    ("/a b", "must be percent-encoded"),
    ("/a/é", "must be percent-encoded"),
    ("*", "no leading '/'"),
])
def test_refused_paths(raw, what):
    with pytest.raises(UnsafePath) as ei:
        normalise_path(raw)
    assert what in ei.value.what


def test_query_string_is_never_normalised():
    assert normalise_target("/a/../b?x=/../y&z=%2e") == "/b?x=/../y&z=%2e"
    assert normalise_target("/a?b//c;d") == "/a?b//c;d"


# -------------------------------------------------------------------- the decision


@pytest.mark.parametrize(("url", "tags", "code", "target"), [
    # The cases: the server acts on us-central1 / gpt4o-global / a us. profile.
    (VERTEX.format("europe-west4/../us-central1"), ["eu"], "unknown_place",
     "/v1/projects/p/locations/us-central1/"),
    (VERTEX.format("europe-west4/%2e%2e/us-central1"), ["eu"], "unknown_place",
     "/v1/projects/p/locations/us-central1/"),
    (VERTEX.format("us-central1/../europe-west4"), ["eu"], "compliant",
     "/v1/projects/p/locations/europe-west4/"),
    (AZURE_URL.format("gpt4o-dz/../gpt4o-global"), ["eu"], "outside_requirement",
     "/openai/deployments/gpt4o-global/chat/completions?api-version=2024-10-21"),
    (AZURE_URL.format("gpt4o-global/.%2e/gpt4o-dz"), ["eu"], "compliant",
     "/openai/deployments/gpt4o-dz/chat/completions?api-version=2024-10-21"),
    (BEDROCK.format(f"{HAIKU}/../{US_SONNET}"), ["eu"], "outside_requirement",
     f"/model/{US_SONNET}/converse"),
    (BEDROCK.format(f"{US_SONNET}/%2E%2E/{HAIKU}"), ["eu"], "compliant",
     f"/model/{HAIKU}/converse"),
    ("https://api.anthropic.com/v1/x/../messages", ["us"], "outside_requirement",
     "/v1/messages"),
])
def test_decided_on_the_normal_form(bundle, url, tags, code, target):
    d = decide_url(bundle, url, tags=tags, body={"model": "gpt4o-dz", "messages": []})
    assert d.code == code, d.reason
    assert d.target is not None and d.target.startswith(target)
    assert d.url.split("://", 1)[1].split("/", 1)[1] == d.target.split("?")[0][1:]
    assert any(step.startswith("path normalised") for step in d.trace)


def test_normal_path_needs_no_rewrite(bundle):
    d = decide_url(bundle, VERTEX.format("europe-west4"), tags=["eu"])
    assert d.code == "compliant" and d.target is None


@pytest.mark.parametrize("url", [
    VERTEX.format("europe-west4//x"),
    AZURE_URL.format("gpt4o-dz;x"),
    BEDROCK.format(f"{HAIKU}%2F..%2F{US_SONNET}"),
    "https://api.openai.com/v1/chat/completions%00",
])
def test_unsafe_path_refused_400_with_requirement_forwarded_without(bundle, url):
    d = decide_url(bundle, url, tags=["eu"], body={"model": "gpt-4o"})
    assert (d.code, d.status, d.verdict) == ("bad_path", 400, "block")
    assert "Nothing was forwarded" in d.reason and "normal form" in d.reason
    free = decide_url(bundle, url, body={"model": "gpt-4o"})
    assert (free.code, free.verdict, free.target) == ("no_requirement", "allow", None)
    assert free.location is None  # not located: the record claims no place


def test_signed_request_with_a_path_to_rewrite_is_refused(bundle):
    url = BEDROCK.format(f"{US_SONNET}/../{HAIKU}")
    d = bundle.decide(request(url, tags=["eu"], signed=True, body={}))
    assert d.code == "bad_path" and "SigV4" in d.reason
    untagged = bundle.decide(request(url, signed=True, body={}))
    assert untagged.code == "no_requirement" and untagged.target is None  # sent as signed
    normal = bundle.decide(request(BEDROCK.format(HAIKU), tags=["eu"], signed=True, body={}))
    assert normal.code == "compliant"


def test_not_llm_paths_are_not_touched(bundle):
    d = decide_url(bundle, "https://example.org/a/../b//c;d")
    assert d.code == "not_llm" and d.target is None


# -------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(("body", "what"), [
    (b'{"inference_geo":"global","inference_geo":"us"}', "repeats the key 'inference_geo'"),
    (b'{"model":"a","model":"b","x":1,"x":2}', "repeats the key 'model', 'x'"),
    (b'\xef\xbb\xbf{"model":"a"}', "byte order mark"),
    ('{"model":"a"}'.encode("utf-16"), "not UTF-8"),
    (b'{"model":"caf\xe9"}', "not UTF-8"),
    (b'{"model":"a","t":NaN}', "NaN"),
    (b'{"model":"a","t":-Infinity}', "-Infinity"),
    (b'{"model":"a"} {"model":"b"}', "not valid JSON (Extra data"),
    (b'{"model":"a"}x', "not valid JSON (Extra data"),
    (b'{"model":"a","m":' + b"[" * 600 + b"]" * 600 + b"}", "deeper than 512"),
    (b"[" * 100_000 + b"]" * 100_000, "deeper than 512"),  # past CPython's own bound too
])
def test_strict_json_refuses(body, what):
    with pytest.raises(BodyError) as ei:
        parse(body)
    assert what in str(ei.value)


@pytest.mark.parametrize("body", [
    b'{"model":"a","messages":[{"role":"user","content":"[[[[ {{ \\" ]]"}]}',
    b'  {"model":"a"}\r\n',
    b'{"a":{"b":1,"b":2},"model":"a"}',  # repeated below the top level, off the read path
    b'{"model":"\\u00e9"}',
    b'{"m":' + b"[" * 511 + b"]" * 511 + b"}",
])
def test_strict_json_accepts(body):
    assert parse(body) is not None


def test_depth_counts_brackets_outside_strings_only():
    text = json.dumps({"model": "a", "p": "[" * 5000, "n": [[[[1]]]]}).encode()
    parse(text, max_depth=5)
    with pytest.raises(BodyError):
        parse(text, max_depth=4)


@pytest.mark.parametrize(("body", "tags", "code"), [
    ({"raw": b'{"model":"claude","inference_geo":"global","inference_geo":"us"}'}, ["us"],
     "bad_body"),
    ({"raw": b'{"model":"claude","inference_geo":"us","inference_geo":"global"}'}, ["us"],
     "bad_body"),
    ({"raw": b'{"model":"claude","inference_geo":"us"} junk'}, ["us"], "bad_body"),
    ({"raw": b'{"model":"claude","inference_geo":"us"}'}, ["us"], "compliant"),
    ({"raw": b'{"model":"claude","\\u0069nference_geo":"us","inference_geo":"global"}'},
     ["us"], "bad_body"),
    ({"raw": b'{"model":"claude","inference_geo":"global","inference_geo":"us"}'}, [],
     "no_requirement"),
])
def test_anthropic_duplicate_inference_geo(bundle, body, tags, code):
    d = decide_url(bundle, "https://api.anthropic.com/v1/messages", tags=tags,
                   raw_body=body["raw"])
    assert d.code == code, d.reason
    if code == "bad_body":
        assert d.status == 400 and "Nothing was forwarded" in d.reason
    if code == "no_requirement":
        assert d.location is None


def test_repeated_key_on_the_way_to_a_nested_field(bundle):
    from residency_gate.core.request import RequestView

    view = RequestView(host="h", path="/", query="",
                       body=b'{"a":{"b":{"c":"x"},"b":{"c":"y"}},"z":{"q":1,"q":2}}')
    with pytest.raises(BodyError, match="repeats the key 'b' in 'a'"):
        view.body_value(("a", "b", "c"))
    assert view.body_value(("z",)) == {"q": 2}  # read, not walked through


def test_repeated_query_parameter_is_ambiguous(bundle):
    d = decide_url(bundle, "https://api.openai.com/v1/realtime?model=a&model=b", tags=["us"],
                   method="GET")
    assert d.code == "bad_body" and "query parameter 'model' appears 2 times" in d.reason


def test_json_depth_is_configurable(tmp_path):
    shallow = policy_from(tmp_path, {"limits": {"json_depth": 3}})
    body = b'{"model":"claude","inference_geo":"us","x":[[[1]]]}'
    d = decide_url(shallow, "https://api.anthropic.com/v1/messages", tags=["us"], raw_body=body)
    assert d.code == "bad_body" and "deeper than 3 levels (limits.json_depth)" in d.reason


def test_fast_path_agrees_with_the_full_normalisation(monkeypatch):
    """Normal paths skip the segment walk; the shortcut must never pass a path the walk
    would change or refuse."""
    from residency_gate.core import normalise as n

    def outcome(path: str):
        try:
            return n.normalise_path(path), n.normalise_target(path + "?q=%2e/..")
        except UnsafePath as e:
            return "refused: " + e.what

    pieces = [f"%{i:02X}" for i in range(256)] + [f"%{i:02x}" for i in range(256)] + [
        "%", "%g0", "%0", ".", "..", "", ";", "\\", "a"]
    paths = [p for e in pieces for e2 in ("", "%41", "%2F", "%25", "%3A", ".", "/", "//")
             for p in (f"/a{e}b/c", f"/{e}", f"/a/{e}{e2}", f"/{e}/..", f"/{e2}{e}/x",
                       f"/{e}/{e2}")]
    quick = [outcome(p) for p in paths]

    class Never:
        @staticmethod
        def fullmatch(_path: str) -> None:
            return None

    for shortcut in ("_NORMAL", "_NORMAL_ESCAPED", "_TARGET_NORMAL", "_TARGET_NORMAL_ESCAPED"):
        monkeypatch.setattr(n, shortcut, Never)
    assert [outcome(p) for p in paths] == quick


@pytest.mark.parametrize("size", [100, 70_000])  # counted, or searched past the limit
def test_depth_limit_on_small_and_large_bodies(size):
    pad = "p" * size
    shallow = json.dumps({"model": "a", "pad": pad, "s": "[{" * 400, "x": [[[[1]]]]}).encode()
    assert parse(shallow, max_depth=5)["model"] == "a"
    deep = json.dumps({"model": "a", "pad": pad, "x": [[[[[[1]]]]]]}).encode()
    with pytest.raises(BodyError, match="deeper than 5 levels"):
        parse(deep, max_depth=5)
