"""The audit writer for event-loop callers: :class:`ChainWriter` (chain_writer.py) with a
group-commit runner on one worker thread.

``append`` returns a record only once it is durable (written and fsynced). Appends that
arrive while a batch is being written go into the next batch (one write + fsync for all of
them); the runner task hands each batch to the worker thread, so the event loop never does
file I/O after ``open``. The writer process (writer_process.py) runs a ChainWriter without
this runner.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .chain_writer import ChainWriter, Item
from .keys import SigningKey
from .writer_api import AuditError, AuditRecordError, AuditStats, WriterSettings

__all__ = ["AuditError", "AuditRecordError", "AuditStats", "AuditWriter", "WriterSettings"]


class AuditWriter(ChainWriter):
    def __init__(self, directory: Path, key: SigningKey, origin: str, *,
                 settings: WriterSettings | None = None, **options: Any) -> None:
        """``options``: WriterSettings fields by keyword (they override ``settings``)."""
        super().__init__(directory, key, origin, settings=settings, **options)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    # ------------------------------------------------------------------ public API

    async def append(self, kind: str, fields: dict) -> dict:
        """Append one record; returns it (with seq, id, sig, ...) once durable."""
        return await self.append_nowait(kind, fields)

    def append_nowait(self, kind: str, fields: dict) -> asyncio.Future:
        """append() for a caller that does not wait: the future of the record (see
        ProcessAuditWriter.append_nowait)."""
        item = self._prepare(kind, fields)
        loop = asyncio.get_running_loop()
        self._ensure_runner(loop)
        item.future = fut = loop.create_future()
        self._pending.append(item)
        self.stats.pending = len(self._pending)
        assert self._wake is not None
        self._wake.set()
        return fut

    async def rotate_key(self, new_key: SigningKey) -> dict:
        """Hand the chain over to ``new_key`` now: a key_rotation record signed by the old key."""
        self._check_usable()
        loop = asyncio.get_running_loop()
        self._ensure_runner(loop)
        item = Item("key_rotation", {}, loop.create_future(), new_key)
        self._pending.append(item)
        assert self._wake is not None
        self._wake.set()
        return await item.future

    async def close(self) -> None:
        """Flush pending records, write a final checkpoint, fsync and close."""
        if self._state != "open":
            self._release()
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
        leftovers = self._closing()
        try:
            outcome = await loop.run_in_executor(self._executor, self._final, leftovers)
            self._closed(leftovers, outcome)
        finally:
            self._release()

    def close_sync(self) -> None:
        """Like close(), for when no event loop is running."""
        if self._runner is not None and not self._runner.done():
            try:
                self._runner.cancel()
            except RuntimeError:
                pass
        super().close_sync()

    # ------------------------------------------------------------------ the runner

    def _opened(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")

    def _closing(self) -> list[Item]:
        self._state = "closed"
        leftovers, self._pending = self._pending, []
        return leftovers

    def _release(self) -> None:
        super()._release()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

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
