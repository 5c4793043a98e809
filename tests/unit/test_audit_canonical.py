import hashlib
import json
import random

import pytest
import rfc8785

from residency_gate.audit.canonical import CanonicalError, canonical, dumps_plain, is_plain, parse

# Characters that canonicalisation can get wrong: escapes, controls, DEL, line separators,
# BOM, the BMP's last code point, and astral ones (which sort differently in UTF-16).
CHARS = ["a", "Z", "0", " ", '"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x00", "\x1f",
         "\x7f", "\x80", "é", "\u2028", "\u2029", "€", "\ufb01", "\ufeff", "\uffff",
         "\U0001f600", "\U00010000", "\U0010ffff", "中"]
INTS = [0, 1, -1, 2**53 - 1, -(2**53 - 1), 2**31, -(2**31), 10**15]


def _text(r: random.Random, n: int) -> str:
    return "".join(r.choice(CHARS) for _ in range(r.randrange(n)))


def _value(r: random.Random, depth: int = 0):
    k = r.randrange(10 if depth < 4 else 6)
    if k == 0:
        return None
    if k == 1:
        return r.random() < 0.5
    if k == 2:
        return r.choice(INTS)
    if k == 3:
        return r.randrange(-(2**53 - 1), 2**53)
    if k in (4, 5):
        return _text(r, 12)
    if k == 6:
        return [_value(r, depth + 1) for _ in range(r.randrange(4))]
    if k == 7:
        return tuple(_value(r, depth + 1) for _ in range(r.randrange(3)))
    return {_text(r, 5): _value(r, depth + 1) for _ in range(r.randrange(5))}


def random_record(r: random.Random) -> dict:
    """A record of the allowed types (tuples too: written as arrays), seeded."""
    return {_text(r, 6): _value(r) for _ in range(r.randrange(1, 12))}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"a": [1, {"d": None, "c": True}], "b": False}, b'{"a":[1,{"c":true,"d":null}],"b":false}'),
        ({"s": "é€😀"}, '{"s":"é€😀"}'.encode()),
        ({"s": 'q"b\\'}, b'{"s":"q\\"b\\\\"}'),
        ({"s": "\b\f\n\r\t\x00\x1f\x7f"}, b'{"s":"\\b\\f\\n\\r\\t\\u0000\\u001f\x7f"}'),
        ({"s": "\u2028"}, '{"s":"\u2028"}'.encode()),
        ({"n": -(2**53 - 1)}, b'{"n":-9007199254740991}'),
        ({"n": 0, "t": (1, 2)}, b'{"n":0,"t":[1,2]}'),
        ([], b"[]"),
        ({}, b"{}"),
        # RFC 8785 sorts by UTF-16 code units: U+1F600 (D83D..) sorts before U+FB01
        ({"\ufb01": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ufb01":1}'.encode()),
    ],
)
def test_canonical_bytes(value, expected):
    assert canonical(value) == expected


@pytest.mark.parametrize(
    "value",
    [{"f": 1.0}, {"f": float("nan")}, {1: "x"}, {"n": 2**53}, {"s": "\ud800"}, {"x": b"b"},
     {"x": {1, 2}}],
)
def test_canonical_rejects(value):
    with pytest.raises(CanonicalError):
        canonical(value)


@pytest.mark.parametrize(
    "line",
    [b'{"a":1.5}', b'{"a":NaN}', b'{"a":1,"a":2}', b"\xff", b'{"a":1e3}', b"{"],
)
def test_parse_strict(line):
    with pytest.raises(ValueError):
        parse(line)


def test_roundtrip_is_identity():
    rec = {"z": [1, "two", None], "a": {"y": "ü", "x": -3}, "m": "a\u0000b"}
    line = canonical(rec)
    assert parse(line) == rec
    assert canonical(parse(line)) == line
    # json.dumps with default separators is not canonical
    assert json.dumps(rec).encode() != line


def test_random_records_match_rfc8785_and_fast_path():
    r = random.Random(8785)
    fast = 0
    for _ in range(2000):
        rec = random_record(r)
        line = canonical(rec)
        assert line == rfc8785.dumps(rec)
        if is_plain(rec):
            fast += 1
            assert dumps_plain(rec) == line
        assert canonical(parse(line)) == line
    assert fast > 100  # both paths are exercised


def test_random_records_bytes_unchanged():
    """SHA-256 of these records' canonical bytes as the serialiser before rfc8785 wrote them."""
    r = random.Random(8785)
    digest = hashlib.sha256(b"".join(canonical(random_record(r)) + b"\n" for _ in range(2000)))
    assert digest.hexdigest() == "63f20fba56e03b219dbd8213c51b34f1800d800bcb7eb1738eac61a07792f85b"


@pytest.mark.parametrize(
    ("value", "reason"),
    [({"t": (1.5,)}, "float"), ({"\U0001f600": 0.0}, "float"), ({"t": (2**53,)}, "outside"),
     ({"\U0001f600": {2: 1}}, "not a string"), ({"t": (b"x",)}, "bytes")],
)
def test_refused_where_rfc8785_would_write(value, reason):
    """rfc8785 writes floats; records must not hold them (nor the rest), on either path."""
    with pytest.raises(CanonicalError, match=reason):
        canonical(value)
