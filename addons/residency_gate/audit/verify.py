"""Offline verification of audit files, CloudTrail-style, one record at a time.

Every problem is named with file, line and seq. Verdicts (``Problem.code``):

  hash-mismatch        a record's prev is not the hash of the record before it
  bad-signature        the signature does not verify with the key named by key_id
  unknown-key          key_id names no trusted key (and no verified hand-over introduced it)
  seq-gap              records are missing (deleted) between two records
  missing-file         a whole segment of a rotation series is missing (also the oldest
                       ones, when no prune record says the writer removed them)
  reorder              a record is out of order
  duplicate            a seq appears twice
  moved                a segment's name does not match the seq of its first record
  not-canonical        the line is not the canonical JSON of its content
  invalid-format       not JSON, not a record, a malformed field, a segment that does not
                       decompress
  trailing-data        bytes after the last valid record that are not a torn write
  torn-tail            (warning) a partial last line, as left by a crash; or one the writer
                       recorded with a torn_tail record when it resumed the chain
  checkpoint-mismatch  a checkpoint record disagrees with the chain
  rollback             the log holds fewer records than, or a different head from, a signed
                       checkpoint (anchor file or checkpoints-*.jsonl): tail deleted,
                       segment rolled back to an older copy, or log rewritten
  key-change           (warning) records switch key without a key_rotation hand-over
  pruned               (warning) the oldest records are gone and a prune record of the writer
                       says it removed them after a checkpoint covering them was published;
                       the chain is verified from that checkpoint
  from-checkpoint      (warning) verification starts at a checkpoint given with
                       --from-checkpoint, and no prune record accounts for the records before
  no-records           nothing to verify

Two modes, the same verdicts (docs/audit.md says what each proves):

- default: every record is parsed, hashed and chained in order. A checkpoint record whose
  signature verifies vouches for the unbroken run of records chained up to it (their bytes
  are fixed by the hashes it signs). Records no valid checkpoint vouches for (the tail after
  the last one, anything next to damage) are checked one by one: canonical form and
  signature.
- thorough: every record's canonical form and signature as well, in worker processes
  (segments in parallel, see signatures.py); the chain is still walked here, in order.

Memory is per origin, not per record: a bounded window of recent hashes, the records since
the last checkpoint (capped), the open gaps, and at most MAX_PROBLEMS problems listed.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical, loads_record
from .chain import (
    HEX64_RE,
    VERSION,
    ZERO_HASH,
    b64_strict,
    origin_safe,
    parse_segment_name,
    record_error,
    verify_signature_uncached,
)
from .checkpoints import (
    CheckpointLine,
    checkpoint_lines,
    checkpoint_lines_or_none,
    load_start,
    start_lines,
)
from .keys import key_id_for, public_raw
from .segments import (
    SegmentReadError,
    Source,
    collect_files,
    compressed_twin,
    file_sha256,
    first_record_fields,
    is_empty,
    iter_lines,
    iter_records,
)
from .signatures import SegmentCheck, check_record_cached, check_segment

__all__ = [
    "ERROR", "WARNING", "OriginReport", "Problem", "Report", "collect_files", "iter_records",
    "load_start", "record_error", "verify", "verify_bytes",
]

ERROR = "error"
WARNING = "warning"
MAX_PROBLEMS = 10_000      # listed; the rest are counted
RECENT = 16_384            # line hashes kept per origin (duplicates, late checkpoints)
CHECKPOINT_HASHES = 50_000  # hashes of checkpoint records kept (checkpoint lines out of order)
MAX_RUN = 4_096            # records waiting for a checkpoint to vouch for them
MAX_PENDING = 1_000        # damaged lines / gaps whose verdict waits for later records
PARALLEL_MIN_BYTES = 8 << 20  # below this, --thorough checks inline (no worker start-up)

OnRecord = Callable[[str, int, dict, bool], None]


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
    anchor_size: int | None = None    # ... of those in the --anchor file
    signatures_checked: int = 0       # records whose own signature was checked
    checkpoints_verified: int = 0     # checkpoint records whose signature verified
    start: dict[str, Any] | None = None  # where verification started, if not at seq 0


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    origins: dict[str, OriginReport] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    mode: str = "default"
    workers: int = 0  # worker processes that checked signatures (--thorough)
    worker_cpu_seconds: float = 0.0
    anchor: str | None = None
    problems_not_listed: int = 0
    records: list[tuple[str, int, dict]] | None = None  # (file, line, record) if collected

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors and not (self.problems_not_listed and self._unlisted_errors)

    _unlisted_errors: bool = False

    def codes(self, severity: str | None = None) -> set[str]:
        return {p.code for p in self.problems if severity is None or p.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "workers": self.workers,
            "worker_cpu_seconds": round(self.worker_cpu_seconds, 3),
            "files": self.files,
            "anchor": self.anchor,
            "problems": [asdict(p) for p in self.problems],
            "problems_not_listed": self.problems_not_listed,
            "origins": {
                o: {**asdict(r), "vouched": [list(v) for v in r.vouched]}
                for o, r in self.origins.items()
            },
        }


def _looks_torn(raw: bytes) -> bool:
    """A strict prefix of a record line, or zero fill: what a crash mid-write leaves."""
    import json

    if raw.strip(b"\0") == b"":
        return True
    if not (raw.startswith(b'{"') or b'{"'.startswith(raw)):
        return False
    try:
        json.JSONDecoder().raw_decode(raw.decode("utf-8", "strict"))
    except (ValueError, UnicodeDecodeError):
        return True  # incomplete: a prefix
    return False  # a complete value followed by more bytes is not a torn write


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


# ---------------------------------------------------------------------------- one origin


class _Rerun(Exception):
    """The fast reading of a line disagreed with the parser: walk the origin again, parsing."""


def _extract(raw: bytes) -> tuple[int, str, str, None] | None:
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


class _Rec:
    __slots__ = ("fidx", "h", "key", "key_id", "kind", "lineno", "linked", "name", "obj",
                 "prev", "raw", "seq")

    def __init__(self, fidx, name, lineno, raw, obj, h, seq, prev, kind, key_id, linked, key):
        self.fidx, self.name, self.lineno, self.raw, self.obj = fidx, name, lineno, raw, obj
        self.h, self.seq, self.prev, self.kind, self.key_id = h, seq, prev, kind, key_id
        self.linked, self.key = linked, key


@dataclass
class _Gap:
    key: tuple
    file: str
    line: int
    seq: int           # the record that revealed it
    first: int         # missing seqs first..last
    last: int
    kind: str          # seq-gap | missing-file | start
    missing: list[list[int]]
    reorder: bool = False


@dataclass
class _Damaged:
    key: tuple
    file: str
    logical: str
    line: int
    offset: int
    raw_len: int
    sha: str
    torn: bool
    terminated: bool
    error: str | None


IMMEDIATE_KINDS = frozenset({"key_rotation", "torn_tail", "prune"})
KIND_CHECKED = frozenset({"key_rotation", "checkpoint", "torn_tail", "prune"})


class _Origin:
    """Walks one origin's segments in chain order."""

    def __init__(self, v: _Verifier, oi: int, origin: str, files: list[Source],
                 start: CheckpointLine | None, fast: bool) -> None:
        self.v = v
        self.oi = oi
        self.origin = origin
        self.fast = fast
        self.files = files
        self.rep = OriginReport(origin=origin, files=[f.name for f in files])
        self.problems: list[tuple[tuple, Problem]] = []
        self.not_listed = 0
        self.unlisted_errors = False
        self.trusted: dict[str, Ed25519PublicKey] = dict(v.base_keys)
        self.trusted_raw: dict[str, bytes] = {k: public_raw(p) for k, p in v.base_keys.items()}
        self.candidates: dict[str, bytes | None] = dict(self.trusted_raw)
        self.start = start
        self.floor = start.size if start else 0
        self.expected = self.floor
        self.prev_hash = start.obj["head"] if start else ZERO_HASH
        self.prev_seq: int | None = self.floor - 1 if start else None
        self.recent: dict[int, str] = {}
        self.recent_order: deque[int] = deque()
        self.alts: dict[int, set[str]] = {}
        self.gaps: list[_Gap] = []
        self.chain_key: str | None = None
        self.handed_over: str | None = None
        self.ranges: list[list[int]] = []
        self.cur: list[int] | None = None
        self.run: list[_Rec] = []
        self.damaged: list[_Damaged] = []
        self.claims: dict[tuple, int] = {}
        self.last_valid: tuple | None = None
        self.first: _Rec | None = None
        self.cp_hashes: dict[int, str] = {}
        self.cp_order: deque[int] = deque()
        self.prunes: list[dict] = []
        self.checks: dict[int, SegmentCheck] = {}  # thorough: worker results per file index
        # external checkpoints, merged with the log as it is read (by size order per source)
        self.cursors: list[Iterator[CheckpointLine]] = []
        self.heads: list[CheckpointLine | None] = []
        self.best: dict[int, CheckpointLine] = {}
        self.cp_next = -1

    # -------------------------------------------------------------- problems

    def add(self, key: tuple, code: str, message: str, *, file=None, line=None, seq=None,
            severity=ERROR, origin: str | None = None) -> None:
        if len(self.problems) >= MAX_PROBLEMS:
            self.not_listed += 1
            self.unlisted_errors |= severity == ERROR
            return
        self.problems.append((key, Problem(code, message, file=file, line=line, seq=seq,
                                           origin=origin or self.origin, severity=severity)))

    # -------------------------------------------------------------- the walk

    def walk(self) -> None:
        v = self.v
        for cursor in v.cp_cursors(self.origin):
            self.cursors.append(cursor)
            self.heads.append(next(cursor, None))
        self._next_cp()
        pool = v.pool if v.thorough else None
        futures: dict[int, Future] = {}
        ahead = 0

        def submit_upto(n: int) -> None:
            nonlocal ahead
            while pool is not None and ahead < min(n, len(self.files)):
                src = self.files[ahead]
                keys = {k: raw for k, raw in self.candidates.items() if raw is not None}
                futures[ahead] = pool.submit(check_segment, src.name,
                                             None if src.path is None else str(src.path),
                                             src.data, keys)
                ahead += 1

        try:
            for fidx, src in enumerate(self.files):
                if pool is not None:
                    submit_upto(fidx + 2 * v.jobs)
                    self.checks = {fidx: futures.pop(fidx).result()}
                    v.report.worker_cpu_seconds += self.checks[fidx].cpu
                self._walk_file(fidx, src)
            self._finish()
        finally:
            for f in futures.values():
                f.cancel()

    def _walk_file(self, fidx: int, src: Source) -> None:
        name = src.name
        logical = src.logical
        first_in_file = True
        oi = self.oi
        origin = self.origin
        sha = hashlib.sha256
        loads = loads_record
        hex64 = HEX64_RE.match
        extract = _extract if self.fast else None
        lineno = 0
        try:
            for lineno, offset, raw, terminated in iter_lines(src):
                h = sha(raw).hexdigest()
                if extract is not None:
                    fields = extract(raw)
                    if fields is not None:
                        self._record(fidx, name, lineno, raw, terminated, None, h,
                                     first_in_file, *fields)
                        first_in_file = False
                        continue
                try:
                    obj = loads(raw)
                except ValueError as exc:
                    self._damage(fidx, name, logical, lineno, offset, raw, terminated,
                                 str(exc).splitlines()[0][:200], h)
                    continue
                try:  # the common case, quickly; record_error() says what is wrong
                    seq = obj["seq"]
                    ok = (type(seq) is int and seq >= 0 and obj["v"] == VERSION
                          and obj["origin"] == origin and type(obj["ts"]) is str
                          and type(obj["kind"]) is str and type(obj["key_id"]) is str
                          and type(obj["sig"]) is str
                          and (obj["prev"] == self.prev_hash
                               or (type(obj["prev"]) is str and hex64(obj["prev"]))))
                except (KeyError, TypeError, IndexError):
                    ok = False
                if not ok:
                    err = record_error(obj)
                    if err is None and obj["origin"] != origin:
                        err = (f"record of origin {obj['origin']!r} in a file of origin "
                               f"{origin!r}")
                        self.last_valid = (0, oi, fidx, lineno)
                    if err is not None:
                        self._damage(fidx, name, logical, lineno, offset, raw, terminated,
                                     err, h)
                        continue
                self._record(fidx, name, lineno, raw, terminated, obj, h, first_in_file,
                             obj["seq"], obj["prev"], obj["kind"], obj["key_id"])
                first_in_file = False
        except SegmentReadError as exc:
            self.add((0, oi, fidx, lineno + 1, 0), "invalid-format",
                     f"{exc}; the rest of this segment cannot be read", file=name,
                     line=lineno + 1)

    # -------------------------------------------------------------- damaged lines

    def _damage(self, fidx, name, logical, lineno, offset, raw, terminated, err, h) -> None:
        d = _Damaged((0, self.oi, fidx, lineno, 0), name, logical, lineno, offset, len(raw),
                     h, _looks_torn(raw), terminated, err)
        self.damaged.append(d)
        if len(self.damaged) > MAX_PENDING:
            self._resolve_damaged(self.damaged.pop(0))

    def _resolve_damaged(self, d: _Damaged) -> None:
        claim = self.claims.get((d.logical, d.offset, d.raw_len, d.sha))
        if claim is not None and d.torn:
            self.add(d.key, "torn-tail", f"{d.raw_len} bytes of a torn write at offset "
                     f"{d.offset}; recovered by the writer (torn_tail record seq {claim})",
                     file=d.file, line=d.line, severity=WARNING)
            return
        after_last = self.last_valid is None or d.key > self.last_valid
        if after_last and not d.terminated and d.torn:
            self.add(d.key, "torn-tail", f"partial last line ({d.raw_len} bytes at offset "
                     f"{d.offset}), as left by a crash mid-write; not part of the vouched "
                     "range", file=d.file, line=d.line, severity=WARNING)
        elif after_last:
            self.add(d.key, "trailing-data", f"{d.raw_len} bytes after the last valid record "
                     f"({d.error or 'not a record'})", file=d.file, line=d.line)
        elif not d.terminated:
            self.add(d.key, "torn-tail", "partial line in the middle of the chain, not "
                     "recorded by the writer", file=d.file, line=d.line)
        else:
            self.add(d.key, "invalid-format", d.error or "not a record", file=d.file,
                     line=d.line)

    # -------------------------------------------------------------- one record

    def _seen(self, seq: int) -> bool:
        if seq in self.recent:
            return True
        if seq >= self.expected or seq < self.floor:
            return False
        return self._gap_of(seq) is None

    def _gap_of(self, seq: int) -> tuple[_Gap, int] | None:
        for g in reversed(self.gaps):
            if g.first <= seq <= g.last:
                for i, (a, b) in enumerate(g.missing):
                    if a <= seq <= b:
                        return g, i
                return None
        return None

    def _record(self, fidx, name, lineno, raw, terminated, obj, h, first_in_file,
                seq, prev, kind, key_id) -> None:
        key = (0, self.oi, fidx, lineno)
        if not terminated:
            self.add((*key, 0), "torn-tail", "last record lacks its final newline (crash "
                     "just before it was completed?)", file=name, line=lineno, seq=seq,
                     severity=WARNING)
        if first_in_file:
            parsed = parse_segment_name(Path(name).name)
            if parsed and parsed[1] != seq:
                self.add((*key, 1), "moved", f"file name says the segment starts at seq "
                         f"{parsed[1]} but its first record is seq {seq}", file=name,
                         line=lineno, seq=seq)
        expected = self.expected
        linked = False
        okey = (*key, 2)
        e = _Rec(fidx, name, lineno, raw, obj, h, seq, prev, kind, key_id, False, key)
        if seq != expected and self._seen(seq):
            self._materialize(e)
            known = self.recent.get(seq)
            if known == h:
                msg = f"seq {seq} appears twice (copy of an earlier record)"
            elif known is not None:
                msg = f"seq {seq} appears twice with different content"
            else:
                msg = f"seq {seq} appears twice"
            self.add(okey, "duplicate", msg, file=name, line=lineno, seq=seq)
            if known is not None:
                self.alts.setdefault(seq, {known}).add(h)
            self._settle_run()
            self.cur = None
            self.last_valid = key
            if self.v.on_record is not None:
                self.v.on_record(name, lineno, e.obj, False)
            return
        if seq > expected:
            gkind = ("start" if self.first is None and expected == self.floor
                     else "missing-file" if first_in_file else "seq-gap")
            self.gaps.append(_Gap(okey, name, lineno, seq, expected, seq - 1, gkind,
                                  [[expected, seq - 1]]))
            if len(self.gaps) > MAX_PENDING:
                self._resolve_gap(self.gaps.pop(0))
        elif seq < expected:
            found = self._gap_of(seq)
            if found is not None:
                g, i = found
                a, b = g.missing[i]
                g.missing[i:i + 1] = [x for x in ([a, seq - 1], [seq + 1, b]) if x[0] <= x[1]]
                if not g.reorder:
                    g.reorder = True
                    self.add(g.key, "reorder", f"seq {g.seq} appears before seq {g.first}",
                             file=g.file, line=g.line, seq=g.seq)
            self.add(okey, "reorder", f"seq {seq} appears after seq {expected - 1}",
                     file=name, line=lineno, seq=seq)
        elif prev != self.prev_hash and prev not in self.alts.get(seq - 1, ()):
            if seq:
                msg = (f"prev does not match the hash of seq {self.prev_seq}: seq "
                       f"{self.prev_seq} was altered, or this record does not belong here")
            else:
                msg = "prev does not match the chain start (64 zeros)"
            self.add(okey, "hash-mismatch", msg, file=name, line=lineno, seq=seq)
        else:
            linked = True
        e.linked = linked
        # order bookkeeping (authenticity is settled below, or when a checkpoint comes)
        recent = self.recent
        if seq not in recent:
            self.recent_order.append(seq)
            if len(self.recent_order) > RECENT:
                del recent[self.recent_order.popleft()]
        recent[seq] = h
        if seq >= expected:
            self.expected = seq + 1
            self.prev_hash = h
            self.prev_seq = seq
        rep = self.rep
        rep.records += 1
        if rep.first_seq is None or seq < rep.first_seq:
            rep.first_seq = seq
        if rep.last_seq is None or seq > rep.last_seq:
            rep.last_seq = seq
        self.last_valid = key
        if self.first is None:
            self.first = e
        if kind == "checkpoint":
            if seq not in self.cp_hashes:
                self.cp_order.append(seq)
                if len(self.cp_order) > CHECKPOINT_HASHES:
                    del self.cp_hashes[self.cp_order.popleft()]
            self.cp_hashes[seq] = h
        elif kind in IMMEDIATE_KINDS:
            obj = self._materialize(e)
            if kind == "torn_tail":
                self.claims[(obj.get("file"), obj.get("offset"), obj.get("length"),
                             obj.get("sha256"))] = seq
            elif kind == "key_rotation":
                self._candidate(obj)
        # authenticity
        if self.v.thorough:
            self._settle(e, None)
        elif (kind in IMMEDIATE_KINDS or seq < expected or not terminated
              or (key_id is not None and key_id not in self.trusted)):
            self._settle_run()
            self._settle(e, None)
        else:
            if self.run and prev != self.run[-1].h:
                self._settle_run()
            run = self.run
            run.append(e)
            if kind == "checkpoint":
                self._close_run()
            elif len(run) > MAX_RUN:
                for old in run[: MAX_RUN // 2]:
                    self._settle(old, None)
                del run[: MAX_RUN // 2]
        if seq >= self.cp_next >= 0:
            self._advance_cps(seq)

    def _materialize(self, e: _Rec) -> dict:
        """The parsed record; for a line read the fast way, parsed now and held to what was
        read (a disagreement means this origin is walked again, parsing every line)."""
        if e.obj is None:
            try:
                obj = loads_record(e.raw)
            except ValueError:
                raise _Rerun from None
            if (record_error(obj) is not None or obj["origin"] != self.origin
                    or obj["seq"] != e.seq or obj["prev"] != e.prev or obj["kind"] != e.kind):
                raise _Rerun
            e.obj = obj
            e.key_id = obj["key_id"]
        return e.obj

    def _candidate(self, obj: dict) -> None:
        raw = b64_strict(obj.get("new_public_key"))
        new_id = obj.get("new_key_id")
        if raw is None or len(raw) != 32 or not isinstance(new_id, str):
            return
        known = self.candidates.get(new_id, raw)
        self.candidates[new_id] = raw if known == raw else None

    # -------------------------------------------------------------- authenticity

    def _close_run(self) -> None:
        """The run ends in a checkpoint record: if its signature verifies (and it agrees with
        its place in the chain), it vouches for every record of the run."""
        run = self.run
        cp = run[-1]
        obj = self._materialize(cp)
        check = self._check(cp)
        ok = (check == (True, True) and obj.get("size") == cp.seq
              and obj.get("head") == cp.prev)
        self.run = []
        if ok:
            self.rep.checkpoints_verified += 1
            for e in run[:-1]:
                if e.key_id is None:  # read the fast way: written with the checkpoint's key
                    e.key_id = cp.key_id
                self._settle(e, (True, True), vouched=True)
            self._settle(cp, check)
        else:
            for e in run[:-1]:
                self._settle(e, None)
            self._settle(cp, check)

    def _settle_run(self) -> None:
        if self.run:
            run, self.run = self.run, []
            for e in run:
                self._settle(e, None)

    def _check(self, e: _Rec) -> tuple[bool, bool | None]:
        """(canonical, signature) of a record: the worker's answer or checked here."""
        obj = self._materialize(e)
        public = self.trusted.get(e.key_id)
        result = self.checks.get(e.fidx)
        if result is not None and public is not None:
            used = result.keys.get(e.key_id)
            if used is not None and used == self.trusted_raw.get(e.key_id):
                return result.failures.get(e.lineno, (True, True))
        return check_record_cached(e.raw, e.h, obj, public, self.trusted_raw.get(e.key_id))

    def _settle(self, e: _Rec, check: tuple[bool, bool | None] | None,
                vouched: bool = False) -> None:
        seq = e.seq
        if check is None:
            check = self._check(e)
        key_id = e.key_id
        public = self.trusted.get(key_id)
        canon, sig_ok = check
        if not vouched and public is not None:
            self.rep.signatures_checked += 1
        authentic = True
        if not canon:
            self.add((*e.key, 3), "not-canonical", "line is not canonical JSON (key order, "
                     "whitespace or escaping changed)", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        if public is None:
            self.add((*e.key, 4), "unknown-key", f"signed with {key_id}, which is not a "
                     "trusted key", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        elif not sig_ok:
            self.add((*e.key, 4), "bad-signature", f"signature does not verify with "
                     f"{key_id}", file=e.name, line=e.lineno, seq=seq)
            authentic = False
        else:
            if key_id != self.chain_key:
                if key_id not in self.rep.keys:
                    self.rep.keys.append(key_id)
                if self.chain_key is not None and key_id != self.handed_over:
                    self.add((*e.key, 5), "key-change", f"key changes from {self.chain_key} "
                             f"to {key_id} without a key_rotation hand-over", file=e.name,
                             line=e.lineno, seq=seq, severity=WARNING)
                self.chain_key = key_id
            self.handed_over = None
        kind = e.kind
        if authentic and kind in KIND_CHECKED:
            rec = self._materialize(e)
            kind_err = self._kind_checks(rec)
            if kind == "key_rotation" and kind_err is None:
                self.handed_over = rec["new_key_id"]
            if kind_err:
                self.add((*e.key, 6), kind_err[0], kind_err[1], file=e.name, line=e.lineno,
                         seq=seq)
                authentic = kind == "checkpoint"  # a checkpoint's own data is fine
        cur = self.cur
        if authentic and e.linked and cur is not None and cur[1] == seq - 1:
            cur[1] = seq
        elif authentic:
            self.cur = [seq, seq]
            self.ranges.append(self.cur)
        else:
            self.cur = None
        if self.v.on_record is not None:
            self.v.on_record(e.name, e.lineno, e.obj, authentic)
        if self.v.collected is not None:
            self.v.collected.append((e.name, e.lineno, self._materialize(e)))

    def _kind_checks(self, rec: dict) -> tuple[str, str] | None:
        kind = rec["kind"]
        if kind == "key_rotation":
            raw = b64_strict(rec.get("new_public_key"))
            if raw is None or len(raw) != 32:
                return ("invalid-format", "key_rotation without a valid new_public_key")
            new = Ed25519PublicKey.from_public_bytes(raw)
            if key_id_for(new) != rec.get("new_key_id"):
                return ("invalid-format", "key_rotation: new_key_id does not match the key")
            self.trusted[rec["new_key_id"]] = new
            self.trusted_raw[rec["new_key_id"]] = raw
        elif kind == "checkpoint":
            if rec.get("size") != rec["seq"] or rec.get("head") != rec["prev"]:
                return ("checkpoint-mismatch", "checkpoint size/head do not match its place "
                        "in the chain")
        elif kind == "torn_tail":
            f = rec.get("file")
            if not isinstance(f, str) or f not in self.v.logical_names:
                return ("invalid-format", f"torn_tail names file {f!r}, which is not among "
                        "the files verified")
        elif kind == "prune":
            cp = rec.get("checkpoint")
            through = rec.get("through")
            if not (type(through) is int and isinstance(cp, dict)
                    and cp.get("size") == through + 1 and isinstance(cp.get("head"), str)
                    and HEX64_RE.match(cp["head"])):
                return ("invalid-format", "prune record without a valid through/checkpoint")
            if len(self.prunes) < MAX_PENDING:
                self.prunes.append(rec)
        return None

    # -------------------------------------------------------------- external checkpoints

    def _next_cp(self) -> None:
        sizes = [h.size - 1 for h in self.heads if h is not None]
        self.cp_next = min(sizes) if sizes else -1

    def _advance_cps(self, seq: int) -> None:
        for i, head in enumerate(self.heads):
            cursor = self.cursors[i]
            while head is not None and head.size - 1 <= seq:
                self._cp_line(head, seq)
                head = next(cursor, None)
            self.heads[i] = head
        self._next_cp()

    def _hash_at(self, seq: int) -> str | None:
        h = self.recent.get(seq)
        return h if h is not None else self.cp_hashes.get(seq)

    def _cp_line(self, cp: CheckpointLine, top: int | None) -> None:
        """Check one checkpoint line against the log read so far (top: the seq reached)."""
        o = cp.obj
        key = (1, cp.src, cp.lineno)
        if not self.v.cp_authentic(cp, self.trusted, key, self.add):
            return
        size = o["size"]
        if size == 0:
            return
        have = self._hash_at(size - 1)
        if have is None:
            if top is None or top < size - 1:
                best = self.best.get(cp.src)
                if best is None or best.size < size:
                    self.best[cp.src] = cp
            # else: record size-1 is missing in the middle (a gap), pruned, or out of reach
            return
        if have != o["head"]:
            self.add(key, "rollback", f"record {size - 1} differs from the signed checkpoint "
                     f"(size {size}): the log was rolled back or rewritten", file=cp.source,
                     line=cp.lineno, seq=size - 1)
            return
        rep = self.rep
        if rep.anchored_size is None or rep.anchored_size < size:
            rep.anchored_size = size
        if cp.src == self.v.anchor_idx and (rep.anchor_size is None or rep.anchor_size < size):
            rep.anchor_size = size

    # -------------------------------------------------------------- the end

    def _finish(self) -> None:
        self._settle_run()
        for d in self.damaged:
            self._resolve_damaged(d)
        self.damaged = []
        self._resolve_start()
        for g in self.gaps:
            self._resolve_gap(g)
        top = self.rep.last_seq
        for i, head in enumerate(self.heads):
            cursor = self.cursors[i]
            while head is not None:
                self._cp_line(head, top)
                head = next(cursor, None)
        rep = self.rep
        for cp in self.best.values():
            size = cp.size
            have = ("no records" if rep.last_seq is None
                    else f"records up to seq {rep.last_seq}")
            self.add((1, cp.src, float("inf"), self.oi), "rollback",
                     f"signed checkpoint covers {size} records (seq 0-{size - 1}) but the log "
                     f"has {have}: tail deleted or a segment restored from an older copy",
                     file=cp.source, line=cp.lineno, seq=size - 1)
        rep.vouched = [(a, b) for a, b in self.ranges]

    def _prune_for(self, first: _Rec) -> dict | None:
        """The prune record that accounts for everything before ``first``, if any."""
        for p in reversed(self.prunes):
            cp = p["checkpoint"]
            if cp["size"] == first.seq and cp["head"] == first.prev:
                return p
        return None

    def _resolve_start(self) -> None:
        first = self.first
        if first is None:
            return
        if self.start is not None:
            prune = self._prune_for(first) if first.seq == self.floor else None
            self.rep.start = {"size": self.floor, "head": self.start.obj["head"],
                              "source": self.start.source,
                              "prune_seq": prune["seq"] if prune else None}
            if prune is not None:
                self._pruned_warning(first, prune)
            else:
                self.add((*first.key, 2), "from-checkpoint", f"records 0-{self.floor - 1} not "
                         f"verified: verification starts at the checkpoint given (size "
                         f"{self.floor}, {self.start.source}); no prune record says the writer "
                         "removed them", file=first.name, line=first.lineno, seq=first.seq,
                         severity=WARNING)
            return
        gap = next((g for g in self.gaps if g.kind == "start"), None)
        if gap is None or gap.reorder:
            return
        prune = self._prune_for(first)
        if prune is None:
            return  # stays a gap: missing-file
        self.gaps.remove(gap)
        self.rep.start = {"size": first.seq, "head": first.prev,
                          "source": f"prune record seq {prune['seq']}",
                          "prune_seq": prune["seq"]}
        self._pruned_warning(first, prune)

    def _pruned_warning(self, first: _Rec, prune: dict) -> None:
        how = "archived" if prune.get("action") == "archive" else "deleted"
        self.add((*first.key, 2), "pruned", f"records 0-{first.seq - 1} were {how} by the "
                 f"writer (prune record seq {prune['seq']}: {prune.get('reason') or 'retention'})"
                 f" after a checkpoint covering them (size {first.seq}) was published; "
                 f"verified from that checkpoint", file=first.name, line=first.lineno,
                 seq=first.seq, severity=WARNING)

    def _resolve_gap(self, g: _Gap) -> None:
        if g.reorder:
            return
        span = _span(g.first, g.last)
        if g.kind in ("missing-file", "start"):
            extra = " (and no prune record says the writer removed them)" if g.kind == "start" \
                else ""
            self.add(g.key, "missing-file", f"records {span} are missing before {g.file}: a "
                     f"segment of the series (starting with {origin_safe(self.origin)}-"
                     f"{g.first:012d}.jsonl) is missing{extra}", file=g.file, line=g.line,
                     seq=g.seq)
        else:
            self.add(g.key, "seq-gap", f"record(s) {span} missing (expected seq {g.first})",
                     file=g.file, line=g.line, seq=g.seq)


# ---------------------------------------------------------------------------- the run


class _Verifier:
    def __init__(self, pubkeys: dict[str, Ed25519PublicKey] | None, *, thorough: bool = False,
                 jobs: int | None = None, on_record: OnRecord | None = None) -> None:
        self.base_keys = dict(pubkeys or {})
        self.thorough = thorough
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.on_record = on_record
        self.report = Report(mode="thorough" if thorough else "default")
        self._problems: list[tuple[tuple, Problem]] = []
        self.cp_sources: list[Source] = []
        self.anchor_idx = -1
        self.logical_names: set[str] = set()
        self.pool: ProcessPoolExecutor | None = None
        self.collected: list[tuple[str, int, dict]] | None = None
        self._cp_checked: dict[tuple[int, int], bool] = {}

    def add(self, key: tuple, code: str, message: str, *, file=None, line=None, seq=None,
            origin=None, severity=ERROR) -> None:
        if len(self._problems) >= MAX_PROBLEMS:
            self.report.problems_not_listed += 1
            if severity == ERROR:
                self.report._unlisted_errors = True
            return
        self._problems.append((key, Problem(code, message, file=file, line=line, seq=seq,
                                            origin=origin, severity=severity)))

    # -------------------------------------------------------------- checkpoint files

    def cp_cursors(self, origin: str) -> Iterator[Iterator[CheckpointLine]]:
        """Per checkpoint file, its valid lines of ``origin`` in file order."""
        for idx, src in enumerate(self.cp_sources):
            yield (x for x in checkpoint_lines_or_none(src, idx)
                   if isinstance(x, CheckpointLine) and x.obj["origin"] == origin)

    def cp_authentic(self, cp: CheckpointLine, trusted: dict[str, Ed25519PublicKey],
                     key: tuple, add: Callable[..., None] | None = None) -> bool:
        add = add or self.add
        o = cp.obj
        origin = o["origin"]
        if canonical(o) != cp.raw:
            add(key, "not-canonical", "checkpoint line is not canonical JSON",
                file=cp.source, line=cp.lineno, origin=origin)
            return False
        public = trusted.get(o["key_id"])
        if public is None:
            add(key, "unknown-key", f"checkpoint signed with {o['key_id']}, which is not "
                "a trusted key", file=cp.source, line=cp.lineno, origin=origin)
            return False
        if not verify_signature_uncached(o, public):
            add(key, "bad-signature", "checkpoint signature does not verify",
                file=cp.source, line=cp.lineno, origin=origin)
            return False
        return True

    def scan_checkpoint_files(self, origins: set[str]) -> None:
        """Malformed lines, and the checkpoints of origins no log file was given for."""
        for idx, src in enumerate(self.cp_sources):
            others: dict[str, CheckpointLine] = {}
            try:
                for x in checkpoint_lines(src, idx):
                    if isinstance(x, CheckpointLine):
                        o = x.obj["origin"]
                        if o not in origins and x.size > 0 and (
                                o not in others or others[o].size < x.size):
                            others[o] = x
                        continue
                    lineno, raw, term, err, last = x
                    key = (1, idx, lineno)
                    if err and _looks_torn(raw) and (last or term):
                        self.add(key, "torn-tail", "torn checkpoint line (crash while writing "
                                 "it)", file=src.name, line=lineno, severity=WARNING)
                    else:
                        self.add(key, "invalid-format", err or "not a signed checkpoint",
                                 file=src.name, line=lineno)
            except SegmentReadError as exc:
                self.add((1, idx, 0), "invalid-format", str(exc), file=src.name)
            for o, cp in others.items():
                key = (1, idx, cp.lineno)
                if self.cp_authentic(cp, self.base_keys, key):
                    self.add(key, "missing-file", f"checkpoints cover {cp.size} records of "
                             f"origin {o!r}, but no files of that origin were given",
                             file=cp.source, line=cp.lineno, seq=cp.size - 1, origin=o)

    # -------------------------------------------------------------- logs

    def run(self, logs: list[Source], cps: list[Source], anchor: Source | None,
            starts: list[CheckpointLine]) -> Report:
        self.cp_sources = list(cps) + ([anchor] if anchor is not None else [])
        self.anchor_idx = len(cps) if anchor is not None else -1
        self.report.anchor = anchor.name if anchor is not None else None
        self.report.files = [s.name for s in logs]
        self.logical_names = {s.logical for s in logs}
        by_origin: dict[str, list[tuple[tuple, Source]]] = {}
        safe_to_origin: dict[str, str] = {}
        peeked = []
        for src in logs:
            if is_empty(src):
                continue
            origin, first = first_record_fields(src)
            peeked.append((src, origin, first))
            if origin is not None:
                safe_to_origin.setdefault(origin_safe(origin), origin)
        for src, origin, first in peeked:
            parsed = parse_segment_name(Path(src.name).name)
            if origin is None:
                origin = safe_to_origin.get(parsed[0]) if parsed else None
                if origin is None:
                    origin = parsed[0] if parsed else f"?{src.name}"
            order = (parsed[1] if parsed else (first if first is not None else 0), src.name)
            by_origin.setdefault(origin, []).append((order, src))
        self.scan_checkpoint_files(set(by_origin))
        self._check_twins(logs)
        try:
            if self.thorough and self._parallel(logs):
                ctx = multiprocessing.get_context("forkserver")
                self.pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx)
                self.report.workers = self.jobs
            for oi, (origin, items) in enumerate(by_origin.items()):
                items.sort(key=lambda x: x[0])
                files = [s for _o, s in items]
                first_seq = next((f for s, o, f in peeked if s is files[0]), None)
                start = self._start_for(origin, starts, first_seq)
                fast = (not self.thorough and self.on_record is None
                        and self.collected is None)
                o = _Origin(self, oi, origin, files, start, fast)
                try:
                    o.walk()
                except _Rerun:
                    o = _Origin(self, oi, origin, files, start, False)
                    o.walk()
                self._commit(o)
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
                self.pool = None
        if not self.report.origins:
            self.add((2,), "no-records", "no audit records found")
        self._problems.sort(key=lambda kp: kp[0])
        self.report.problems = [p for _k, p in self._problems]
        return self.report

    def _commit(self, o: _Origin) -> None:
        self.report.origins[o.origin] = o.rep
        for key, p in o.problems:
            self.add(key, p.code, p.message, file=p.file, line=p.line, seq=p.seq,
                     origin=p.origin, severity=p.severity)
        self.report.problems_not_listed += o.not_listed
        self.report._unlisted_errors |= o.unlisted_errors

    def _parallel(self, logs: list[Source]) -> bool:
        if self.jobs < 2:
            return False
        total = 0
        for s in logs:
            total += len(s.data) if s.data is not None else s.path.stat().st_size * (
                8 if s.name.endswith((".zst", ".gz")) else 1)
        return total >= PARALLEL_MIN_BYTES

    def _start_for(self, origin: str, starts: list[CheckpointLine], first_seq: int | None
                   ) -> CheckpointLine | None:
        """The trusted checkpoint the oldest remaining segment continues from, if any."""
        if not first_seq:
            return None
        usable = None
        for cp in starts:
            if cp.obj["origin"] != origin or cp.size > first_seq or cp.size == 0:
                continue
            if usable is None or cp.size > usable.size:
                usable = cp
        if usable is None:
            return None
        key = (-1, usable.src, usable.lineno)
        if not self.cp_authentic(usable, self.base_keys, key):
            return None
        return usable

    def _check_twins(self, logs: list[Source]) -> None:
        for i, src in enumerate(logs):
            if src.path is None or src.name.endswith((".zst", ".gz")):
                continue
            twin = compressed_twin(src.path)
            if twin is None:
                continue
            try:
                same = file_sha256(twin) == file_sha256(src.path)
            except OSError:
                same = False
            if not same:
                self.add((0, -1, i, 0), "invalid-format", f"{twin.name} lies beside "
                         f"{src.path.name} but does not hold the same bytes", file=str(twin))


def verify_sources(logs: list[Source], checkpoints: list[Source],
                   pubkeys: dict[str, Ed25519PublicKey] | None, anchor: Source | None = None,
                   *, thorough: bool = False, jobs: int | None = None,
                   start: Iterable[dict] | None = None,
                   on_record: OnRecord | None = None, collect_records: bool = False) -> Report:
    v = _Verifier(pubkeys, thorough=thorough, jobs=jobs, on_record=on_record)
    if collect_records:
        v.collected = []
    report = v.run(logs, checkpoints, anchor, start_lines(start))
    report.records = v.collected
    return report


def verify_bytes(
    logs: dict[str, bytes],
    checkpoints: dict[str, bytes] | None = None,
    pubkeys: dict[str, Ed25519PublicKey] | None = None,
    anchor: tuple[str, bytes] | None = None,
    *,
    thorough: bool = False,
    start: Iterable[dict] | None = None,
) -> Report:
    """Verify in-memory files (name -> bytes); names are used for segments and messages."""
    return verify_sources(
        [Source(n, data=d) for n, d in logs.items()],
        [Source(n, data=d) for n, d in (checkpoints or {}).items()],
        pubkeys, Source(anchor[0], data=anchor[1]) if anchor else None,
        thorough=thorough, jobs=1, start=start)


def verify(
    paths: list[Path],
    pubkeys: dict[str, Ed25519PublicKey] | None,
    anchor: Path | None = None,
    *,
    thorough: bool = False,
    jobs: int | None = None,
    start: Iterable[dict] | None = None,
    on_record: OnRecord | None = None,
    collect_records: bool = False,
) -> Report:
    """Verify audit files and directories (see module doc). Raises OSError on unreadable
    input. ``on_record(file, line, record, authentic)`` sees every record once, in chain
    order, when its verdict is known (what `audit report` counts); ``collect_records``
    keeps them all in ``Report.records`` (small logs and tests only: memory grows with
    the log). With --thorough, worker processes are started the multiprocessing way: a
    script calling this needs the ``if __name__ == "__main__":`` guard."""
    logs, cps = collect_files(paths)
    return verify_sources([Source.of(p) for p in logs], [Source.of(p) for p in cps], pubkeys,
                          Source.of(Path(anchor)) if anchor else None, thorough=thorough,
                          jobs=jobs, start=start, on_record=on_record,
                          collect_records=collect_records)

