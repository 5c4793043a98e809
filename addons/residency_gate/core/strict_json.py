"""Strict JSON: read a request body the one way every parser agrees on, or say why not.

Parsers disagree on repeated keys (first wins, last wins, error), on a BOM, on
UTF-16 or Latin-1 bytes, on NaN and Infinity, and on bytes after the value (a
streaming decoder stops at the first value). When the gate reads a field from a
body that a provider may read differently, the decision may not be the one the
provider acts on; such a body is refused when a requirement applies (BodyError).

Objects are parsed into tuples of (key, value) pairs: the C parser builds them
without calling back into Python, repeated keys stay visible, and only the objects
a locator walks through are turned into dicts (`members`).
"""

from __future__ import annotations

import json
from itertools import chain, compress, repeat
from operator import is_, itemgetter
from typing import Any

# Default limits.json_depth (at most 1000 in the config schema): far above real requests
# and below CPython's own bound (its C parser stops near 1500 levels with RecursionError).
JSON_DEPTH = 512


class BodyError(ValueError):
    """What the decision needs to read (the body, a query parameter) cannot be read
    unambiguously; `kind` names the problem (`wording.FIX_BODY` says what to send)."""

    def __init__(self, what: str, kind: str = "json") -> None:
        super().__init__(what)
        self.kind = kind  # json | utf8 | bom | constant | depth | repeated | query


def _constant(name: str) -> Any:
    raise BodyError(f"request body contains {name}, which is not JSON (RFC 8259)", "constant")


_DECODER = json.JSONDecoder(object_pairs_hook=tuple, parse_constant=_constant)


def too_deep(limit: int) -> BodyError:
    return BodyError(f"request body nests JSON deeper than {limit} levels (limits.json_depth)",
                     "depth")


def parse(body: bytes, max_depth: int = JSON_DEPTH) -> Any:
    """The JSON value of `body`, its top-level object as a dict (each key named once),
    objects below it as tuples of pairs, arrays as lists; raise BodyError. Trailing bytes
    other than whitespace are refused by the decoder itself."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"request body is not UTF-8 (invalid byte at offset {e.start})",
                        "utf8") from None
    if text.startswith("\ufeff"):
        raise BodyError("request body starts with a byte order mark (U+FEFF)", "bom")
    try:
        tree = _DECODER.decode(text)
    except RecursionError:  # the C parser's own bound, near 1500 levels
        raise too_deep(max_depth) from None
    except BodyError:
        raise
    except ValueError as e:
        raise BodyError(f"request body is not valid JSON ({e})") from None
    if more_openers_than(body, max_depth) and deeper_than(tree, max_depth):
        raise too_deep(max_depth)
    return members(tree, "at the top level") if type(tree) is tuple else tree


def more_openers_than(body: bytes, limit: int) -> bool:
    """More than `limit` '[' and '{' in `body`? (With no more, it cannot nest deeper.)
    Small bodies are counted; large ones searched (memchr) until limit + 1 are found."""
    if len(body) <= limit:
        return False
    if len(body) < 1 << 16:
        return body.count(b"[") + body.count(b"{") > limit
    seen = 0
    for opener in (b"[", b"{"):
        at = body.find(opener)
        while at >= 0:
            seen += 1
            if seen > limit:
                return True
            at = body.find(opener, at + 1)
    return False


def members(obj: tuple, where: str) -> dict[str, Any]:
    """An object's members as a dict; BodyError when it names a key more than once."""
    out = dict(obj)
    if len(out) != len(obj):
        seen: set[str] = set()
        repeated: set[str] = set()
        for key, _ in obj:
            (repeated if key in seen else seen).add(key)
        names = ", ".join(repr(k) for k in sorted(repeated)[:5])
        raise BodyError(f"request body repeats the key {names} {where} (JSON parsers disagree "
                        "on which one counts)", "repeated")
    return out


def plain(value: Any) -> Any:
    """A value as callers expect it: an object as a dict (its own members only)."""
    return dict(value) if type(value) is tuple else value


_VALUE = itemgetter(1)
_IS_CONTAINER = frozenset((tuple, list)).__contains__


def deeper_than(tree: Any, limit: int) -> bool:
    """Does the parsed tree nest deeper than `limit`? One level at a time, each walked
    by C iterators (no Python call per value)."""
    level = [tree] if _IS_CONTAINER(type(tree)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        types = list(map(type, level))
        objects = compress(level, map(is_, types, repeat(tuple)))
        arrays = compress(level, map(is_, types, repeat(list)))
        values = list(chain(map(_VALUE, chain.from_iterable(objects)),
                            chain.from_iterable(arrays)))
        level = list(compress(values, map(_IS_CONTAINER, map(type, values))))
    return False
