import json

import pytest

from residency_gate.audit.canonical import CanonicalError, canonical, parse


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
