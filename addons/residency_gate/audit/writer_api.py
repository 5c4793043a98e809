"""What both audit writers share (the thread writer, writer.py, and the process writer,
writer_process.py): their settings, their errors, their counters and their life cycle."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .canonical import CanonicalError, canonical
from .chain import RESERVED
from .housekeeping import Retention


class AuditError(Exception):
    """The audit trail cannot take this record (writer failed, closed, or not open)."""


class AuditRecordError(AuditError, ValueError):
    """The record itself is invalid (reserved field, float, ...); the writer stays healthy."""


@dataclass
class AuditStats:
    records_written: int = 0      # every record, checkpoints and hand-overs included
    batches: int = 0              # group commits (one fsync each in "group" mode)
    fsyncs: int = 0               # fsyncs of log segments
    write_failures: int = 0       # 0 or 1: the writer stops at the first
    last_batch_seconds: float = 0.0
    last_batch_size: int = 0
    max_batch_size: int = 0
    bytes_written: int = 0
    checkpoints: int = 0
    rotations: int = 0
    torn_tails: int = 0           # torn tails found and recorded at open
    pending: int = 0              # appends waiting for the next group commit
    prunes: int = 0               # prune records written (retention)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WriterState:
    """A writer's life: new -> open -> closed (the process writer: closing between), and the
    first failure, which stops it for good."""

    _state = "new"
    _failed: BaseException | None = None

    @property
    def healthy(self) -> bool:
        return self._state == "open" and self._failed is None

    @property
    def failure(self) -> BaseException | None:
        return self._failed

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditError(f"audit log failed earlier: {self._failed}")
        if self._state != "open":
            raise AuditError("audit writer is not open" if self._state == "new"
                             else "audit writer is closed")

    def _check_append(self, kind: Any, fields: Any) -> None:
        """Refuse an append: AuditError when the writer takes no records, AuditRecordError
        for what is not a kind and a dict of fields the writer may add its own fields to
        (the values are checked when the record is serialised)."""
        self._check_usable()
        if not isinstance(kind, str) or not kind:
            raise AuditRecordError("kind must be a non-empty string")
        if not kind.isascii():  # a lone surrogate would fail the writer when it is written
            try:
                canonical(kind)
            except CanonicalError as exc:
                raise AuditRecordError(f"kind: {exc}") from exc
        if not isinstance(fields, dict):
            raise AuditRecordError("fields must be a dict")
        if not RESERVED.isdisjoint(fields):
            clash = RESERVED.intersection(fields)
            raise AuditRecordError(f"reserved field(s) {sorted(clash)} in audit record")


@dataclass(frozen=True)
class WriterSettings:
    """How a writer writes one origin's chain (the ``audit`` config, see docs/audit.md).

    Writers take it as ``settings=``, or its fields as keywords (which override it)."""

    fsync: str = "group"              # "group": one fsync per group commit; "always": per record
    rotate_bytes: int = 64 << 20
    rotate_seconds: float = 86400
    checkpoint_every: int = 1000      # records between checkpoint records
    checkpoint_seconds: float = 60.0  # ... or seconds, whichever comes first
    anchor_file: Path | None = None   # signed checkpoint lines, also appended here
    compress: str = "none"            # rotated segments: none | zstd | gzip
    retention: Retention | None = None

    def __post_init__(self) -> None:
        if self.fsync not in ("group", "always"):
            raise ValueError(f"fsync must be 'group' or 'always', not {self.fsync!r}")
        set_ = object.__setattr__
        set_(self, "rotate_bytes", int(self.rotate_bytes))
        set_(self, "rotate_seconds", float(self.rotate_seconds))
        set_(self, "checkpoint_every", max(1, int(self.checkpoint_every)))
        set_(self, "checkpoint_seconds", float(self.checkpoint_seconds))
        set_(self, "anchor_file", Path(self.anchor_file) if self.anchor_file else None)

    @classmethod
    def of(cls, settings: WriterSettings | None = None, **options: Any) -> WriterSettings:
        """``settings`` (default: the defaults) with ``options`` (field names) applied;
        TypeError for an unknown option, ValueError for a bad value."""
        return replace(settings or cls(), **options)

    def to_wire(self) -> dict[str, Any]:
        """Plain values (for marshal: the writer process's configuration)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["anchor_file"] = str(self.anchor_file) if self.anchor_file else None
        r = self.retention
        out["retention"] = None if r is None else (
            r.max_age_days, r.max_bytes, str(r.archive_dir) if r.archive_dir else None)
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> WriterSettings:
        ret = raw.get("retention")
        return cls(**{**raw, "retention": None if ret is None else Retention(
            ret[0], ret[1], Path(ret[2]) if ret[2] else None)})
