"""One origin's chain, walked in order: every line read (the fast way or parsed), hashed and
placed (seq order, duplicates, gaps, links); authenticity, gaps and damage and the external
checkpoints are settled by the parts in vouching.py, gaps.py and checkpoint_check.py.

Memory is per origin, not per record: a bounded window of recent hashes, the records since
the last checkpoint (capped), the open gaps, and at most MAX_PROBLEMS problems listed.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import loads_record
from .chain import HEX64_RE, VERSION, ZERO_HASH, b64_strict, parse_segment_name, record_error
from .checkpoint_check import CheckpointCheck
from .checkpoints import CheckpointLine
from .gaps import MAX_PENDING, Damaged, Gap, Gaps
from .keys import public_raw
from .scan import Rec, Rerun, scan_fields
from .segments import SegmentReadError, Source, iter_lines
from .signatures import SegmentCheck, check_segment
from .verdict import ERROR, MAX_PROBLEMS, WARNING, OriginReport, Problem
from .vouching import Vouching

if TYPE_CHECKING:
    from .verify import _Verifier

RECENT = 16_384            # line hashes kept per origin (duplicates, late checkpoints)
CHECKPOINT_HASHES = 50_000  # hashes of checkpoint records kept (checkpoint lines out of order)
MAX_RUN = 4_096            # records waiting for a checkpoint to vouch for them
IMMEDIATE_KINDS = frozenset({"key_rotation", "torn_tail", "prune"})


class OriginCheck(Vouching, Gaps, CheckpointCheck):
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
        self.gaps: list[Gap] = []
        self.chain_key: str | None = None
        self.handed_over: str | None = None
        self.ranges: list[list[int]] = []
        self.cur: list[int] | None = None
        self.run: list[Rec] = []
        self.damaged: list[Damaged] = []
        self.claims: dict[tuple, int] = {}
        self.last_valid: tuple | None = None
        self.first: Rec | None = None
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
        extract = scan_fields if self.fast else None
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


    # -------------------------------------------------------------- one record

    def _seen(self, seq: int) -> bool:
        if seq in self.recent:
            return True
        if seq >= self.expected or seq < self.floor:
            return False
        return self._gap_of(seq) is None

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
        e = Rec(fidx, name, lineno, raw, obj, h, seq, prev, kind, key_id, False, key)
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
            self.gaps.append(Gap(okey, name, lineno, seq, expected, seq - 1, gkind,
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

    def _materialize(self, e: Rec) -> dict:
        """The parsed record; for a line read the fast way, parsed now and held to what was
        read (a disagreement means this origin is walked again, parsing every line)."""
        if e.obj is None:
            try:
                obj = loads_record(e.raw)
            except ValueError:
                raise Rerun from None
            if (record_error(obj) is not None or obj["origin"] != self.origin
                    or obj["seq"] != e.seq or obj["prev"] != e.prev or obj["kind"] != e.kind):
                raise Rerun
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

