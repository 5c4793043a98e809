"""Reading record lines without parsing them, and telling a torn line from damage."""

from __future__ import annotations

import json


class Rerun(Exception):
    """The fast reading of a line disagreed with the parser: walk the origin again, parsing."""


def scan_fields(raw: bytes) -> tuple[int, str, str, None] | None:
    """(seq, prev, kind, None) read straight from a line laid out as the writer writes it
    (canonical JSON: sorted keys, ``"v":1`` last), without parsing it; None for a line that
    does not look like that (it is parsed instead).

    Only a speed-up: a record is taken on these values alone only if a checkpoint whose
    signature verifies vouches for it through the hash chain, i.e. its bytes are exactly
    what the writer wrote, for which this reading is right (and its origin and key are those
    of the checkpoint). Every other record is parsed when it is checked, and if the parser
    disagrees the origin is walked again, parsing every line."""
    if not raw.endswith(b',"v":1}'):
        return None
    k = raw.find(b',"kind":"')  # then prev, then seq: the keys are sorted
    if k < 0:
        return None
    ke = raw.find(b'"', k + 9)
    j = raw.find(b',"prev":"', ke)
    if j < 0 or raw[j + 73:j + 74] != b'"':
        return None
    i = raw.find(b',"seq":', j + 74)
    if i < 0:
        return None
    digits = raw[i + 7:raw.find(b",", i + 7)]
    if not digits.isdigit():
        return None
    return int(digits), raw[j + 9:j + 73].decode("ascii", "replace"), \
        raw[k + 9:ke].decode("utf-8", "replace"), None


def looks_torn(raw: bytes) -> bool:
    """A strict prefix of a record line, or zero fill: what a crash mid-write leaves."""
    if raw.strip(b"\0") == b"":
        return True
    if not (raw.startswith(b'{"') or b'{"'.startswith(raw)):
        return False
    try:
        json.JSONDecoder().raw_decode(raw.decode("utf-8", "strict"))
    except (ValueError, UnicodeDecodeError):
        return True  # incomplete: a prefix
    return False  # a complete value followed by more bytes is not a torn write


class Rec:
    __slots__ = ("fidx", "h", "key", "key_id", "kind", "lineno", "linked", "name", "obj",
                 "prev", "raw", "seq")

    def __init__(self, fidx, name, lineno, raw, obj, h, seq, prev, kind, key_id, linked, key):
        self.fidx, self.name, self.lineno, self.raw, self.obj = fidx, name, lineno, raw, obj
        self.h, self.seq, self.prev, self.kind, self.key_id = h, seq, prev, kind, key_id
        self.linked, self.key = linked, key

