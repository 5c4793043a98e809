"""What verification concludes: problems (a verdict each), per-origin reports, the report.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ERROR = "error"
WARNING = "warning"
MAX_PROBLEMS = 10_000      # listed; the rest are counted


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
