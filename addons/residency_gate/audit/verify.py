"""Offline verification of audit files, CloudTrail-style.

Every problem is named with file, line and seq. Verdicts (``Problem.code``):

  hash-mismatch        a record's prev is not the hash of the record before it
  bad-signature        the signature does not verify with the key named by key_id
  unknown-key          key_id names no trusted key (and no verified hand-over introduced it)
  seq-gap              records are missing (deleted) between two records
  missing-file         a whole segment of a rotation series is missing
  reorder              a record is out of order
  duplicate            a seq appears twice
  moved                a segment's name does not match the seq of its first record
  not-canonical        the line is not the canonical JSON of its content
  invalid-format       not JSON, not a record, a malformed field
  trailing-data        bytes after the last valid record that are not a torn write
  torn-tail            (warning) a partial last line, as left by a crash; or one the writer
                       recorded with a torn_tail record when it resumed the chain
  checkpoint-mismatch  a checkpoint record disagrees with the chain
  rollback             the log holds fewer records than, or a different head from, a signed
                       checkpoint (anchor file or checkpoints-*.jsonl): tail deleted,
                       segment rolled back to an older copy, or log rewritten
  key-change           (warning) records switch key without a key_rotation hand-over
  no-records           nothing to verify
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical, parse
from .chain import (
    CHECKPOINTS_PREFIX,
    HEX64_RE,
    VERSION,
    ZERO_HASH,
    b64_strict,
    line_hash,
    origin_safe,
    parse_segment_name,
    verify_signature,
)
from .keys import key_id_for

ERROR = "error"
WARNING = "warning"


@dataclass
class Problem:
    code: str
    message: str
    file: str | None = None
    line: int | None = None
    seq: int | None = None
    origin: str | None = None
    severity: str = ERROR

    def text(self) -> str:
        loc = self.file or "-"
        if self.line is not None:
            loc += f":{self.line}"
        if self.seq is not None:
            loc += f": seq {self.seq}"
        sev = "warning: " if self.severity == WARNING else ""
        return f"{loc}: {sev}{self.code}: {self.message}"


@dataclass
class OriginReport:
    origin: str
    files: list[str] = field(default_factory=list)
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    vouched: list[tuple[int, int]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    anchored_size: int | None = None  # largest signed checkpoint size the log satisfies


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    origins: dict[str, OriginReport] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    records: list[tuple[str, int, dict]] | None = None  # (file, line, record) if collected

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self, severity: str | None = None) -> set[str]:
        return {p.code for p in self.problems if severity is None or p.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "problems": [asdict(p) for p in self.problems],
            "origins": {
                o: {**asdict(r), "vouched": [list(v) for v in r.vouched]}
                for o, r in self.origins.items()
            },
        }


# ---------------------------------------------------------------------------- inputs


def collect_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(log files, checkpoint files). Raises FileNotFoundError for a missing path."""
    logs: list[Path] = []
    cps: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.glob("*.jsonl")):
                (cps if f.name.startswith(CHECKPOINTS_PREFIX) else logs).append(f)
        elif p.is_file():
            (cps if p.name.startswith(CHECKPOINTS_PREFIX) else logs).append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return list(dict.fromkeys(logs)), list(dict.fromkeys(cps))


@dataclass
class _Line:
    file: str
    lineno: int
    offset: int
    raw: bytes
    terminated: bool
    obj: Any = None
    error: str | None = None
    hash: str = ""


def _split(name: str, data: bytes) -> list[_Line]:
    out = []
    pos = 0
    n = 1
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl == -1:
            raw, term, nxt = data[pos:], False, len(data)
        else:
            raw, term, nxt = data[pos:nl], True, nl + 1
        ln = _Line(name, n, pos, raw, term)
        try:
            ln.obj = parse(raw)
        except ValueError as exc:
            ln.error = str(exc).splitlines()[0][:200]
        ln.hash = line_hash(raw)
        out.append(ln)
        pos = nxt
        n += 1
    return out


_REQUIRED: dict[str, type] = {
    "origin": str, "seq": int, "ts": str, "kind": str, "prev": str, "key_id": str, "sig": str,
}


