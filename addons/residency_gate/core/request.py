"""The request as the proxy will send it, and what locators may read of it.

`Request` is built by the proxy from a flow (or by `explain` from its arguments):
the host is the one the proxy will connect to, after the destination checks.
`RequestView` is the read-only face locators and extractors see: the normalised
path (`normalise.py`, never the query string), and the JSON body parsed lazily, at
most once, strictly (`strict_json.py`): what the decision reads must mean the same
to every parser, or the request is refused when a requirement applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from .strict_json import JSON_DEPTH, BodyError, members, parse, plain

__all__ = ["AzureResource", "BodyError", "Request", "RequestView", "url_of"]

_MISSING = object()


@dataclass(frozen=True)
class Request:
    """One request as the proxy will send it: the destination is what we connect to."""

    method: str
    scheme: str
    host: str
    port: int
    path: str  # raw, may include the query string
    tag_values: Sequence[str] = ()
    body: bytes | None = None
    client_ip: str | None = None
    user: str | None = None
    signed: bool = False  # SigV4: host, path and body must not be rewritten
    body_error: str | None = None  # the body could not be decoded (Content-Encoding)

    @property
    def url(self) -> str:
        return url_of(self.scheme, self.host, self.port, self.path)


def url_of(scheme: str, host: str, port: int, target: str) -> str:
    """scheme://host[:port]/path, without the query string (records never hold it)."""
    default = 443 if scheme == "https" else 80
    shown = "" if port in (default, 0) else f":{port}"
    return f"{scheme}://{host}{shown}{target.partition('?')[0]}"


@dataclass(frozen=True)
class AzureResource:
    """An operator-declared Azure OpenAI / Foundry resource (config `azure.resources`)."""

    name: str
    region: str
    deployments: Mapping[str, str]


@dataclass
class RequestView:
    """What extractors and locators may read of one request; JSON parsed lazily, once."""

    host: str
    path: str  # without the query string
    query: str
    body: bytes | None
    captures: dict[str, str] = field(default_factory=dict)
    azure: Mapping[str, AzureResource] = field(default_factory=dict)
    body_error: str | None = None
    json_depth: int = JSON_DEPTH
    reads: dict[str, Any] = field(default_factory=dict)  # what the decision read: replayable
    _json: Any = _MISSING

    def json(self) -> Any:
        """The parsed body; its JSON type (or why it is unreadable) joins `reads`, so a
        replay can rebuild a body the decision reads the same way."""
        if self._json is _MISSING:
            if self.body_error:
                self._json = BodyError(self.body_error)
            elif not self.body or not self.body.strip():
                self._json = None
            else:
                try:
                    self._json = parse(self.body, self.json_depth)
                except BodyError as e:
                    self._json = e
            if isinstance(self._json, BodyError):
                self.reads["body"] = "unreadable"
                self.reads["body_error"] = str(self._json)[:256]
            else:
                self.reads["body"] = _json_type(self._json, self.body)
        if isinstance(self._json, BodyError):
            raise self._json
        return self._json

    def body_value(self, dotted: tuple[str, ...]) -> Any:
        """The value at a dotted path; every object on the way must name each key once."""
        value = self.json()
        for depth, part in enumerate(dotted):
            if type(value) is tuple:  # an object below the top level
                value = members(value, f"in {'.'.join(dotted[:depth])!r}")
            if not isinstance(value, dict):
                value = None
                break
            value = value.get(part)
        if type(value) is tuple:
            value = plain(value)
        self.reads["body:" + ".".join(dotted)] = _scalar(value)
        return value

    def query_param(self, name: str) -> str | None:
        found = [value for key, value in parse_qsl(self.query, keep_blank_values=True)
                 if key == name]
        if len(found) > 1:
            raise BodyError(f"query parameter {name!r} appears {len(found)} times (servers "
                            "disagree on which one counts)", "query")
        self.reads["query:" + name] = found[0] if found else None
        return found[0] if found else None


def _json_type(value: Any, raw: bytes | None) -> str:
    if value is None:
        return "null" if raw and raw.strip() else "empty"
    for kind, types in (("boolean", bool), ("object", dict), ("array", list), ("string", str)):
        if isinstance(value, types):
            return kind
    return "number"


def _scalar(value: Any) -> Any:
    """What a record keeps of a value read: scalars as they are, containers by their type
    (locators only ever read short identifiers; never keep a structure that could hold a
    prompt)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value[:256]
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    return f"<{type(value).__name__}>"
