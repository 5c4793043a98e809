"""Canonical JSON for audit records.

Keys sorted (by UTF-16 code units, as RFC 8785 says), no whitespace, UTF-8,
strings escaped exactly as RFC 8785 does (only ``"``, ``\\`` and control
characters; short forms for \\b \\f \\n \\r \\t, ``\\u00xx`` lower case for the rest).
Only the JSON types the audit trail needs are allowed: objects with string keys,
arrays, strings, booleans, null and integers within +-(2**53 - 1) (I-JSON);
floats are refused, so a record has exactly one byte representation.
"""

from __future__ import annotations

import json
from typing import Any

MAX_SAFE_INT = 2**53 - 1


class CanonicalError(ValueError):
    """The value cannot be written as canonical audit JSON."""


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _normalise(obj: Any, depth: int = 0) -> Any:
    if depth > 64:
        raise CanonicalError("nesting deeper than 64 levels")
    if obj is None or obj is True or obj is False:
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        if -MAX_SAFE_INT <= obj <= MAX_SAFE_INT:
            return int(obj)
        raise CanonicalError(f"integer {obj} outside +-(2**53 - 1)")
    if isinstance(obj, float):
        raise CanonicalError(f"floats are not allowed in audit records ({obj!r})")
    if isinstance(obj, dict):
        out = {}
        for key in sorted(obj, key=lambda k: _utf16_key(k) if isinstance(k, str) else b""):
            if not isinstance(key, str):
                raise CanonicalError(f"object key {key!r} is not a string")
            out[str(key)] = _normalise(obj[key], depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v, depth + 1) for v in obj]
    raise CanonicalError(f"type {type(obj).__name__} is not allowed in audit records")


def _plain(obj: Any, depth: int = 0) -> bool:
    """True when ``obj`` has only allowed types and every key is BMP-only, so that
    json.dumps(sort_keys=True) (code-point order) equals UTF-16 order."""
    if depth > 64:
        return False
    t = type(obj)
    if t is dict:
        values = []
        for k in obj:
            if type(k) is not str or (not k.isascii() and max(k) > "\uffff"):
                return False
        values = obj.values()
    elif t is list:
        values = obj
    else:
        values = (obj,)
    for v in values:
        tv = type(v)
        if tv is str or v is None or tv is bool:
            continue
        if tv is int:
            if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                return False
            continue
        if (tv is dict or tv is list) and _plain(v, depth + 1):
            continue
        return False
    return True


def dumps_plain(obj: Any) -> bytes:
    """canonical() for a value already known to pass _plain (no checks)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                      sort_keys=True).encode("utf-8")


def canonical(obj: Any) -> bytes:
    """The canonical UTF-8 bytes of ``obj`` (see module doc); raises CanonicalError."""
    if _plain(obj):
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    else:
        text = json.dumps(
            _normalise(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalError("string contains a lone surrogate") from exc


def _reject_float(text: str) -> Any:
    raise ValueError(f"number {text} is not an integer")


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse(data: bytes) -> Any:
    """Strict parse of one line: UTF-8, no floats, no NaN, no duplicate keys.

    Raises ValueError (json.JSONDecodeError and UnicodeDecodeError are ValueErrors).
    """
    return json.loads(
        data.decode("utf-8"),
        parse_float=_reject_float,
        parse_constant=_reject_constant,
        object_pairs_hook=_no_duplicates,
    )
