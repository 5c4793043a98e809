"""Where a writer resumes one origin's chain at open: the last intact record (seq, hash,
key), the segment to continue or start, and damaged bytes after that record (a torn write)
that the writer keeps and describes with a ``torn_tail`` record. Reading only: the writer
acts on what this finds (chain_writer.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .canonical import canonical, parse
from .chain import (
    COMPRESSED_SUFFIXES,
    HEX64_RE,
    VERSION,
    ZERO_HASH,
    line_hash,
    origin_safe,
    parse_segment_name,
    segment_name,
    verify_signature,
)
from .keys import SigningKey
from .segments import read_segment
from .writer_api import AuditError

log = logging.getLogger("residency_gate.audit")


@dataclass
class Resume:
    seq: int                     # the next record's
    prev: str                    # the hash of the last intact record (ZERO_HASH: none)
    last_kind: str | None
    chain_key: str | None        # the key the chain continues from (a hand-over's new key)
    target: Path                 # the segment to write to
    create: bool                 # ... which does not exist yet
    newline_after_last: bool     # the last record, in target, lacks only its newline
    damaged_file: Path | None    # the last segment, when bytes follow the last record
    damage_offset: int
    damage: bytes


def segments(directory: Path, origin: str) -> list[tuple[int, Path]]:
    """This origin's segments in chain order; one per first seq (plain before a
    compressed copy of it, as left by a crash mid-compression)."""
    safe = origin_safe(origin)
    found: dict[int, Path] = {}
    for path in directory.iterdir():
        parsed = parse_segment_name(path.name)
        if parsed and parsed[0] == safe and path.is_file() and (
                parsed[1] not in found
                or found[parsed[1]].name.endswith(COMPRESSED_SUFFIXES)):
            found[parsed[1]] = path
    return sorted(found.items())


def _known_keys(key: SigningKey) -> dict:
    keys = {key.key_id: key.public}
    for k in key.retired:
        keys[k.key_id] = k.public
    return keys


def _valid(line: bytes, keys: dict, path: Path, origin: str, key: SigningKey) -> dict | None:
    """The record if ``line`` is an intact record of this origin; None if damaged."""
    try:
        rec = parse(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or canonical(rec) != line:
        return None
    seq, prev, key_id = rec.get("seq"), rec.get("prev"), rec.get("key_id")
    if (rec.get("v") != VERSION or not isinstance(seq, int) or isinstance(seq, bool)
            or seq < 0 or not isinstance(prev, str) or not HEX64_RE.match(prev)
            or not isinstance(key_id, str) or not isinstance(rec.get("kind"), str)):
        return None
    if rec.get("origin") != origin:
        raise AuditError(f"{path}: holds records of origin {rec.get('origin')!r}, not "
                         f"{origin!r}; use a distinct origin or directory")
    public = keys.get(key_id)
    if public is None:
        raise AuditError(
            f"{path}: seq {seq} is signed with {key_id}, which is neither the current "
            f"audit key ({key.key_id}) nor a retired key in certs_dir; restore that "
            "key (audit-signing-key.<id>.pem) or move the old log away")
    if not verify_signature(rec, public):
        return None
    return rec


def _last_valid(data: bytes, keys: dict, path: Path, origin: str, key: SigningKey):
    """(record, line hash, end offset, needs_newline) of the last intact record, or None."""
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail:
        rec = _valid(tail, keys, path, origin, key)
        if rec is not None:
            return rec, line_hash(tail), len(data), True
    i = end - 1
    while i >= 0:
        start = data.rfind(b"\n", 0, i) + 1
        line = data[start:i]
        rec = _valid(line, keys, path, origin, key) if line else None
        if rec is not None:
            return rec, line_hash(line), i + 1, False
        i = start - 1
    return None


def find_resume(directory: Path, origin: str, key: SigningKey) -> Resume:
    """Where the chain of ``origin`` in ``directory`` goes on (raises AuditError for records
    of another origin or signed by a key that is neither ``key`` nor a retired one)."""
    keys = _known_keys(key)
    segs = segments(directory, origin)
    last = None        # (record, hash, end, needs_newline, path)
    last_data = b""
    for _first, path in reversed(segs):
        data = read_segment(path)
        if path == segs[-1][1]:
            last_data = data
        found = _last_valid(data, keys, path, origin, key)
        if found:
            last = (*found, path)
            break
    if last is None:
        seq, prev, chain_key, last_kind = 0, ZERO_HASH, None, None
    else:
        rec, h, _end, _nl, _p = last
        seq, prev = rec["seq"] + 1, h
        chain_key = (rec.get("new_key_id") if rec["kind"] == "key_rotation"
                     else rec["key_id"])
        last_kind = rec["kind"]
    # where to continue: the last segment, unless its name does not fit the chain
    last_path = segs[-1][1] if segs else None
    damage_offset = 0
    if last_path is None:
        target, create = directory / segment_name(origin, 0), True
    elif last_path.name.endswith(COMPRESSED_SUFFIXES):  # closed for good: start a new one
        target, create = directory / segment_name(origin, seq), True
    elif last is not None and last[4] == last_path:
        target, create, damage_offset = last_path, False, last[2]
    elif segs[-1][0] == seq:
        target, create = last_path, False
    else:
        target, create = directory / segment_name(origin, seq), True
        log.error("audit segment %s does not continue the chain at seq %d; starting %s",
                  last_path, seq, target.name)
    damage = last_data[damage_offset:] if last_path is not None else b""
    return Resume(seq, prev, last_kind, chain_key, target, create,
                  newline_after_last=last is not None and last[3] and last[4] == target,
                  damaged_file=last_path, damage_offset=damage_offset, damage=damage)
