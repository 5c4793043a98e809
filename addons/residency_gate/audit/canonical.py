"""Canonical JSON for audit records: RFC 8785 (JCS), by the ``rfc8785`` package.

Only the JSON types the audit trail needs are allowed: objects with string keys, arrays,
strings, booleans, null and integers within +-(2**53 - 1) (I-JSON). Floats are refused
(rfc8785 would write them), so a record has exactly one byte representation.

Fast path: rfc8785 is pure Python, ~4x slower than the C json encoder (about 57 vs 12 µs
for a decision record), and the writer canonicalises every record twice (to sign it, then
with its signature). For values of exactly the allowed types whose object keys are all in
the Basic Multilingual Plane, ``json.dumps(sort_keys=True, ensure_ascii=False,
separators=(",", ":"))`` writes the same bytes: code-point order is UTF-16 order there, and
it escapes strings as RFC 8785 does (only ``"``, ``\\`` and control characters; short
forms for \\b \\f \\n \\r \\t, ``\\u00xx`` lower case for the rest).
tests/unit/test_audit_canonical.py holds both to rfc8785 on random records.
"""

from __future__ import annotations

import json
import re
from typing import Any

import rfc8785

MAX_SAFE_INT = 2**53 - 1
MAX_DEPTH = 64

# check_circular off: dumps_plain only gets what passed is_plain (no cycles: depth-bounded)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                            check_circular=False)
_SURROGATE = re.compile("[\ud800-\udfff]").search


class CanonicalError(ValueError):
    """The value cannot be written as canonical audit JSON."""


def is_plain(obj: Any, depth: int = 0) -> bool:
    """True when ``obj`` has only the allowed types (exactly, no subclasses or tuples), every
    object key is BMP-only and no string holds a lone surrogate: then dumps_plain(obj) is its
    canonical form (and cannot fail)."""
    if depth > MAX_DEPTH:
        return False
    t = type(obj)
    if t is dict:
        for k in obj:
            if type(k) is not str or (not k.isascii() and (max(k) > "\uffff"
                                                           or _SURROGATE(k) is not None)):
                return False
        values = obj.values()
    elif t is list:
        values = obj
    else:
        values = (obj,)
    for v in values:
        tv = type(v)
        if tv is str:
            if v.isascii() or _SURROGATE(v) is None:
                continue
            return False
        if v is None or tv is bool:
            continue
        if tv is int:
            if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                return False
            continue
        if (tv is dict or tv is list) and is_plain(v, depth + 1):
            continue
        return False
    return True


def dumps_plain(obj: Any) -> bytes:
    """canonical() of a value that passed is_plain, without checking it again."""
    return _ENCODER.encode(obj).encode("utf-8")


def _check(obj: Any, depth: int = 0) -> None:
    """Raise CanonicalError, naming the reason, for what rfc8785 should not get."""
    if depth > MAX_DEPTH:
        raise CanonicalError(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(obj, str):
        _check_text(obj)
        return
    if obj is None or isinstance(obj, bool):
        return
    if isinstance(obj, int):
        if not -MAX_SAFE_INT <= obj <= MAX_SAFE_INT:
            raise CanonicalError(f"integer {obj} outside +-(2**53 - 1)")
        return
    if isinstance(obj, float):
        raise CanonicalError(f"floats are not allowed in audit records ({obj!r})")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CanonicalError(f"object key {key!r} is not a string")
            _check_text(key)
            _check(value, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for value in obj:
            _check(value, depth + 1)
        return
    raise CanonicalError(f"type {type(obj).__name__} is not allowed in audit records")


def _check_text(text: str) -> None:
    if not text.isascii() and _SURROGATE(text) is not None:
        raise CanonicalError("string contains a lone surrogate")


def canonical(obj: Any) -> bytes:
    """The canonical UTF-8 bytes of ``obj`` (see module doc); raises CanonicalError."""
    try:
        if is_plain(obj):
            return dumps_plain(obj)
        _check(obj)
        return rfc8785.dumps(obj)
    except UnicodeEncodeError as exc:
        raise CanonicalError("string contains a lone surrogate") from exc
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalError(str(exc)) from exc


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


_RECORD_DECODER = json.JSONDecoder(parse_float=_reject_float, parse_constant=_reject_constant)
_scan = _RECORD_DECODER.scan_once


def loads_record(data: bytes) -> Any:
    """A line as the verifier and readers see it: UTF-8, no floats, no NaN; by the C scanner
    alone (~2x faster than parse()). Duplicate keys are not refused here: such a line is
    never canonical, so the verifier still rejects it (not-canonical) when it checks it.

    Raises ValueError."""
    text = data.decode("utf-8")
    try:
        obj, end = _scan(text, 0)
    except StopIteration:
        obj, end = None, -1
    if end != len(text):  # leading/trailing whitespace, extra data, or not JSON at all
        return _RECORD_DECODER.decode(text)
    return obj


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
