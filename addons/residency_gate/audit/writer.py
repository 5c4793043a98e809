"""The audit writer: signed, hash-chained JSON Lines with group commit.

One writer owns one origin's chain in ``directory``. ``append`` returns a record only
once it is durable (written and fsynced). Records are built, signed, written and
fsynced by one worker thread; the event loop never does file I/O after ``open``.
``append_batch`` does the same synchronously, for a caller that owns the writer outright
(the writer process, see writer_child.py) and so needs no event loop or thread.
The first write or fsync failure fails the writer for good (PostgreSQL's lesson:
a later fsync may succeed without the earlier data being on disk).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..fileio import fsync_dir
from .canonical import CanonicalError, canonical, is_plain, parse
from .chain import (
    COMPRESSED_SUFFIXES,
    HEX64_RE,
    RESERVED,
    VERSION,
    ZERO_HASH,
    checkpoints_name,
    line_hash,
    origin_safe,
    parse_segment_name,
    parse_ts,
    segment_name,
    sign_record,
    utc_ts,
    verify_signature,
)
from .housekeeping import Housekeeper, PrunePlan, Retention
from .keys import SigningKey, public_raw
from .segments import read_segment

log = logging.getLogger("residency_gate.audit")


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError("short write")
        view = view[n:]


class _Item:
    __slots__ = ("fields", "future", "kind", "new_key", "plain")

    def __init__(self, kind: str, fields: dict, future: asyncio.Future | None,
                 new_key: SigningKey | None = None, plain: bool = False):
        self.kind = kind
        self.fields = fields
        self.future = future
        self.new_key = new_key
        self.plain = plain


class AuditWriter:
    def __init__(
        self,
        directory: Path,
        key: SigningKey,
        origin: str,
        *,
        fsync: str = "group",
        rotate_bytes: int = 64 << 20,
        rotate_seconds: float = 86400,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        anchor_file: Path | None = None,
        compress: str = "none",
        retention: Retention | None = None,
    ) -> None:
        if fsync not in ("group", "always"):
            raise ValueError(f"fsync must be 'group' or 'always', not {fsync!r}")
        if not origin:
            raise ValueError("origin must not be empty")
        self.directory = Path(directory)
        # rotated segments: compressed and pruned by a background thread (housekeeping.py)
        self.keeper = Housekeeper(self.directory, origin, compress, retention)
        self._published = 0  # size of the newest checkpoint appended to every checkpoint file
        self.key = key
        self.origin = origin
        self.fsync_mode = fsync
        self.rotate_bytes = int(rotate_bytes)
        self.rotate_seconds = float(rotate_seconds)
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.anchor_file = Path(anchor_file) if anchor_file else None
        self.checkpoints_file = self.directory / checkpoints_name(origin)
        self.stats = AuditStats()
        self.pid = os.getpid()  # the `start` record's pid: the proxy's, also for a child writer

        self._executor: ThreadPoolExecutor | None = None
        self._state = "new"  # new -> open -> closed
        self._failed: BaseException | None = None
        # chain state (touched only by the worker thread once open)
        self._seq = 0
        self._prev = ZERO_HASH
        self._last_kind: str | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._file_bytes = 0
        self._file_records = 0
        self._file_started = time.time()
        self._since_cp = 0
        self._last_cp = time.monotonic()
        self._buf: list[bytes] = []
        self._ext_pending: list[bytes] = []
        self._ext_pending_size = 0
        self._ext_needs_newline: dict[Path, bool] = {}
        # event-loop side
        self._pending: list[_Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public API

    @property
    def healthy(self) -> bool:
        return self._state == "open" and self._failed is None

    @property
    def failure(self) -> BaseException | None:
        return self._failed

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def head(self) -> str:
        return self._prev

    @property
    def current_file(self) -> Path | None:
        return self._path

    def open(self) -> None:
        """Recover the chain and make the writer ready (synchronous; call before serving)."""
        if self._state != "new":
            raise AuditError(f"audit writer already {self._state}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._recover()
            self._check_ext_file(self.checkpoints_file)
            if self.anchor_file:
                self.anchor_file.parent.mkdir(parents=True, exist_ok=True)
                self._check_ext_file(self.anchor_file)
            self._emit("start", {"pid": self.pid, "host": socket.gethostname(),
                                 "fsync": self.fsync_mode})
            self._sync()
            self._published = max(self._published, self._published_at_open())
        except AuditError:
            self._close_fd()
            raise
        except (OSError, ValueError) as exc:
            self._close_fd()
            self._failed = exc
            self.stats.write_failures += 1
            log.critical("audit log %s cannot be opened: %s", self.directory, exc)
            raise AuditError(f"cannot open audit log in {self.directory}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        self._state = "open"
        if self.keeper.needed:
            assert self._path is not None
            self.keeper.start(self._path)

    def checkpoint_due_in(self) -> float | None:
        """Seconds until a time checkpoint is due (0: now); None when there is nothing to
        checkpoint. For a caller of append_batch, which writes it: when to call it idle.
        Also 0 when a prune record is ready to be written."""
        if self._prune_ready():
            return 0.0
        if self._since_cp <= 0:
            return None
        return max(0.0, self._last_cp + self.checkpoint_seconds - time.monotonic())

    def append_batch(self, entries: Sequence[tuple[str, dict]]
                     ) -> list[dict | AuditRecordError]:
        """Append ``(kind, fields)`` entries as one group commit, synchronously.

        For a caller that owns the writer outright (the writer process): not to be mixed
        with append() or rotate_key(). Returns, in order, each record once it is durable,
        or the AuditRecordError that refused it (the others are written). Also writes a
        time checkpoint when one is due; with no entries, only that. A write or fsync
        failure fails the writer for good and raises AuditError (see ``failure``).
        """
        self._check_usable()
        items: list[_Item] = []
        slots: list[int | AuditRecordError] = []
        for kind, fields in entries:
            try:
                item = self._prepare(kind, fields)
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
        return self._commit([_Item("key_rotation", {}, None, new_key)])[0]

    def _commit(self, items: list[_Item]) -> list[dict]:
        try:
            return self._write_batch(items)
        except Exception as exc:
            self._fail(exc)
            raise AuditError(f"audit record not written: {exc}") from exc

    async def append(self, kind: str, fields: dict) -> dict:
        """Append one record; returns it (with seq, id, sig, ...) once durable."""
        item = self._prepare(kind, fields)
        loop = asyncio.get_running_loop()
        self._ensure_runner(loop)
        item.future = loop.create_future()
        self._pending.append(item)
        self.stats.pending = len(self._pending)
        assert self._wake is not None
        self._wake.set()
        return await item.future

    async def rotate_key(self, new_key: SigningKey) -> dict:
        """Hand the chain over to ``new_key`` now: a key_rotation record signed by the old key."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        self._ensure_runner(loop)
        item = _Item("key_rotation", {}, loop.create_future(), new_key)
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        return await item.future

    async def close(self) -> None:
        """Flush pending records, write a final checkpoint, fsync and close."""
        if self._state != "open":
            self._shutdown_executor()
            return
        loop = asyncio.get_running_loop()
        if self._runner is not None and self._loop is loop and not self._runner.done():
            self._stopping = True
            assert self._wake is not None
            self._wake.set()
            try:
                await self._runner
            except Exception:  # the runner already failed the writer and logged
                pass
        self._state = "closed"
        try:
            if self._failed is None:
                assert self._executor is not None
                leftovers, self._pending = self._pending, []
                try:
                    records = await loop.run_in_executor(self._executor, self._finish, leftovers)
                except Exception as exc:
                    self._fail(exc)
                    self._fail_items(leftovers)
                    raise AuditError(f"audit log close failed: {exc}") from exc
                self._resolve(leftovers, records)
            else:
                self._fail_items(self._pending)
                self._pending = []
        finally:
            self._close_fd()
            self._shutdown_executor()
            self.keeper.stop()

    def close_sync(self) -> None:
        """Like close(), for when no event loop is running."""
        if self._state != "open":
            self._shutdown_executor()
            return
        self._state = "closed"
        leftovers, self._pending = self._pending, []
        try:
            if self._failed is None:
                try:
                    records = self._finish(leftovers)
                except Exception as exc:
                    self._fail(exc)
                    self._fail_items(leftovers)
                    raise AuditError(f"audit log close failed: {exc}") from exc
                self._resolve(leftovers, records)
            else:
                self._fail_items(leftovers)
        finally:
            if self._runner is not None and not self._runner.done():
                try:
                    self._runner.cancel()
                except RuntimeError:
                    pass
            self._close_fd()
            self._shutdown_executor()
            self.keeper.stop()

    # ------------------------------------------------------------------ event-loop side

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise AuditError(f"audit log failed earlier: {self._failed}")
        if self._state != "open":
            raise AuditError("audit writer is not open" if self._state == "new"
                             else "audit writer is closed")

    def _prepare(self, kind: str, fields: dict) -> _Item:
        self._check_usable()
        if not isinstance(kind, str) or not kind:
            raise AuditRecordError("kind must be a non-empty string")
        if not isinstance(fields, dict):
            raise AuditRecordError("fields must be a dict")
        clash = RESERVED.intersection(fields)
        if clash:
            raise AuditRecordError(f"reserved field(s) {sorted(clash)} in audit record")
        try:
            # validates (no floats, str keys, ...) and deep-copies in one go
            copy = json.loads(canonical(fields))
        except CanonicalError as exc:
            raise AuditRecordError(str(exc)) from exc
        plain = is_plain(copy) and is_plain(self.origin) and is_plain(kind)
        return _Item(kind, copy, None, plain=plain)

    def _ensure_runner(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._runner is not None and self._loop is loop and not self._runner.done():
            return
        if self._runner is not None and self._loop is not loop and self._pending:
            # appends stranded on a loop that is gone: they were never acknowledged
            self._fail_items([i for i in self._pending if i.future and i.future.get_loop() is not loop])
            self._pending = [i for i in self._pending if i.future and i.future.get_loop() is loop]
        self._loop = loop
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner = loop.create_task(self._run(), name="audit-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None and self._executor is not None
        while True:
            if not self._pending:
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), self.checkpoint_due_in())
                except TimeoutError:
                    pass
                self._wake.clear()
            batch, self._pending = self._pending, []
            self.stats.pending = 0
            if self._failed is not None:
                self._fail_items(batch)
                continue
            if not batch and not self._cp_time_due() and not self._prune_ready():
                continue
            t0 = time.perf_counter()
            try:
                records = await loop.run_in_executor(self._executor, self._write_batch, batch)
            except Exception as exc:
                self._fail(exc)
                self._fail_items(batch)
                self._fail_items(self._pending)
                self._pending = []
                continue
            self.stats.last_batch_seconds = time.perf_counter() - t0
            self._resolve(batch, records)

    def _resolve(self, items: list[_Item], records: list[dict]) -> None:
        for item, rec in zip(items, records, strict=True):
            fut = item.future
            if fut is not None and not fut.done():
                try:
                    fut.set_result(rec)
                except RuntimeError:  # its loop is closed
                    pass

    def _fail_items(self, items: list[_Item]) -> None:
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
                type(exc).__name__, exc, self._path or self.directory,
            )
        self._close_fd()

    def _shutdown_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ worker-thread side

    def _write_batch(self, items: list[_Item]) -> list[dict]:
        out = []
        plan = (self.keeper.take_plan(self._published)
                if self.keeper.plan_ready(self._published) else None)
        if plan is not None:
            self._prune_record(plan)
        for item in items:
            if self._rotation_due():
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

    def _finish(self, leftovers: list[_Item]) -> list[dict]:
        records = self._write_batch(leftovers) if leftovers else []
        if self._last_kind != "checkpoint":
            self._checkpoint()
        self._sync()
        self._close_fd()
        return records

    def _prune_ready(self) -> bool:
        return (self.keeper.plan_ready(self._published) and self._failed is None
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

    def _rotation_due(self) -> bool:
        if self._file_records == 0:
            return False
        return (self._file_bytes >= self.rotate_bytes
                or time.time() - self._file_started >= self.rotate_seconds)

    def _emit(self, kind: str, fields: dict, key: SigningKey | None = None,
              plain: bool = False) -> dict:
        key = key or self.key
        seq = self._seq
        rec: dict[str, Any] = {
            "v": VERSION, "origin": self.origin, "seq": seq, "ts": utc_ts(),
            "kind": kind, "prev": self._prev, "key_id": key.key_id,
        }
        rec.update(fields)
        if kind == "decision" and "id" not in rec:
            rec["id"] = f"{self.origin}:{seq}"
        line = sign_record(rec, key, plain=plain)
        self._buf.append(line + b"\n")
        self._seq = seq + 1
        self._prev = line_hash(line)
        self._last_kind = kind
        self._file_bytes += len(line) + 1
        self._file_records += 1
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
        self._ext_pending.append(sign_record(ext, self.key) + b"\n")
        self._ext_pending_size = self._seq
        self._since_cp = 0
        self._last_cp = time.monotonic()
        self.stats.checkpoints += 1

    def _flush(self) -> None:
        if self._buf:
            if self._fd is None:
                raise OSError("audit segment is not open")
            data = b"".join(self._buf)
            self._buf.clear()
            _write_all(self._fd, data)

    def _sync(self) -> None:
        if self._buf:
            self._flush()
            assert self._fd is not None
            os.fsync(self._fd)
            self.stats.fsyncs += 1
        if self._ext_pending:
            lines, self._ext_pending = b"".join(self._ext_pending), []
            self._append_ext(self.checkpoints_file, lines)
            if self.anchor_file:
                self._append_ext(self.anchor_file, lines)
            self._published = max(self._published, self._ext_pending_size)

    def _check_ext_file(self, path: Path) -> None:
        """Remember whether an external checkpoint file ends in a torn line."""
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    self._ext_needs_newline[path] = False
                    return
                fh.seek(-1, os.SEEK_END)
                self._ext_needs_newline[path] = fh.read(1) != b"\n"
        except FileNotFoundError:
            self._ext_needs_newline[path] = False

    def _append_ext(self, path: Path, data: bytes) -> None:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self._ext_needs_newline.get(path):
                data = b"\n" + data
            _write_all(fd, data)
            os.fsync(fd)
            self._ext_needs_newline[path] = False
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)

    def _open_segment(self, path: Path, create: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        if create:
            flags |= os.O_EXCL
        existed = path.exists()
        self._fd = os.open(path, flags, 0o640)
        self._path = path
        self._file_bytes = os.fstat(self._fd).st_size
        if not existed:
            os.fsync(self._fd)
            fsync_dir(path.parent)

    def _rotate(self) -> None:
        if self._last_kind != "checkpoint":
            self._checkpoint()
        self._sync()
        self._close_fd()
        new = self.directory / segment_name(self.origin, self._seq)
        if self.keeper.needed:  # before it exists: housekeeping never touches it
            self.keeper.rotated(new)
        self._open_segment(new, create=True)
        self._file_records = 0
        self._file_started = time.time()
        self.stats.rotations += 1

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ recovery (open)

    def _segments(self) -> list[tuple[int, Path]]:
        """This origin's segments in chain order; one per first seq (plain before a
        compressed copy of it, as left by a crash mid-compression)."""
        safe = origin_safe(self.origin)
        found: dict[int, Path] = {}
        for path in self.directory.iterdir():
            parsed = parse_segment_name(path.name)
            if parsed and parsed[0] == safe and path.is_file() and (
                    parsed[1] not in found
                    or found[parsed[1]].name.endswith(COMPRESSED_SUFFIXES)):
                found[parsed[1]] = path
        return sorted(found.items())

    def _published_at_open(self) -> int:
        """The size of the newest checkpoint in every checkpoint file (what retention may
        rely on), as found at open."""
        sizes = [_last_checkpoint_size(self.checkpoints_file, self.origin)]
        if self.anchor_file:
            sizes.append(_last_checkpoint_size(self.anchor_file, self.origin))
        return min(sizes)

    def _known_keys(self) -> dict:
        keys = {self.key.key_id: self.key.public}
        for k in self.key.retired:
            keys[k.key_id] = k.public
        return keys

    def _valid(self, line: bytes, keys: dict, path: Path) -> dict | None:
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
        if rec.get("origin") != self.origin:
            raise AuditError(f"{path}: holds records of origin {rec.get('origin')!r}, not "
                             f"{self.origin!r}; use a distinct origin or directory")
        public = keys.get(key_id)
        if public is None:
            raise AuditError(
                f"{path}: seq {seq} is signed with {key_id}, which is neither the current "
                f"audit key ({self.key.key_id}) nor a retired key in certs_dir; restore that "
                "key (audit-signing-key.<id>.pem) or move the old log away")
        if not verify_signature(rec, public):
            return None
        return rec

    def _last_valid(self, data: bytes, keys: dict, path: Path):
        """(record, line hash, end offset, needs_newline) of the last intact record, or None."""
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        if tail:
            rec = self._valid(tail, keys, path)
            if rec is not None:
                return rec, line_hash(tail), len(data), True
        i = end - 1
        while i >= 0:
            start = data.rfind(b"\n", 0, i) + 1
            line = data[start:i]
            rec = self._valid(line, keys, path) if line else None
            if rec is not None:
                return rec, line_hash(line), i + 1, False
            i = start - 1
        return None

    def _recover(self) -> None:
        keys = self._known_keys()
        segments = self._segments()
        last = None        # (record, hash, end, needs_newline, path)
        last_data = b""
        for _first, path in reversed(segments):
            data = read_segment(path)
            if path == segments[-1][1]:
                last_data = data
            found = self._last_valid(data, keys, path)
            if found:
                last = (*found, path)
                break
        if last is None:
            self._seq, self._prev, chain_key = 0, ZERO_HASH, None
        else:
            rec, h, _end, _nl, _p = last
            self._seq, self._prev = rec["seq"] + 1, h
            chain_key = (rec.get("new_key_id") if rec["kind"] == "key_rotation"
                         else rec["key_id"])
            self._last_kind = rec["kind"]
        # where to continue: the last segment, unless its name does not fit the chain
        last_path = segments[-1][1] if segments else None
        damage_offset = 0
        if last_path is None:
            target, create = self.directory / segment_name(self.origin, 0), True
        elif last_path.name.endswith(COMPRESSED_SUFFIXES):  # closed for good: start a new one
            target, create = self.directory / segment_name(self.origin, self._seq), True
        elif last is not None and last[4] == last_path:
            target, create, damage_offset = last_path, False, last[2]
        elif segments[-1][0] == self._seq:
            target, create = last_path, False
        else:
            target, create = self.directory / segment_name(self.origin, self._seq), True
            log.error("audit segment %s does not continue the chain at seq %d; starting %s",
                      last_path, self._seq, target.name)
        self._open_segment(target, create=create)
        damage = last_data[damage_offset:] if last_path is not None else b""
        if last is not None and last[3] and last[4] == target:
            _write_all(self._fd, b"\n")  # an intact record that only lacked its newline
            self._file_bytes += 1
        if damage:
            assert last_path is not None
            added = False
            if last_path == target and not damage.endswith(b"\n"):
                _write_all(self._fd, b"\n")
                self._file_bytes += 1
                added = True
            self._emit("torn_tail", {
                "file": last_path.name, "offset": damage_offset, "length": len(damage),
                "sha256": line_hash(damage), "newline_added": added,
            })
            self.stats.torn_tails += 1
            log.warning("audit log %s: %d damaged bytes at offset %d (torn write?); recorded "
                        "as torn_tail seq %d, the chain resumes after them",
                        last_path, len(damage), damage_offset, self._seq - 1)
        # time-based rotation counts from the first record of the segment
        self._file_records = 0
        self._file_started = time.time()
        seg_data = target.read_bytes() if target.exists() else b""
        first_line = seg_data.split(b"\n", 1)[0]
        if first_line:
            self._file_records = max(1, seg_data.count(b"\n"))
            try:
                ts = parse(first_line).get("ts")
                self._file_started = parse_ts(ts).timestamp()
            except (ValueError, AttributeError, TypeError):
                pass
        if chain_key is not None and chain_key != self.key.key_id:
            old = next((k for k in self.key.retired if k.key_id == chain_key), None)
            if old is None:
                raise AuditError(
                    f"the audit chain of {self.origin!r} continues from key {chain_key} but "
                    "its private key is not in certs_dir, so the hand-over to "
                    f"{self.key.key_id} cannot be signed")
            new = self.key
            self.key = old
            self._hand_over(new)




def _last_checkpoint_size(path: Path, origin: str, limit: int = 1 << 20) -> int:
    """``size`` of the last complete checkpoint line of ``origin`` in ``path`` (0: none),
    reading at most ``limit`` bytes from the end."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, end - limit))
            data = fh.read()
    except FileNotFoundError:
        return 0
    for line in reversed(data.split(b"\n")):
        try:
            obj = parse(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("origin") == origin \
                and type(obj.get("size")) is int:
            return obj["size"]
    return 0
