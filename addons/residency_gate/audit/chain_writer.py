"""One origin's signed, hash-chained log, written synchronously: the chain's state (seq,
prev, key), building, signing and chaining records, group commits, checkpoints, key
hand-overs, rotation and prune records.

:class:`ChainWriter` is driven by one owner, outright: the writer process (writer_child.py)
through ``append_batch``, ``rotate_key_sync`` and ``close_sync``, or the group-commit runner
of :class:`~residency_gate.audit.writer.AuditWriter`, from one worker thread. A batch
returns only once it is durable (written and fsynced). The first write or fsync failure
fails the writer for good (PostgreSQL's lesson: a later fsync may succeed without the
earlier data being on disk).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import marshal
import os
import socket
import time
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any

from .canonical import CanonicalError, canonical, is_plain
from .chain import (
    SIG_SLOT,
    VERSION,
    ZERO_HASH,
    UtcClock,
    checkpoints_name,
    line_hash,
    seal,
    segment_name,
    sign_record,
)
from .checkpoint_files import CheckpointFiles
from .housekeeping import Housekeeper, PrunePlan
from .keys import SigningKey, public_raw
from .recovery import find_resume
from .segment_file import SegmentFile
from .writer_api import AuditError, AuditRecordError, AuditStats, WriterSettings, WriterState

log = logging.getLogger("residency_gate.audit")


class Item:
    """One record to write (its kind and fields, or a key hand-over), and the future of the
    event-loop caller waiting for it (AuditWriter.append)."""

    __slots__ = ("fields", "future", "kind", "new_key", "plain")

    def __init__(self, kind: str, fields: dict, future: asyncio.Future | None,
                 new_key: SigningKey | None = None, plain: bool = False):
        self.kind = kind
        self.fields = fields
        self.future = future
        self.new_key = new_key
        self.plain = plain


class ChainWriter(WriterState):
    def __init__(self, directory: Path, key: SigningKey, origin: str, *,
                 settings: WriterSettings | None = None, **options: Any) -> None:
        """``options``: WriterSettings fields by keyword (they override ``settings``)."""
        s = WriterSettings.of(settings, **options)
        if not origin:
            raise ValueError("origin must not be empty")
        self.settings = s
        self.directory = Path(directory)
        # rotated segments: compressed and pruned by a background thread (housekeeping.py)
        self.keeper = Housekeeper(self.directory, origin, s.compress, s.retention)
        self.key = key
        self.origin = origin
        self.fsync_mode = s.fsync
        self.rotate_bytes = s.rotate_bytes
        self.rotate_seconds = s.rotate_seconds
        self.checkpoint_every = s.checkpoint_every
        self.checkpoint_seconds = s.checkpoint_seconds
        self.anchor_file = s.anchor_file
        self.checkpoints_file = self.directory / checkpoints_name(origin)
        self.stats = AuditStats()
        self.clock = UtcClock()  # every record's ts (tests fix it)
        self._plain_origin = is_plain(origin)
        self.pid = os.getpid()  # the `start` record's pid: the proxy's, also for a child writer

        self._state = "new"  # new -> open -> closed
        self._failed: BaseException | None = None
        # chain state (touched only by the owner, or the runner's worker thread, once open)
        self._seq = 0
        self._prev = ZERO_HASH
        self._last_kind: str | None = None
        self._segment = SegmentFile()
        self._cps = CheckpointFiles(self.checkpoints_file, self.anchor_file, origin)
        self._since_cp = 0
        self._last_cp = time.monotonic()

    # ------------------------------------------------------------------ public API

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def head(self) -> str:
        return self._prev

    @property
    def current_file(self) -> Path | None:
        return self._segment.path

    def open(self) -> None:
        """Recover the chain and make the writer ready (synchronous; call before serving)."""
        if self._state != "new":
            raise AuditError(f"audit writer already {self._state}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._recover()
            self._cps.open()
            self._emit("start", {"pid": self.pid, "host": socket.gethostname(),
                                 "fsync": self.fsync_mode})
            self._sync()
            self._cps.found_published()
        except AuditError:
            self._segment.close()
            raise
        except (OSError, ValueError) as exc:
            self._segment.close()
            self._failed = exc
            self.stats.write_failures += 1
            log.critical("audit log %s cannot be opened: %s", self.directory, exc)
            raise AuditError(f"cannot open audit log in {self.directory}: {exc}") from exc
        self._opened()
        self._state = "open"
        if self.keeper.needed:
            assert self._segment.path is not None
            self.keeper.start(self._segment.path)

    def checkpoint_due_in(self) -> float | None:
        """Seconds until a time checkpoint is due (0: now); None when there is nothing to
        checkpoint. For a caller of append_batch, which writes it: when to call it idle.
        Also 0 when a prune record is ready to be written."""
        if self._prune_ready():
            return 0.0
        if self._since_cp <= 0:
            return None
        return max(0.0, self._last_cp + self.checkpoint_seconds - time.monotonic())

    def append_batch(self, entries: Sequence[tuple[str, dict]], *, owned: bool = False
                     ) -> list[dict | AuditRecordError]:
        """Append ``(kind, fields)`` entries as one group commit, synchronously.

        For a caller that owns the writer outright (the writer process): not to be mixed
        with append() or rotate_key(). Returns, in order, each record once it is durable,
        or the AuditRecordError that refused it (the others are written). Also writes a
        time checkpoint when one is due; with no entries, only that. A write or fsync
        failure fails the writer for good and raises AuditError (see ``failure``).
        ``owned``: the fields are the writer's to keep (nobody else holds them): no copy.
        """
        self._check_usable()
        items: list[Item] = []
        slots: list[int | AuditRecordError] = []
        for kind, fields in entries:
            try:
                item = self._prepare(kind, fields, owned)
            except AuditRecordError as exc:
                slots.append(exc)
                continue
            slots.append(len(items))
            items.append(item)
        records = (self._commit(items) if items or self._cp_time_due() or self._prune_ready()
                   else [])
        return [records[s] if isinstance(s, int) else s for s in slots]

    def rotate_key_sync(self, new_key: SigningKey) -> dict:
        """rotate_key() for the owner of the writer (see append_batch): the record, durable."""
        self._check_usable()
        return self._commit([Item("key_rotation", {}, None, new_key)])[0]

    def close_sync(self) -> None:
        """Write what is still pending and a final checkpoint, fsync and close."""
        if self._state != "open":
            self._release()
            return
        leftovers = self._closing()
        try:
            self._closed(leftovers, self._final(leftovers))
        finally:
            self._release()

    # ------------------------------------------------------------------ the owner's side

    def _opened(self) -> None:
        """Hook: the chain is recovered and the start record durable."""

    def _prepare(self, kind: str, fields: dict, owned: bool = False) -> Item:
        """The record to write, or AuditRecordError (a float, a lone surrogate, ...).

        Fields of plain types (is_plain: what the proxy writes) are used as they are when
        ``owned`` (a fresh copy nobody else holds: the writer process unmarshalled them),
        else as a copy made by marshal (it refuses subclasses and cycles: then the slow
        path); anything else (tuples, keys outside the BMP, ...) is checked and copied by
        its canonical JSON, as before the fast path."""
        self._check_append(kind, fields)
        copy = fields
        if not owned:
            try:
                copy = marshal.loads(marshal.dumps(fields))
            except ValueError:
                copy = None
        if copy is None or not is_plain(copy):
            try:
                # validates (no floats, str keys, ...) and deep-copies in one go
                copy = json.loads(canonical(fields))
            except CanonicalError as exc:
                raise AuditRecordError(str(exc)) from exc
            plain = is_plain(copy) and self._plain_origin and is_plain(kind)
        else:
            plain = self._plain_origin and is_plain(kind)
        return Item(kind, copy, None, plain=plain)

    def _commit(self, items: list[Item]) -> list[dict]:
        try:
            return self._write_batch(items)
        except Exception as exc:
            self._fail(exc)
            raise AuditError(f"audit record not written: {exc}") from exc

    def _closing(self) -> list[Item]:
        """Mark the writer closed; the items still pending (written by the final batch)."""
        self._state = "closed"
        return []

    def _final(self, items: list[Item]) -> list[dict] | Exception | None:
        """Write ``items`` and a final checkpoint, fsync, close the segment: the records;
        the exception that failed the writer; None when it had failed before."""
        if self._failed is not None:
            return None
        try:
            return self._finish(items)
        except Exception as exc:
            return exc

    def _closed(self, items: list[Item], outcome: list[dict] | Exception | None) -> None:
        """Answer the items the final batch wrote, or fail them (and raise if it failed)."""
        if isinstance(outcome, list):
            self._resolve(items, outcome)
            return
        if outcome is not None:
            self._fail(outcome)
        self._fail_items(items)
        if outcome is not None:
            raise AuditError(f"audit log close failed: {outcome}") from outcome

    def _release(self) -> None:
        self._segment.close()
        self.keeper.stop()

    def _resolve(self, items: list[Item], records: list[dict]) -> None:
        for item, rec in zip(items, records, strict=True):
            fut = item.future
            if fut is not None and not fut.done():
                try:
                    fut.set_result(rec)
                except RuntimeError:  # its loop is closed
                    pass

    def _fail_items(self, items: list[Item]) -> None:
        for item in items:
            fut = item.future
            if fut is not None and not fut.done():
                try:
                    fut.set_exception(AuditError(f"audit record not written: {self._failed}"))
                except RuntimeError:
                    pass

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            self.stats.write_failures += 1
            log.critical(
                "AUDIT LOG WRITE FAILED (%s: %s) in %s; the audit writer is permanently "
                "failed and no further records will be written: LLM traffic must stop",
                type(exc).__name__, exc, self._segment.path or self.directory,
            )
        self._segment.close()

    # ------------------------------------------------------------------ the chain

    def _write_batch(self, items: list[Item]) -> list[dict]:
        out = []
        published = self._cps.published
        plan = (self.keeper.take_plan(published)
                if self.keeper.plan_ready(published) else None)
        if plan is not None:
            self._prune_record(plan)
        for item in items:
            if self._segment.rotation_due(self.rotate_bytes, self.rotate_seconds):
                self._rotate()
            if item.new_key is not None:
                out.append(self._hand_over(item.new_key))
            else:
                out.append(self._emit(item.kind, item.fields, plain=item.plain))
            if self.fsync_mode == "always":
                self._sync()
            if self._since_cp >= self.checkpoint_every:
                self._checkpoint()
        if self._cp_time_due():
            self._checkpoint()
        self._sync()
        if plan is not None:
            self.keeper.execute(plan)  # its record is durable: now the files may go
        self.stats.batches += 1
        self.stats.last_batch_size = len(items)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(items))
        return out

    def _finish(self, leftovers: list[Item]) -> list[dict]:
        records = self._write_batch(leftovers) if leftovers else []
        if self._last_kind != "checkpoint":
            self._checkpoint()
        self._sync()
        self._segment.close()
        return records

    def _prune_ready(self) -> bool:
        return (self.keeper.plan_ready(self._cps.published) and self._failed is None
                and self._state != "closed")

    def _prune_record(self, plan: PrunePlan) -> None:
        """Say in the chain what retention removes, and the checkpoint the chain continues
        from, before the files go (a verifier tells pruning from deletion by this record)."""
        self._emit("prune", plan.fields())
        self.stats.prunes += 1
        log.info("audit retention: prune record seq %d: records %d-%d (%d segment(s))",
                 self._seq - 1, plan.first, plan.through, len(plan.segments))

    def _cp_time_due(self) -> bool:
        return self._since_cp > 0 and time.monotonic() - self._last_cp >= self.checkpoint_seconds

    def _emit(self, kind: str, fields: dict, key: SigningKey | None = None,
              plain: bool = False) -> dict:
        key = key or self.key
        seq = self._seq
        rec: dict[str, Any] = {
            "v": VERSION, "origin": self.origin, "seq": seq, "ts": self.clock(),
            "kind": kind, "prev": self._prev, "key_id": key.key_id,
        }
        rec.update(fields)
        if kind == "decision" and "id" not in rec:
            rec["id"] = f"{self.origin}:{seq}"
        rec["sig"] = SIG_SLOT
        line = seal(rec, key, plain=plain)
        self._segment.add(line + b"\n")
        self._seq = seq + 1
        self._prev = sha256(line).hexdigest()  # line_hash
        self._last_kind = kind
        if kind != "checkpoint":
            self._since_cp += 1
        self.stats.records_written += 1
        self.stats.bytes_written += len(line) + 1
        return rec

    def _hand_over(self, new_key: SigningKey) -> dict:
        old = self.key
        rec = self._emit("key_rotation", {
            "new_key_id": new_key.key_id,
            "new_public_key": base64.b64encode(public_raw(new_key.public)).decode("ascii"),
        }, key=old)
        self.key = new_key
        return rec

    def _checkpoint(self) -> None:
        rec = self._emit("checkpoint", {"size": self._seq, "head": self._prev})
        ext = {"v": VERSION, "origin": self.origin, "size": self._seq, "head": self._prev,
               "ts": rec["ts"], "key_id": self.key.key_id}
        self._cps.add(sign_record(ext, self.key) + b"\n", self._seq)
        self._since_cp = 0
        self._last_cp = time.monotonic()
        self.stats.checkpoints += 1

    def _sync(self) -> None:
        if self._segment.sync():
            self.stats.fsyncs += 1
        self._cps.publish()

    def _rotate(self) -> None:
        if self._last_kind != "checkpoint":
            self._checkpoint()
        self._sync()
        self._segment.close()
        new = self.directory / segment_name(self.origin, self._seq)
        if self.keeper.needed:  # before it exists: housekeeping never touches it
            self.keeper.rotated(new)
        self._segment.start(new)
        self.stats.rotations += 1

    # ------------------------------------------------------------------ recovery (open)

    def _recover(self) -> None:
        """Continue the chain where it ends (recovery.py finds where)."""
        r = find_resume(self.directory, self.origin, self.key)
        self._seq, self._prev = r.seq, r.prev
        if r.last_kind is not None:
            self._last_kind = r.last_kind
        self._segment.open(r.target, create=r.create)
        if r.newline_after_last:
            self._segment.write_now(b"\n")  # an intact record that only lacked its newline
        if r.damage:
            assert r.damaged_file is not None
            added = False
            if r.damaged_file == r.target and not r.damage.endswith(b"\n"):
                self._segment.write_now(b"\n")
                added = True
            self._emit("torn_tail", {
                "file": r.damaged_file.name, "offset": r.damage_offset,
                "length": len(r.damage), "sha256": line_hash(r.damage), "newline_added": added,
            })
            self.stats.torn_tails += 1
            log.warning("audit log %s: %d damaged bytes at offset %d (torn write?); recorded "
                        "as torn_tail seq %d, the chain resumes after them",
                        r.damaged_file, len(r.damage), r.damage_offset, self._seq - 1)
        self._segment.count_existing()
        if r.chain_key is not None and r.chain_key != self.key.key_id:
            old = next((k for k in self.key.retired if k.key_id == r.chain_key), None)
            if old is None:
                raise AuditError(
                    f"the audit chain of {self.origin!r} continues from key {r.chain_key} but "
                    "its private key is not in certs_dir, so the hand-over to "
                    f"{self.key.key_id} cannot be signed")
            new = self.key
            self.key = old
            self._hand_over(new)
