"""Rotated segments, after the writer is done with them: compression and retention.

Runs on one background thread of the writer (in the writer process by default, so off the
proxy's core). It never touches the segment being written, and it never writes records:
the writer thread does that. Retention works in two steps so that a verifier can always
tell pruning from deletion:

1. ``plan``: the oldest closed segments over ``audit.retention`` (age or size) whose last
   record is a checkpoint record, i.e. everything they hold is covered by a checkpoint. The
   writer takes the plan only once a checkpoint at least that large has been published
   (appended and fsynced to the checkpoints file and, when configured, the anchor), and
   writes a ``prune`` record saying what goes and from which checkpoint the chain continues.
2. ``execute``: once that record is durable, the segments are deleted or moved to
   ``archive_dir`` (directories fsynced). A crash in between leaves the segments in place
   and the prune record in the chain: nothing is lost, and the next start plans again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import fsync_dir
from .canonical import loads_record
from .chain import COMPRESSED_SUFFIXES, logical_name, origin_safe, parse_segment_name
from .segments import (
    FORMATS,
    TMP_SUFFIX,
    SegmentReadError,
    Source,
    compress_segment,
    finish_interrupted,
    iter_lines,
)

log = logging.getLogger("residency_gate.audit")

MAX_NAMES = 100  # segment names listed in one prune record (the count is always there)


@dataclass(frozen=True)
class Retention:
    """``audit.retention``: keep segments younger than ``max_age_days`` and the newest up to
    ``max_bytes`` in total; the older ones are deleted, or moved to ``archive_dir``."""

    max_age_days: int | None = None
    max_bytes: int | None = None
    archive_dir: Path | None = None

    @property
    def active(self) -> bool:
        return self.max_age_days is not None or self.max_bytes is not None

    def describe(self) -> str:
        parts = []
        if self.max_age_days is not None:
            parts.append(f"max_age_days {self.max_age_days}")
        if self.max_bytes is not None:
            parts.append(f"max_bytes {self.max_bytes}")
        return ", ".join(parts)


@dataclass
class PrunePlan:
    segments: list[Path]  # oldest first, contiguous from the oldest present
    first: int            # first seq they hold
    through: int          # last seq they hold: a checkpoint record
    head: str             # hash of that record's line
    size: int             # bytes on disk
    reason: str
    archive_dir: Path | None

    def fields(self) -> dict[str, Any]:
        """The ``prune`` record's fields (the writer adds the chain fields)."""
        names = [logical_name(p.name) for p in self.segments]
        return {
            "first": self.first, "through": self.through,
            "checkpoint": {"size": self.through + 1, "head": self.head},
            "segments": names[:MAX_NAMES], "segment_count": len(names), "bytes": self.size,
            "action": "archive" if self.archive_dir else "delete",
            "archive_dir": str(self.archive_dir) if self.archive_dir else None,
            "reason": self.reason,
        }


def last_line_of(path: Path) -> bytes | None:
    """The last complete line of a segment (plain: read from the end; compressed: read
    through, one chunk in memory)."""
    if not path.name.endswith(COMPRESSED_SUFFIXES):
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            block = 1 << 16
            while True:
                start = max(0, end - block)
                fh.seek(start)
                data = fh.read(end - start)
                body = data[:-1] if data.endswith(b"\n") else None
                if body is None:
                    return None  # not terminated: not a closed segment
                nl = body.rfind(b"\n")
                if nl >= 0 or start == 0:
                    return body[nl + 1:]
                block *= 4
    last = None
    for _n, _off, raw, term in iter_lines(Source.of(path)):
        last = raw if term else None
    return last


