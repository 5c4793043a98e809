"""What is missing or damaged in one origin's chain: gaps in seq, missing segments, a start
after pruning or at a given checkpoint, and lines that are not records (torn or damaged).

Their verdicts wait for later records (a torn_tail record may claim a damaged line, a record
may fill a gap out of order, a prune record may account for a missing start), so they are
kept, capped at MAX_PENDING, and settled at the end of the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chain import origin_safe
from .scan import Rec, looks_torn
from .verdict import WARNING

MAX_PENDING = 1_000        # damaged lines / gaps whose verdict waits for later records


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


@dataclass
class Gap:
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
class Damaged:
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



class Gaps:
    """Gaps and damaged lines of one origin. A part of :class:`~residency_gate.audit.origin_check.OriginCheck` (its state and ``add``),
    kept apart so each file owns one question."""

    def _damage(self, fidx, name, logical, lineno, offset, raw, terminated, err, h) -> None:
        d = Damaged((0, self.oi, fidx, lineno, 0), name, logical, lineno, offset, len(raw),
                     h, looks_torn(raw), terminated, err)
        self.damaged.append(d)
        if len(self.damaged) > MAX_PENDING:
            self._resolve_damaged(self.damaged.pop(0))

    def _resolve_damaged(self, d: Damaged) -> None:
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


    def _gap_of(self, seq: int) -> tuple[Gap, int] | None:
        for g in reversed(self.gaps):
            if g.first <= seq <= g.last:
                for i, (a, b) in enumerate(g.missing):
                    if a <= seq <= b:
                        return g, i
                return None
        return None


    def _prune_for(self, first: Rec) -> dict | None:
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

    def _pruned_warning(self, first: Rec, prune: dict) -> None:
        how = "archived" if prune.get("action") == "archive" else "deleted"
        self.add((*first.key, 2), "pruned", f"records 0-{first.seq - 1} were {how} by the "
                 f"writer (prune record seq {prune['seq']}: {prune.get('reason') or 'retention'})"
                 f" after a checkpoint covering them (size {first.seq}) was published; "
                 f"verified from that checkpoint", file=first.name, line=first.lineno,
                 seq=first.seq, severity=WARNING)

    def _resolve_gap(self, g: Gap) -> None:
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