def _record_error(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "not a JSON object"
    if obj.get("v") != VERSION:
        return f"unsupported or missing version v={obj.get('v')!r}"
    for name, typ in _REQUIRED.items():
        val = obj.get(name)
        if not isinstance(val, typ) or isinstance(val, bool):
            return f"missing or malformed field {name!r}"
    if obj["seq"] < 0:
        return "negative seq"
    if not HEX64_RE.match(obj["prev"]):
        return "prev is not 64 lower-case hex digits"
    return None


def _looks_torn(raw: bytes) -> bool:
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


# ---------------------------------------------------------------------------- verify


class _Verifier:
    def __init__(self, pubkeys: dict[str, Ed25519PublicKey] | None, collect: bool):
        self.base_keys = dict(pubkeys or {})
        self.report = Report(records=[] if collect else None)
        self.chain_hash: dict[str, dict[int, str]] = {}  # origin -> seq -> line hash
        self.trusted: dict[str, dict[str, Ed25519PublicKey]] = {}

    def add(self, code, message, ln: _Line | None = None, seq=None, origin=None,
            severity=ERROR, file=None, line=None):
        self.report.problems.append(Problem(
            code, message, file=file or (ln.file if ln else None),
            line=line if line is not None else (ln.lineno if ln else None),
            seq=seq, origin=origin, severity=severity))

    # -- logs ---------------------------------------------------------------------

    def run_logs(self, files: dict[str, bytes]) -> None:
        per_file: dict[str, list[_Line]] = {name: _split(name, data) for name, data in files.items()}
        self.report.files = list(files)
        by_origin: dict[str, list[str]] = {}
        safe_to_origin: dict[str, str] = {}
        file_origin: dict[str, str | None] = {}
        for name, lines in per_file.items():
            origin = next((ln.obj["origin"] for ln in lines if isinstance(ln.obj, dict)
                           and isinstance(ln.obj.get("origin"), str)), None)
            file_origin[name] = origin
            if origin is not None:
                safe_to_origin.setdefault(origin_safe(origin), origin)
        for name, lines in per_file.items():
            origin = file_origin[name]
            if origin is None:
                parsed = parse_segment_name(Path(name).name)
                origin = safe_to_origin.get(parsed[0]) if parsed else None
                if origin is None:
                    origin = parsed[0] if parsed else f"?{name}"
            if not lines:
                continue
            by_origin.setdefault(origin, []).append(name)

        def order(name: str):
            parsed = parse_segment_name(Path(name).name)
            first = next((ln.obj.get("seq") for ln in per_file[name] if isinstance(ln.obj, dict)
                          and isinstance(ln.obj.get("seq"), int)), None)
            return (parsed[1] if parsed else (first if first is not None else 0), name)

        for origin, names in by_origin.items():
            names.sort(key=order)
            self.run_origin(origin, names, per_file)

    def run_origin(self, origin: str, names: list[str], per_file: dict[str, list[_Line]]):
        rep = OriginReport(origin=origin, files=list(names))
        self.report.origins[origin] = rep
        trusted = dict(self.base_keys)
        self.trusted[origin] = trusted
        hashes: dict[int, str] = {}
        alts: dict[int, set[str]] = {}  # every line hash seen per seq (duplicates included)
        self.chain_hash[origin] = hashes

        # pass 1: which lines are records, every seq present, the torn_tail claims
        entries: list[tuple[str, _Line]] = []
        for name in names:
            for ln in per_file[name]:
                entries.append((name, ln))
        all_seqs: set[int] = set()
        torn_claims: dict[tuple, int] = {}
        for _name, ln in entries:
            if ln.obj is not None and _record_error(ln.obj) is None:
                all_seqs.add(ln.obj["seq"])
                o = ln.obj
                if o.get("kind") == "torn_tail" and o.get("origin") == origin:
                    torn_claims[(o.get("file"), o.get("offset"), o.get("length"),
                                 o.get("sha256"))] = o["seq"]
        last_record_idx = max((i for i, (_n, ln) in enumerate(entries) if ln.obj is not None
                               and _record_error(ln.obj) is None), default=-1)

        expected = 0
        prev_hash = ZERO_HASH
        prev_seq: int | None = None
        chain_key: str | None = None
        handed_over: str | None = None
        ranges: list[list[int]] = []
        cur: list[int] | None = None
        file_first: dict[str, bool] = {}
        keys_seen: list[str] = []

        for idx, (name, ln) in enumerate(entries):
            first_in_file = not file_first.get(name)
            # ---------- damaged lines
            rec_err = _record_error(ln.obj) if ln.obj is not None else ln.error
            if ln.obj is not None and rec_err is None and ln.obj["origin"] != origin:
                rec_err = f"record of origin {ln.obj['origin']!r} in a file of origin {origin!r}"
            if rec_err is not None:
                if not self._damaged(ln, name, idx, last_record_idx, torn_claims, rec_err,
                                     origin):
                    cur = None
                continue
            file_first[name] = True
            rec = ln.obj
            seq = rec["seq"]
            if not ln.terminated:
                self.add("torn-tail", "last record lacks its final newline (crash just "
                         "before it was completed?)", ln, seq, origin, WARNING)
            authentic = True
            linked = False
            # ---------- segment name
            if first_in_file:
                parsed = parse_segment_name(Path(name).name)
                if parsed and parsed[1] != seq:
                    self.add("moved", f"file name says the segment starts at seq {parsed[1]} "
                             f"but its first record is seq {seq}", ln, seq, origin)
            # ---------- order
            alts.setdefault(seq, set()).add(ln.hash)
            if seq in hashes:
                if hashes[seq] == ln.hash:
                    self.add("duplicate", f"seq {seq} appears twice (copy of an earlier "
                             "record)", ln, seq, origin)
                else:
                    self.add("duplicate", f"seq {seq} appears twice with different content",
                             ln, seq, origin)
                cur = None
                continue
            if seq > expected:
                missing = range(expected, seq)
                if any(m in all_seqs for m in missing):
                    self.add("reorder", f"seq {seq} appears before seq {expected}",
                             ln, seq, origin)
                elif first_in_file:
                    span = f"{expected}" if seq - 1 == expected else f"{expected}-{seq - 1}"
                    self.add("missing-file", f"records {span} are missing before {name}: "
                             f"a segment of the series (starting with "
                             f"{origin_safe(origin)}-{expected:012d}.jsonl) is missing",
                             ln, seq, origin)
                else:
                    span = f"{expected}" if seq - 1 == expected else f"{expected}-{seq - 1}"
                    self.add("seq-gap", f"record(s) {span} missing (expected seq {expected})",
                             ln, seq, origin)
            elif seq < expected:
                self.add("reorder", f"seq {seq} appears after seq {expected - 1}",
                         ln, seq, origin)
            elif rec["prev"] != prev_hash and rec["prev"] not in alts.get(seq - 1, ()):
                what = ("the chain start (64 zeros)" if seq == 0
                        else f"the hash of seq {prev_seq}")
                self.add("hash-mismatch", f"prev does not match {what}: seq {prev_seq} was "
                         "altered, or this record does not belong here"
                         if seq else f"prev does not match {what}", ln, seq, origin)
            else:
                linked = True
            # ---------- canonical form
            try:
                canon = canonical(rec) == ln.raw
            except ValueError:
                canon = False
            if not canon:
                self.add("not-canonical", "line is not canonical JSON (key order, whitespace "
                         "or escaping changed)", ln, seq, origin)
                authentic = False
            # ---------- signature
            key_id = rec["key_id"]
            public = trusted.get(key_id)
            if public is None:
                self.add("unknown-key", f"signed with {key_id}, which is not a trusted key",
                         ln, seq, origin)
                authentic = False
            elif not verify_signature(rec, public):
                self.add("bad-signature", f"signature does not verify with {key_id}",
                         ln, seq, origin)
                authentic = False
            else:
                if key_id not in keys_seen:
                    keys_seen.append(key_id)
                if chain_key is not None and key_id != chain_key and key_id != handed_over:
                    self.add("key-change", f"key changes from {chain_key} to {key_id} without a "
                             "key_rotation hand-over", ln, seq, origin, WARNING)
                chain_key = key_id
                handed_over = None
            # ---------- kind-specific
            if authentic:
                kind_err = self._kind_checks(rec, ln, origin, trusted, per_file)
                if rec["kind"] == "key_rotation" and kind_err is None:
                    handed_over = rec["new_key_id"]
                if kind_err:
                    self.add(*kind_err, ln, seq, origin)
                    authentic = rec["kind"] == "checkpoint"  # a checkpoint's own data is fine
            # ---------- bookkeeping
            hashes[seq] = ln.hash
            if seq >= expected:
                expected = seq + 1
                prev_hash = ln.hash
                prev_seq = seq
            rep.records += 1
            rep.first_seq = seq if rep.first_seq is None else min(rep.first_seq, seq)
            rep.last_seq = seq if rep.last_seq is None else max(rep.last_seq, seq)
            if self.report.records is not None:
                self.report.records.append((name, ln.lineno, rec))
            if authentic and linked and cur is not None and cur[1] == seq - 1:
                cur[1] = seq
            elif authentic:
                cur = [seq, seq]
                ranges.append(cur)
            else:
                cur = None
        rep.vouched = [(a, b) for a, b in ranges]
        rep.keys = keys_seen

    def _damaged(self, ln, name, idx, last_record_idx, torn_claims, err, origin):
        claim = torn_claims.get((Path(name).name, ln.offset, len(ln.raw), line_hash(ln.raw)))
        if claim is not None and _looks_torn(ln.raw):
            self.add("torn-tail", f"{len(ln.raw)} bytes of a torn write at offset {ln.offset}; "
                     f"recovered by the writer (torn_tail record seq {claim})", ln, None, origin,
                     WARNING)
            return True
        after_last = idx > last_record_idx
        if after_last and not ln.terminated and _looks_torn(ln.raw):
            self.add("torn-tail", f"partial last line ({len(ln.raw)} bytes at offset "
                     f"{ln.offset}), as left by a crash mid-write; not part of the vouched "
                     "range", ln, None, origin, WARNING)
        elif after_last:
            self.add("trailing-data", f"{len(ln.raw)} bytes after the last valid record "
                     f"({err or 'not a record'})", ln, None, origin)
        elif not ln.terminated:
            self.add("torn-tail", "partial line in the middle of the chain, not recorded by "
                     "the writer", ln, None, origin)
        else:
            self.add("invalid-format", err or "not a record", ln, None, origin)
        return False

    def _kind_checks(self, rec, ln, origin, trusted, per_file):
        kind = rec["kind"]
        if kind == "key_rotation":
            raw = b64_strict(rec.get("new_public_key"))
            if raw is None or len(raw) != 32:
                return ("invalid-format", "key_rotation without a valid new_public_key")
            new = Ed25519PublicKey.from_public_bytes(raw)
            if key_id_for(new) != rec.get("new_key_id"):
                return ("invalid-format", "key_rotation: new_key_id does not match the key")
            trusted[rec["new_key_id"]] = new
        elif kind == "checkpoint":
            if rec.get("size") != rec["seq"] or rec.get("head") != rec["prev"]:
                return ("checkpoint-mismatch", "checkpoint size/head do not match its place in "
                        "the chain")
        elif kind == "torn_tail":
            f = rec.get("file")
            if not isinstance(f, str) or not any(Path(n).name == f for n in per_file):
                return ("invalid-format", f"torn_tail names file {f!r}, which is not among "
                        "the files verified")
        return None

    # -- checkpoints / anchor --------------------------------------------------------

    def run_checkpoints(self, name: str, data: bytes, is_anchor: bool) -> None:
        lines = _split(name, data)
        best: dict[str, tuple[int, _Line]] = {}
        for i, ln in enumerate(lines):
            if ln.obj is None:
                last = i == len(lines) - 1
                if _looks_torn(ln.raw) and (last or ln.terminated):
                    self.add("torn-tail", "torn checkpoint line (crash while writing it)", ln,
                             severity=WARNING)
                else:
                    self.add("invalid-format", ln.error or "not a checkpoint", ln)
                continue
            o = ln.obj
            if not (isinstance(o, dict) and o.get("v") == VERSION
                    and isinstance(o.get("origin"), str) and isinstance(o.get("size"), int)
                    and not isinstance(o.get("size"), bool) and o["size"] >= 0
                    and isinstance(o.get("head"), str) and isinstance(o.get("key_id"), str)):
                self.add("invalid-format", "not a signed checkpoint", ln)
                continue
            origin, size = o["origin"], o["size"]
            if canonical(o) != ln.raw:
                self.add("not-canonical", "checkpoint line is not canonical JSON", ln,
                         origin=origin)
                continue
            trusted = self.trusted.get(origin, self.base_keys)
            public = trusted.get(o["key_id"])
            if public is None:
                self.add("unknown-key", f"checkpoint signed with {o['key_id']}, which is not "
                         "a trusted key", ln, origin=origin)
                continue
            if not verify_signature(o, public):
                self.add("bad-signature", "checkpoint signature does not verify", ln,
                         origin=origin)
                continue
            if size == 0:
                continue
            hashes = self.chain_hash.get(origin)
            if hashes is None:
                self.add("missing-file", f"checkpoint covers {size} records of origin "
                         f"{origin!r}, but no files of that origin were given", ln, size - 1,
                         origin)
                continue
            have = hashes.get(size - 1)
            rep = self.report.origins[origin]
            if have is None:
                top = rep.last_seq
                if (top is None or top < size - 1) and (
                        origin not in best or best[origin][0] < size):
                    best[origin] = (size, ln)
                # else: record size-1 is missing in the middle: already a seq-gap
                continue
            if have != o["head"]:
                self.add("rollback", f"record {size - 1} differs from the signed checkpoint "
                         f"(size {size}): the log was rolled back or rewritten", ln, size - 1,
                         origin)
                continue
            if rep.anchored_size is None or rep.anchored_size < size:
                rep.anchored_size = size
        for origin, (size, ln) in best.items():
            rep = self.report.origins[origin]
            have = "no records" if rep.last_seq is None else f"records up to seq {rep.last_seq}"
            self.add("rollback", f"signed checkpoint covers {size} records (seq 0-{size - 1}) "
                     f"but the log has {have}: tail deleted or a segment restored from an "
                     "older copy", ln, size - 1, origin)


def verify_bytes(
    logs: dict[str, bytes],
    checkpoints: dict[str, bytes] | None = None,
    pubkeys: dict[str, Ed25519PublicKey] | None = None,
    anchor: tuple[str, bytes] | None = None,
    *,
    collect_records: bool = False,
) -> Report:
    """Verify in-memory files (name -> bytes); names are used for segments and messages."""
    v = _Verifier(pubkeys, collect_records)
    v.run_logs(logs)
    for name, data in (checkpoints or {}).items():
        v.run_checkpoints(name, data, is_anchor=False)
    if anchor is not None:
        v.run_checkpoints(anchor[0], anchor[1], is_anchor=True)
    if not v.report.origins:
        v.add("no-records", "no audit records found")
    return v.report


def verify(
    paths: list[Path],
    pubkeys: dict[str, Ed25519PublicKey] | None,
    anchor: Path | None,
    *,
    collect_records: bool = False,
) -> Report:
    """Verify audit files and directories (see module doc). Raises OSError on unreadable input."""
    logs, cps = collect_files(paths)
    log_data = {str(p): p.read_bytes() for p in logs}
    cp_data = {str(p): p.read_bytes() for p in cps}
    anchor_data = (str(anchor), Path(anchor).read_bytes()) if anchor else None
    return verify_bytes(log_data, cp_data, pubkeys, anchor_data,
                        collect_records=collect_records)


def iter_records(paths: list[Path]) -> Iterator[tuple[str, int, dict]]:
    """(file, line, record) for every parseable record, in file order; no verification."""
    logs, _ = collect_files(paths)

    def order(p: Path):
        parsed = parse_segment_name(p.name)
        return (parsed[0], parsed[1], p.name) if parsed else (p.name, 0, p.name)

    for p in sorted(logs, key=order):
        with open(p, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    obj = parse(raw.rstrip(b"\n"))
                except ValueError:
                    continue
                if isinstance(obj, dict) and _record_error(obj) is None:
                    yield str(p), n, obj