class Housekeeper:
    """The background thread: compress rotated segments, plan and carry out retention."""

    def __init__(self, directory: Path, origin: str, compress: str,
                 retention: Retention | None) -> None:
        if compress not in ("none", *FORMATS):
            raise ValueError(f"compress must be none, zstd or gzip, not {compress!r}")
        self.directory = Path(directory)
        self.origin = origin
        self.compress = compress
        self.retention = retention if retention and retention.active else None
        self._jobs: queue.Queue[tuple] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._plan: PrunePlan | None = None
        self._executing = False
        self._current: Path | None = None
        self._thread: threading.Thread | None = None
        self.compressed = 0
        self.pruned = 0

    @property
    def needed(self) -> bool:
        return self.compress != "none" or self.retention is not None

    # -------------------------------------------------------------- writer side

    def start(self, current: Path) -> None:
        self._current = current
        self._thread = threading.Thread(target=self._loop, name="audit-housekeeping",
                                        daemon=True)
        self._thread.start()
        self._jobs.put(("scan",))

    def rotated(self, current: Path) -> None:
        """The writer closed its segment and is about to create ``current``."""
        with self._lock:
            self._current = current
        self._jobs.put(("scan",))

    def plan_ready(self, published: int) -> bool:
        """A plan waits whose segments a published checkpoint covers."""
        plan = self._plan
        return plan is not None and plan.through + 1 <= published

    def take_plan(self, published: int) -> PrunePlan | None:
        """The plan, once a published checkpoint covers it (the writer writes its record)."""
        with self._lock:
            plan = self._plan
            if plan is None or plan.through + 1 > published:
                return None
            self._plan = None
            self._executing = True
            return plan

    def execute(self, plan: PrunePlan) -> None:
        """The plan's prune record is durable: remove or archive its segments."""
        self._jobs.put(("execute", plan))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._jobs.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """For tests and benchmarks: True once every queued job is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._jobs.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    # -------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            try:
                if job[0] == "scan":
                    self._scan()
                elif job[0] == "execute":
                    self._execute(job[1])
            except Exception as exc:  # keep writing records; say why housekeeping failed
                log.error("audit housekeeping (%s) failed: %s: %s", job[0],
                          type(exc).__name__, exc)
            finally:
                self._jobs.task_done()

    def _segments(self) -> list[tuple[int, Path]]:
        safe = origin_safe(self.origin)
        out = []
        for path in self.directory.iterdir():
            parsed = parse_segment_name(path.name)
            if parsed and parsed[0] == safe and path.is_file():
                out.append((parsed[1], path))
        return sorted(out)

    def _closed(self) -> list[Path]:
        """Segments the writer is done with (all but the one it writes, or is about to
        create: it says so before creating it), oldest first."""
        with self._lock:
            current = self._current
        return [p for _first, p in self._segments()
                if current is None or logical_name(p.name) != current.name]

    def _scan(self) -> None:
        safe = origin_safe(self.origin)
        leftovers = [p.name for p in self.directory.iterdir()
                     if p.name.startswith(f"{safe}-") and (p.name.endswith(TMP_SUFFIX)
                                                           or p.name.endswith(".jsonl"))]
        with self._lock:
            current = self._current
        for note in finish_interrupted(self.directory, [n for n in leftovers
                                                        if current is None
                                                        or n != current.name]):
            log.warning("audit segment housekeeping: %s", note)
        if self.compress != "none":
            for path in self._closed():
                if self._stop.is_set():
                    return
                if path.name.endswith(COMPRESSED_SUFFIXES):
                    continue
                if compress_segment(path, self.compress, self._stop.is_set) is not None:
                    self.compressed += 1
        if self.retention is not None:
            self._make_plan()

    def _make_plan(self) -> None:
        assert self.retention is not None
        with self._lock:
            if self._plan is not None or self._executing:
                return
        segs = self._closed()
        allsegs = self._segments()
        total = sum(p.stat().st_size for _f, p in allsegs)
        now = time.time()
        r = self.retention
        chosen: list[Path] = []
        size = 0
        reasons: set[str] = set()
        for path in segs:
            st = path.stat()
            old = (r.max_age_days is not None
                   and now - st.st_mtime > r.max_age_days * 86400)
            big = r.max_bytes is not None and total - size > r.max_bytes
            if not (old or big):
                break
            chosen.append(path)
            size += st.st_size
            if old:
                reasons.add(f"older than max_age_days {r.max_age_days}")
            if big:
                reasons.add(f"over max_bytes {r.max_bytes}")
        # the plan must end on a checkpoint record: the chain continues from it
        while chosen:
            last = last_line_of(chosen[-1])
            rec = None
            if last:
                try:
                    rec = loads_record(last)
                except ValueError:
                    rec = None
            if isinstance(rec, dict) and rec.get("kind") == "checkpoint" \
                    and type(rec.get("seq")) is int:
                first = parse_segment_name(chosen[0].name)
                assert first is not None
                plan = PrunePlan(chosen, first[1], rec["seq"],
                                 hashlib.sha256(last).hexdigest(),
                                 sum(p.stat().st_size for p in chosen),
                                 "; ".join(sorted(reasons)), r.archive_dir)
                with self._lock:
                    self._plan = plan
                return
            log.warning("audit retention: %s does not end with a checkpoint record; not "
                        "pruned", chosen[-1].name)
            chosen.pop()

    def _execute(self, plan: PrunePlan) -> None:
        try:
            # a segment may have been compressed since the plan was made: take its files now
            files = [f for path in plan.segments for f in _forms_of(path)]
            if plan.archive_dir is not None:
                plan.archive_dir.mkdir(parents=True, exist_ok=True)
                for path in files:
                    _move(path, plan.archive_dir / path.name)
                fsync_dir(plan.archive_dir)
            else:
                for path in files:
                    path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            self.pruned += len(plan.segments)
            log.info("audit retention: %s %d segment(s), records %d-%d (%s)",
                     "archived" if plan.archive_dir else "deleted", len(plan.segments),
                     plan.first, plan.through, plan.reason)
        finally:
            with self._lock:
                self._executing = False


def _forms_of(path: Path) -> list[Path]:
    """The files that hold one segment now: plain and/or compressed."""
    plain = path.with_name(logical_name(path.name))
    forms = [plain, *(plain.with_name(plain.name + s) for s in COMPRESSED_SUFFIXES)]
    return [f for f in forms if f.exists()]


def _move(src: Path, dst: Path) -> None:
    """Rename, or copy + fsync + remove across file systems."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        pass
    tmp = dst.with_name(dst.name + TMP_SUFFIX)
    shutil.copyfile(src, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, dst)
    fsync_dir(dst.parent)
    src.unlink()


__all__ = ["Housekeeper", "PrunePlan", "Retention", "SegmentReadError", "last_line_of"]
