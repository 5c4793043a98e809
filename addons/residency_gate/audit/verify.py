"""Offline verification of audit files, CloudTrail-style, one record at a time.

Every problem is named with file, line and seq, with a verdict (verdict.py lists them).
Two modes, the same verdicts (docs/audit.md says what each proves):

- default: every record is parsed, hashed and chained in order. A checkpoint record whose
  signature verifies vouches for the unbroken run of records chained up to it (their bytes
  are fixed by the hashes it signs). Records no valid checkpoint vouches for (the tail after
  the last one, anything next to damage) are checked one by one: canonical form and
  signature.
- thorough: every record's canonical form and signature as well, in worker processes
  (segments in parallel, see signatures.py); the chain is still walked here, in order.

One origin's chain is walked by origin_check.py; this module runs the whole verification
(files grouped by origin, checkpoint files, worker processes) and holds the entry points.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import canonical
from .chain import origin_safe, parse_segment_name, record_error, verify_signature_uncached
from .checkpoints import (
    CheckpointLine,
    checkpoint_lines,
    checkpoint_lines_or_none,
    load_start,
    start_lines,
)
from .origin_check import OriginCheck
from .scan import Rerun, looks_torn
from .segments import (
    SegmentReadError,
    Source,
    collect_files,
    compressed_twin,
    file_sha256,
    first_record_fields,
    is_empty,
    iter_records,
)
from .verdict import ERROR, MAX_PROBLEMS, WARNING, OriginReport, Problem, Report

__all__ = [
    "ERROR", "WARNING", "OriginReport", "Problem", "Report", "collect_files", "iter_records",
    "load_start", "record_error", "verify", "verify_bytes", "verify_sources",
]

PARALLEL_MIN_BYTES = 8 << 20  # below this, --thorough checks inline (no worker start-up)

OnRecord = Callable[[str, int, dict, bool], None]


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
                    if err and looks_torn(raw) and (last or term):
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
                o = OriginCheck(self, oi, origin, files, start, fast)
                try:
                    o.walk()
                except Rerun:
                    o = OriginCheck(self, oi, origin, files, start, False)
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

    def _commit(self, o: OriginCheck) -> None:
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

