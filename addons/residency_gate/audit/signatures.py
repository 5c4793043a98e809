"""Checking one record's canonical form and signature, inline or in worker processes.

An Ed25519 verification costs ~130 µs here, about ten times everything else the verifier
does per record, so this is what ``audit verify --thorough`` spreads over the cores: each
worker checks whole segments (:func:`check_segment`) and returns only the lines that
failed; the chain itself is still walked in order by the verifier's own process.

Fast path (:func:`check_record`): the signed message is the canonical record without
``sig``, i.e. the line with its ``,"sig":"..."`` member cut out, when the line is canonical.
So the signature is checked over those bytes, without re-serialising the record. If it
verifies, the key holder signed exactly the remaining bytes, and since the writer only ever
signs canonical JSON and ``sig`` sits at its sorted place among the top-level keys, the line
itself is canonical. Anything else takes the slow path (re-serialise, compare, verify),
which tells not-canonical from bad-signature exactly as before.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical, loads_record
from .chain import b64_strict, record_error, signed_body
from .keys import key_id_for, public_raw
from .segments import SegmentReadError, Source, iter_lines


def _sig_in_place(rec: dict) -> bool:
    keys = list(rec)
    i = keys.index("sig")
    return (i == 0 or keys[i - 1] < "sig") and (i + 1 == len(keys) or keys[i + 1] > "sig")


_CACHE: dict[tuple[str, bytes], tuple[bool, bool | None]] = {}
_ORDER: deque[tuple[str, bytes]] = deque()
_CACHE_SIZE = 2048  # a verifier sees each line once; repeated runs (tests) see them again


def check_record_cached(raw: bytes, line_hash: str, rec: dict,
                        public: Ed25519PublicKey | None, pub_raw: bytes | None
                        ) -> tuple[bool, bool | None]:
    """check_record, remembering the last results by (line hash, key): a process that
    verifies the same lines again (the tamper tests) does not pay twice."""
    if public is None or pub_raw is None:
        return check_record(raw, rec, public)
    ck = (line_hash, pub_raw)
    hit = _CACHE.get(ck)
    if hit is None:
        hit = check_record(raw, rec, public)
        if len(_ORDER) >= _CACHE_SIZE:
            _CACHE.pop(_ORDER.popleft(), None)
        _ORDER.append(ck)
        _CACHE[ck] = hit
    return hit


def check_record(raw: bytes, rec: dict, public: Ed25519PublicKey | None
                 ) -> tuple[bool, bool | None]:
    """(line is canonical, signature verifies with ``public``; None without a key)."""
    sig_text = rec.get("sig")
    sig = b64_strict(sig_text)
    if public is not None and sig is not None and len(sig) == 64:
        needle = b',"sig":"' + sig_text.encode("ascii") + b'"'
        pos = raw.find(needle)
        if pos > 0 and raw.find(needle, pos + 1) == -1 and _sig_in_place(rec):
            try:
                public.verify(sig, raw[:pos] + raw[pos + len(needle):])
                return True, True
            except InvalidSignature:
                pass
    try:
        canon = canonical(rec) == raw
    except ValueError:
        canon = False
    if public is None:
        return canon, None
    if sig is None or len(sig) != 64:
        return canon, False
    try:
        public.verify(sig, signed_body(rec))
    except (InvalidSignature, ValueError):
        return canon, False
    return canon, True


@dataclass
class SegmentCheck:
    """What a worker found in one segment: the lines whose check failed, and the public key
    it used per key_id (the verifier uses a result only if it trusts that very key)."""

    failures: dict[int, tuple[bool, bool]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    cpu: float = 0.0  # CPU seconds the worker spent on it


def check_segment(name: str, path: str | None, data: bytes | None,
                  keys: dict[str, bytes]) -> SegmentCheck:
    """Check every record of one segment (runs in a worker process)."""
    cpu0 = time.process_time()
    publics = {k: Ed25519PublicKey.from_public_bytes(raw) for k, raw in keys.items()}
    out = SegmentCheck(keys=dict(keys))
    src = Source(name, path=None if path is None else Path(path), data=data)
    try:
        for lineno, _off, raw, _term in iter_lines(src):
            try:
                rec = loads_record(raw)
            except ValueError:
                continue
            if record_error(rec) is not None:
                continue
            if rec["kind"] == "key_rotation":
                _learn(rec, publics, out.keys)
            public = publics.get(rec["key_id"])
            if public is None:
                continue
            canon, ok = check_record(raw, rec, public)
            if not (canon and ok):
                out.failures[lineno] = (canon, bool(ok))
    except SegmentReadError:
        pass  # the verifier reports it when it reads the file itself
    out.cpu = time.process_time() - cpu0
    return out


def _learn(rec: dict, publics: dict, keys: dict[str, bytes]) -> None:
    """A key announced by a key_rotation record: a candidate only. Whether the chain trusts it
    is the verifier's decision; a key_id announced with two different keys is not used."""
    raw = b64_strict(rec.get("new_public_key"))
    new_id = rec.get("new_key_id")
    if raw is None or len(raw) != 32 or not isinstance(new_id, str):
        return
    if new_id in keys:
        if keys[new_id] != raw:
            publics.pop(new_id, None)
        return
    try:
        public = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return
    if key_id_for(public) == new_id:
        publics[new_id] = public
        keys[new_id] = raw


def raw_key(public: Ed25519PublicKey) -> bytes:
    return public_raw(public)
