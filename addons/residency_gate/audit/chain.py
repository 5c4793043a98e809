"""Record-level helpers shared by the writer and the verifier."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical, dumps_plain
from .keys import SigningKey, public_raw

VERSION = 1
ZERO_HASH = "0" * 64
RESERVED = frozenset({"v", "origin", "seq", "ts", "kind", "prev", "key_id", "sig"})
CHECKPOINTS_PREFIX = "checkpoints-"
COMPRESSED_SUFFIXES = (".zst", ".gz")
SEGMENT_RE = re.compile(r"^(?P<origin>[A-Za-z0-9._-]+)-(?P<seq>\d{12})\.jsonl(?:\.zst|\.gz)?$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def origin_safe(origin: str) -> str:
    return _UNSAFE.sub("_", origin) or "_"


def segment_name(origin: str, first_seq: int) -> str:
    return f"{origin_safe(origin)}-{first_seq:012d}.jsonl"


def checkpoints_name(origin: str) -> str:
    return f"{CHECKPOINTS_PREFIX}{origin_safe(origin)}.jsonl"


def logical_name(name: str) -> str:
    """A segment's name without its compression suffix: ``gw-000000000000.jsonl``."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_segment_name(name: str) -> tuple[str, int] | None:
    """(origin as in file names, first seq) of a plain or compressed segment name."""
    m = SEGMENT_RE.match(name)
    if not m or name.startswith(CHECKPOINTS_PREFIX):
        return None
    return m.group("origin"), int(m.group("seq"))


def utc_ts(when: datetime | None = None) -> str:
    when = when or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class UtcClock:
    """utc_ts() of now, the same string for the same instant (the system clock in whole
    microseconds, rounded down, as datetime.now takes it), at a fraction of the cost: the
    date and time up to the second are formatted once a second. The writer stamps every
    record with it."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._prefix = ""

    def __call__(self) -> str:
        return self.at(time.time_ns())

    def at(self, ns: int) -> str:
        """The timestamp of ``ns`` nanoseconds since the epoch."""
        second, micros = divmod(ns // 1000, 1_000_000)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        return f"{self._prefix}{micros:06d}Z"


def parse_ts(text: str) -> datetime:
    """RFC 3339 -> aware datetime (raises ValueError)."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def b64_strict(text: Any) -> bytes | None:
    """Decode standard base64 only if ``text`` is its one canonical encoding."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


_REQUIRED: dict[str, type] = {
    "origin": str, "seq": int, "ts": str, "kind": str, "prev": str, "key_id": str, "sig": str,
}


def record_error(obj: Any) -> str | None:
    """Why ``obj`` is not an audit record (missing or malformed chain fields), or None."""
    if type(obj) is not dict:
        return "not a JSON object"
    if obj.get("v") != VERSION:
        return f"unsupported or missing version v={obj.get('v')!r}"
    for name, typ in _REQUIRED.items():
        if type(obj.get(name)) is not typ:
            return f"missing or malformed field {name!r}"
    if obj["seq"] < 0:
        return "negative seq"
    if not HEX64_RE.match(obj["prev"]):
        return "prev is not 64 lower-case hex digits"
    return None


def sign_record(record: dict, key: SigningKey, *, plain: bool = False) -> bytes:
    """Add ``sig`` to ``record`` (in place) and return its canonical line (no newline).

    plain=True: the record is known to hold only plain canonical types (skip the checks).
    """
    enc = dumps_plain if plain else canonical
    record.pop("sig", None)
    record["sig"] = base64.b64encode(key.sign(enc(record))).decode("ascii")
    return enc(record)


SIG_SLOT = "=" * 88  # as long as a signature in base64; no signature is all padding
_SLOT = b',"sig":"' + SIG_SLOT.encode("ascii") + b'"'


def seal(record: dict, key: SigningKey, *, plain: bool = False) -> bytes:
    """sign_record() from one serialisation instead of two: ``record`` holds
    ``"sig": SIG_SLOT``; the canonical line is written once with it, the bytes signed are that
    line without the ``sig`` member, and the signature goes in its place.

    The same bytes, because canonical JSON writes an object as its members in key order with
    nothing between them but commas: dropping one member (never the first: ``key_id``,
    ``kind`` and ``prev`` sort before ``sig``) leaves the canonical form of the rest, and a
    base64 signature needs no escaping. (tests/unit/test_audit_bytes.py holds it to
    sign_record.) Sets ``record["sig"]``; returns the line (no newline)."""
    line = (dumps_plain if plain else canonical)(record)
    i = line.find(_SLOT)
    if i < 0 or line.find(_SLOT, i + 1) >= 0:  # the slot is in a field's value as well
        return sign_record(record, key, plain=plain)
    head, tail = line[:i], line[i + len(_SLOT):]
    sig = binascii.b2a_base64(key.sign(head + tail), newline=False)
    record["sig"] = sig.decode("ascii")
    return b"".join((head, b',"sig":"', sig, b'"', tail))


def signed_body(record: dict) -> bytes:
    return canonical({k: v for k, v in record.items() if k != "sig"})


@lru_cache(maxsize=65536)
def _verify_cached(pub: bytes, message: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _signature_parts(record: dict) -> tuple[bytes, bytes] | None:
    """(signature, the bytes it signs) of a record; None when either is malformed."""
    sig = b64_strict(record.get("sig"))
    if sig is None or len(sig) != 64:
        return None
    try:
        return sig, signed_body(record)
    except ValueError:
        return None


def verify_signature_uncached(record: dict, public: Ed25519PublicKey) -> bool:
    """verify_signature without the cache (the verifier sees each record once)."""
    parts = _signature_parts(record)
    if parts is None:
        return False
    try:
        public.verify(*parts)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_signature(record: dict, public: Ed25519PublicKey) -> bool:
    parts = _signature_parts(record)
    return parts is not None and _verify_cached(public_raw(public), parts[1], parts[0])
