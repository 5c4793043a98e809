"""Random mutations of LLM requests for the differential tests, and the ways a provider
may read what it received.

`requests()` draws one request per locator kind (Vertex location in the path, Azure
deployment in the path or the body, Bedrock model in the path, Anthropic body field on
a path, OpenAI host) and mutates its path (dot segments, percent-encoding, injected
separators), body (repeated keys, BOM, trailing bytes, NaN, Latin-1, nesting) and
headers (tags, Host spelling, gzip). The property: a request is either refused, or
every reading a server may apply to what the provider received (`readings`) gives the
decision the gate made (`agrees`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

AZURE = {"resources": {"myres-eu": {"region": "swedencentral", "deployments": {
    "gpt4o-dz": "DataZoneStandard", "gpt4o-global": "GlobalStandard"}}}}
CONFIG: dict[str, Any] = {"azure": AZURE}


def fuzz_settings(examples: int) -> settings:
    """Fixed examples in CI (RG_FUZZ_RANDOM=1 explores new ones; RG_FUZZ_SCALE multiplies)."""
    scale = float(os.environ.get("RG_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None, database=None,
                    derandomize=not os.environ.get("RG_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@dataclass(frozen=True)
class Sent:
    kind: str
    host: str  # the CONNECT target and TLS SNI
    host_header: str
    target: str  # path?query as sent
    body: bytes  # before Content-Encoding
    tags: tuple[str, ...]
    gzip: bool = False

    @property
    def wire_body(self) -> bytes:
        return gzip.compress(self.body) if self.gzip else self.body

    @property
    def headers(self) -> list[tuple[str, str]]:
        out = [("X-Data-Residency", t) for t in self.tags]
        out.append(("Content-Type", "application/json"))
        if self.gzip:
            out.append(("Content-Encoding", "gzip"))
        return out


# ---------------------------------------------------------------------------- base requests

HAIKU = "anthropic.claude-3-haiku-20240307-v1%3A0"
EU_PROFILE = "eu.anthropic.claude-3-5-sonnet-20240620-v1%3A0"
US_PROFILE = "us.anthropic.claude-3-5-sonnet-20240620-v1%3A0"
EU_ARN = "arn%3Aaws%3Abedrock%3Aeu-central-1%3A%3Afoundation-model%2F" + HAIKU


@dataclass(frozen=True)
class Kind:
    name: str
    hosts: tuple[str, ...]
    segments: tuple[str, ...]  # "{}" marks the located segment
    values: tuple[str, ...]  # what the located segment (or body field) may say
    query: str = ""
    body_key: str | None = None  # a located body field
    body: tuple[tuple[str, Any], ...] = ()


KINDS = (
    Kind("vertex", ("europe-west4-aiplatform.googleapis.com", "us-central1-aiplatform.googleapis.com",
                    "aiplatform.googleapis.com", "aiplatform.eu.rep.googleapis.com"),
         ("v1", "projects", "p", "locations", "{}", "publishers", "google", "models",
          "gemini-2.5-flash:generateContent"),
         ("europe-west4", "us-central1", "europe-west3", "global", "eu", "us"),
         body=(("contents", [{"role": "user", "parts": [{"text": "hi"}]}]),)),
    Kind("azure-path", ("myres-eu.openai.azure.com",),
         ("openai", "deployments", "{}", "chat", "completions"),
         ("gpt4o-dz", "gpt4o-global", "other"), query="api-version=2024-10-21",
         body=(("messages", []),)),
    Kind("azure-body", ("myres-eu.openai.azure.com",), ("openai", "v1", "chat", "completions"),
         ("gpt4o-dz", "gpt4o-global", "other"), body_key="model", body=(("messages", []),)),
    Kind("bedrock", ("bedrock-runtime.eu-central-1.amazonaws.com",
                     "bedrock-runtime.us-east-1.amazonaws.com"),
         ("model", "{}", "converse"), (HAIKU, EU_PROFILE, US_PROFILE, EU_ARN),
         body=(("messages", [{"role": "user", "content": [{"text": "hi"}]}]),)),
    Kind("anthropic", ("api.anthropic.com",), ("v1", "messages"), ("us", "global", "eu"),
         body_key="inference_geo",
         body=(("model", "claude-opus-4-6"), ("max_tokens", 1), ("messages", []))),
    Kind("openai", ("api.openai.com", "eu.api.openai.com", "us.api.openai.com"),
         ("v1", "chat", "completions"), ("gpt-4o", "o3"), body_key="model",
         body=(("messages", []),)),
)
TAGS = ((), ("eu",), ("us",), ("EU ",), ("eu, de",), ("eu", "de"), ("global",), ("eea_ch",))

# ---------------------------------------------------------------------------- path mutations

DOTDOT = ("..", "%2e%2e", "%2E%2E", ".%2e", "%2E.")
DOT = (".", "%2e", "%2E")
INJECT = ("", ";x", "%2F", "a%2Fb", "%2F..%2F", "%5C", "\\", "%00", "%zz", "%4", "%252e",
          "%3B", "%C3%A9", "%0a", "x%2F.")
UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]")


def _encode_one(segment: str, index: int, upper: bool) -> str:
    spots = [m.start() for m in UNRESERVED.finditer(segment)]
    if not spots:
        return segment
    at = spots[index % len(spots)]
    escape = f"%{ord(segment[at]):02X}" if upper else f"%{ord(segment[at]):02x}"
    return segment[:at] + escape + segment[at + 1:]


@st.composite
def paths(draw: st.DrawFn, kind: Kind) -> str:
    segments = [draw(st.sampled_from(kind.values)) if s == "{}" else s for s in kind.segments]
    located = kind.segments.index("{}") if "{}" in kind.segments else None
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(("swap", "dotdot", "dot", "encode", "inject", "trailing")))
        at = draw(st.integers(0, len(segments) - 1))
        if op == "swap" and located is not None:
            segments[located] = draw(st.sampled_from(kind.values))
        elif op == "dotdot" and located is not None and located < len(segments):
            decoy = draw(st.sampled_from(kind.values))
            before = draw(st.booleans())
            pair = [decoy, draw(st.sampled_from(DOTDOT))]
            segments[located:located] = pair if before else []
            if not before:
                segments[located + 1:located + 1] = [draw(st.sampled_from(DOTDOT)), decoy]
        elif op == "dot":
            segments.insert(at, draw(st.sampled_from(DOT)))
        elif op == "encode":
            segments[at] = _encode_one(segments[at], draw(st.integers(0, 40)), draw(st.booleans()))
        elif op == "inject":
            token = draw(st.sampled_from(INJECT))
            segments[at] = draw(st.sampled_from((token, segments[at] + token, token + segments[at])))
        elif op == "trailing":
            segments.append(draw(st.sampled_from(("", ".", "..", "%2e%2e"))))
    path = "/" + "/".join(segments)
    return f"{path}?{kind.query}" if kind.query else path


# ---------------------------------------------------------------------------- body mutations


@st.composite
def bodies(draw: st.DrawFn, kind: Kind) -> bytes:
    pairs: list[tuple[str, str]] = [(k, json.dumps(v)) for k, v in kind.body]
    value = draw(st.sampled_from(kind.values))
    if kind.body_key is not None and draw(st.integers(0, 4)):
        pairs.insert(draw(st.integers(0, len(pairs))), (kind.body_key, json.dumps(value)))
    if kind.name == "vertex" and draw(st.booleans()):
        pairs.append(("model", json.dumps(draw(st.sampled_from(("gemini-2.5-flash", "x"))))))
    prefix, suffix = b"", b""
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(("dup", "dup", "escape-key", "bom", "trailing", "nan",
                                   "latin1", "deep", "spaces")))
        other = draw(st.sampled_from([v for v in kind.values if v != value] or [value]))
        if op == "dup" and kind.body_key is not None:
            pairs.insert(draw(st.integers(0, len(pairs))), (kind.body_key, json.dumps(other)))
        elif op == "escape-key" and kind.body_key is not None:
            key = f"\\u{ord(kind.body_key[0]):04x}{kind.body_key[1:]}"
            pairs.insert(draw(st.integers(0, len(pairs))), (key, json.dumps(other)))
        elif op == "bom":
            prefix = b"\xef\xbb\xbf"
        elif op == "trailing":
            suffix = draw(st.sampled_from((b" x", b"}", b", ", b"\x00", b"\n")))
            if kind.body_key is not None and draw(st.booleans()):
                suffix = f'{{"{kind.body_key}":{json.dumps(other)}}}'.encode()
        elif op == "nan":
            pairs.append(("temperature", draw(st.sampled_from(("NaN", "Infinity", "-Infinity")))))
        elif op == "latin1":
            pairs.append(("metadata", '{"user_id":"caf\xe9"}'))
        elif op == "deep":
            depth = draw(st.sampled_from((3, 40, 600)))
            pairs.append(("x", "[" * depth + "]" * depth))
        elif op == "spaces":
            prefix, suffix = b" \t" + prefix, suffix + b"\r\n "
    text = "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"
    return prefix + text.encode("latin-1" if "\xe9" in text else "utf-8") + suffix


# ---------------------------------------------------------------------------- requests


@st.composite
def requests(draw: st.DrawFn, kinds: tuple[Kind, ...] = KINDS) -> Sent:
    kind = draw(st.sampled_from(kinds))
    host = draw(st.sampled_from(kind.hosts))
    spelling = draw(st.sampled_from(("exact", "upper", "dot", "port")))
    host_header = {"exact": host, "upper": host.upper(), "dot": host + ".",
                   "port": host + ":443"}[spelling]
    return Sent(kind.name, host, host_header, draw(paths(kind)), draw(bodies(kind)),
                draw(st.sampled_from(TAGS)), draw(st.booleans()))


# ---------------------------------------------------------------------------- readings

_KEPT = re.compile(r"%(?:2[fF]|5[cC]|25)")


def _decode_then_resolve(path: str) -> str:
    """A server that percent-decodes (all but '/', '\\' and '%') before removing dot
    segments, as some frameworks do; delimiters it decoded stay data (re-encoded)."""
    parts = _KEPT.split(path)
    kept = _KEPT.findall(path)
    decoded = unquote(parts[0], errors="strict") if parts else ""
    for sep, part in zip(kept, parts[1:], strict=True):
        decoded += sep + unquote(part, errors="strict")
    out: list[str] = []
    segments = decoded.split("/")[1:]
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if i == len(segments) - 1:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(quote(s, safe="!$&'()*+,=:@~%-._") for s in out)  # ';' stays data


def path_readings(target: str) -> Iterator[tuple[str, str]]:
    path, sep, query = target.partition("?")
    yield "as received", target
    try:
        yield "decode first", _decode_then_resolve(path) + sep + query
    except UnicodeDecodeError:
        return


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


def body_readings(body: bytes) -> Iterator[tuple[str, bytes]]:
    """The body as different parsers read it, each re-encoded unambiguously."""
    yield "as received", body
    seen: set[bytes] = set()
    attempts = (
        ("last key wins", lambda: json.loads(body)),
        ("first key wins", lambda: json.loads(body, object_pairs_hook=_first_wins)),
        ("lenient", lambda: json.JSONDecoder().raw_decode(body.decode("utf-8-sig").lstrip())[0]),
        ("latin-1", lambda: json.loads(body.decode("latin-1"))),
    )
    for label, read in attempts:
        try:
            value = read()
        except (ValueError, RecursionError):
            continue
        canonical = json.dumps(value).encode()
        if canonical not in seen:
            seen.add(canonical)
            yield label, canonical


def summary(decision: Any, regions: Any) -> tuple[str, str, Any]:
    """(verdict, code, places) as a decision record states them."""
    loc = decision.location
    return decision.verdict, str(decision.code), regions.region_list(loc.places if loc else None)


def agrees(gate: tuple[str, str, Any], reference: tuple[str, str, Any]) -> bool:
    """Same verdict and reason, and the same places wherever both located the request
    (without a requirement an unreadable path or body is forwarded unlocated)."""
    return (gate[:2] == reference[:2] and None in (gate[2], reference[2])) or gate == reference


def reference_decisions(bundle: Any, host_header: str, target: str, body: bytes,
                        tags: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, str, Any]]]:
    """The decision under every reading a provider may apply to what it received."""
    from residency_gate.core.request import Request

    host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
    for path_label, path in path_readings(target):
        for body_label, reading in body_readings(body):
            req = Request(method="POST", scheme="https", host=host, port=443, path=path,
                          tag_values=tags, body=reading)
            yield f"{path_label} / {body_label}", summary(bundle.decide(req), bundle.regions)
