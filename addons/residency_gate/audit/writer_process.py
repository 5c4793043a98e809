"""The audit writer in its own process: AuditWriter's API, none of its CPU in the proxy.

Every record costs canonical JSON, an Ed25519 signature and a SHA-256 (~80-100 µs here),
and the proxy writes two per request. In-process, that work runs on a thread that shares
the GIL with mitmproxy's event loop, so it lands on the proxy's one core. Here a child
process (``python -m residency_gate.audit.writer_child``, see there for the protocol) runs
the same chain writer; the proxy only marshals the fields, writes all the appends of one
event-loop iteration to a socketpair in one ``send`` (an asyncio stream), and resolves
each append when the child reports its group commit durable (fsynced).

Same guarantees as :class:`AuditWriter`: ``append`` returns only once the record is on
disk; the first write/fsync failure, the child dying or sending garbage, or no
acknowledgement within ``ack_timeout`` fails the writer for good (CRITICAL log, every
pending and later append raises AuditError); ``close`` flushes, writes the final
checkpoint and waits for the child.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import marshal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .canonical import CanonicalError, canonical
from .chain import VERSION
from .keys import SigningKey
from .writer_api import AuditError, AuditRecordError, AuditStats, WriterSettings, WriterState
from .writer_child import HEADER, MAX_FRAME
from .writer_launch import raw_key, start_child, stop_child

log = logging.getLogger("residency_gate.audit")

# Records nobody waits on before acting (the proxy writes outcomes fire-and-forget) go out
# with the next other record, or after DEFER_SECONDS: one send() and one wake-up of the
# writer process per request instead of two.
DEFERRED_KINDS = frozenset({"outcome"})
DEFER_SECONDS = 0.002

class ProcessAuditWriter(WriterState):
    """Drop-in for :class:`AuditWriter` (open/append/rotate_key/close/close_sync/healthy/stats)."""

    def __init__(self, directory: Path, key: SigningKey, origin: str, *,
                 settings: WriterSettings | None = None, ack_timeout: float = 10.0,
                 start_timeout: float = 60.0, **options: Any) -> None:
        """``options``: WriterSettings fields by keyword (they override ``settings``)."""
        self.settings = WriterSettings.of(settings, **options)
        if not origin:
            raise ValueError("origin must not be empty")
        self.directory = Path(directory)
        self.key = key
        self.origin = origin
        self.ack_timeout = float(ack_timeout)
        self.start_timeout = float(start_timeout)
        self._config: dict[str, Any] = {
            "directory": str(self.directory), "origin": origin, "settings": self.settings.to_wire(),
            "lock_timeout": float(start_timeout) / 2,
        }
        self._stats = AuditStats()
        self._state = "new"  # new -> open -> closing -> closed
        self._failed: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None  # ours; the streams get a dup of it
        # bound to the event loop of the latest caller
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stream_sock: socket.socket | None = None  # the dup the streams use
        self._reader: asyncio.Task | None = None
        self._out: list[bytes] = []        # frames of this loop iteration, not yet written
        self._flush_scheduled = False
        self._flush_timer: asyncio.TimerHandle | None = None
        # per frame that gets an answer, in order: (future, time queued, kind, fields)
        self._waiting: collections.deque[tuple[asyncio.Future, float, str, Any]] = \
            collections.deque()
        self._stats_raw: tuple | None = None  # the child's AuditStats, as sent
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed_fut: asyncio.Future | None = None

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> AuditStats:
        """The child's counters as of its latest acknowledgement."""
        if self._stats_raw is not None:
            failures = self._stats.write_failures
            self._stats = AuditStats(*self._stats_raw)
            self._stats.write_failures = max(failures, self._stats.write_failures)
            self._stats_raw = None
        self._stats.pending = len(self._waiting)
        return self._stats

    @property
    def pid(self) -> int | None:
        """The writer process (tests, diagnostics)."""
        return self._proc.pid if self._proc else None

    def open(self) -> None:
        """Start the writer process; it recovers the chain and writes its ``start`` record.

        Synchronous, like AuditWriter.open: call before serving. Raises AuditError."""
        if self._state != "new":
            raise AuditError(f"audit writer already {self._state}")
        self._proc, self._sock, ready = start_child(
            self._config, self.key, self.directory, self.start_timeout, self.ack_timeout)
        self._stats_raw = ready["stats"]
        self._state = "open"

    async def append(self, kind: str, fields: dict) -> dict:
        """Append one record; returns it (with seq, id, sig, ...) once durable."""
        return await self.append_nowait(kind, fields)

    def append_nowait(self, kind: str, fields: dict) -> asyncio.Future:
        """append() for a caller that does not wait (outcome records): queues the record now
        and returns the future of what append() returns, without a coroutine or a task.
        Raises AuditError / AuditRecordError at once when the record cannot be queued; the
        future fails with AuditError when it is not written. Retrieve its outcome (e.g.
        with a done callback), or asyncio logs an unretrieved exception."""
        self._check_append(kind, fields)
        try:
            payload = marshal.dumps(("a", kind, fields))
        except ValueError:  # not plain types (a subclass, ...): the canonical copy or refuse
            try:
                copy = json.loads(canonical(fields))
            except CanonicalError as exc:
                raise AuditRecordError(str(exc)) from exc
            payload = marshal.dumps(("a", kind, copy))
        return self._submit(payload, kind, fields)

    async def rotate_key(self, new_key: SigningKey) -> dict:
        """Hand the chain over to ``new_key`` now: a key_rotation record signed by the old key."""
        self._check_usable()
        rec = await self._submit(marshal.dumps(("k", raw_key(new_key))), "key_rotation", None)
        self.key = new_key
        return rec

    async def close(self) -> None:
        """Flush pending records, write a final checkpoint, fsync, and stop the child."""
        if self._state != "open":
            self._stop_child(kill=self._failed is not None)
            return
        loop = asyncio.get_running_loop()
        self._state = "closing"
        try:
            if self._failed is None:
                await self._bind(loop)
            if self._failed is None:
                self._closed_fut = loop.create_future()
                self._queue(marshal.dumps(("c",)), None)
                try:
                    await asyncio.wait_for(asyncio.shield(self._closed_fut), self.ack_timeout)
                except TimeoutError:
                    self._fail(AuditError(
                        f"audit writer process did not close within {self.ack_timeout:.0f}s"))
                except AuditError:
                    pass
                if self._failed is not None:
                    raise AuditError(f"audit log close failed: {self._failed}")
            else:
                self._fail_waiting()
        finally:
            self._state = "closed"
            self._unbind()
            await loop.run_in_executor(None, self._stop_child, self._failed is not None)

    def close_sync(self) -> None:
        """Like close(), for when no event loop is running: runs close() on a private one."""
        with asyncio.Runner() as runner:
            runner.run(self.close())

    # ------------------------------------------------------------------ sending

    def _submit(self, payload: bytes, kind: str, fields: dict | None) -> asyncio.Future:
        """Queue a message that gets an answer; its future. On a loop not bound yet, it is
        sent once connected (``_connect`` flushes)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._start_bind(loop)
            self._check_usable()
        fut = loop.create_future()
        self._queue(payload, (fut, time.monotonic(), kind, fields), kind not in DEFERRED_KINDS)
        return fut

    def _queue(self, payload: bytes, waiter: tuple | None, urgent: bool = True) -> None:
        out = self._out
        out.append(len(payload).to_bytes(HEADER, "big"))
        out.append(payload)
        loop = self._loop
        assert loop is not None
        if waiter is not None:
            self._waiting.append(waiter)
            if self._watchdog is None:
                self._watchdog = loop.call_later(self.ack_timeout, self._check_acks)
        if self._flush_scheduled:
            return
        if urgent:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        elif self._flush_timer is None:
            self._flush_timer = loop.call_later(DEFER_SECONDS, self._flush)

    def _flush(self) -> None:
        """Write every frame queued in this loop iteration at once (one send())."""
        self._flush_scheduled = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._failed is None and self._writer is not None and self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._writer.write(data)  # the transport buffers what the socket does not take

    # ------------------------------------------------------------------ the connection

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Talk to the writer process on ``loop`` (the loop of the latest caller)."""
        self._start_bind(loop)
        if self._connected is not None:
            await asyncio.shield(self._connected)

    def _start_bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._unbind()
            if self._failed is not None:
                return
            self._loop = loop
            self._connected = loop.create_task(self._connect(), name="audit-writer-connect")

    async def _connect(self) -> None:
        assert self._sock is not None
        try:
            sock = self._sock.dup()  # closing the stream closes only this
        except OSError as exc:
            self._fail(AuditError(f"audit writer process unreachable: {exc}"))
            return
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        except OSError as exc:
            sock.close()
            self._fail(AuditError(f"audit writer process unreachable: {exc}"))
            return
        if self._connected is not asyncio.current_task():  # unbound (failed) meanwhile
            writer.transport.abort()
            sock.close()
            return
        self._writer, self._stream_sock = writer, sock
        self._reader = asyncio.get_running_loop().create_task(
            self._read(reader), name="audit-writer-acks")
        if self._out:  # queued while connecting
            self._flush()

    def _unbind(self) -> None:
        """Stop using the current loop's streams (the loop is going away, or another one
        took over); our socket stays open. Answers still due cannot be read any more
        (the old stream may hold them), so the writer fails if any are."""
        self._loop = None
        writer, self._writer = self._writer, None
        stream_sock, self._stream_sock = self._stream_sock, None
        reader, self._reader = self._reader, None
        self._connected = None
        for handle in (self._watchdog, self._flush_timer):
            if handle is not None:
                handle.cancel()
        self._watchdog = self._flush_timer = None
        self._flush_scheduled = False
        if reader is not None and reader is not asyncio.current_task():
            try:
                reader.cancel()
            except RuntimeError:  # its loop is closed
                pass
        if writer is not None:
            try:
                writer.transport.abort()
            except RuntimeError:  # its loop is closed
                pass
        if stream_sock is not None:
            stream_sock.close()  # now, even if the loop never runs again
        if self._waiting and self._failed is None:
            self._fail(AuditError(f"the event loop of {len(self._waiting)} unacknowledged "
                                  "audit record(s) went away"))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Handle the writer process's messages until it closes the socket."""
        try:
            while self._failed is None:
                size = int.from_bytes(await reader.readexactly(HEADER), "big", signed=True)
                if not 0 <= size <= MAX_FRAME:
                    raise ValueError(f"message of {size} bytes")
                self._handle(marshal.loads(await reader.readexactly(size)))
        except (asyncio.IncompleteReadError, OSError):  # EOF, or the socket broke
            self._on_eof()
        except asyncio.CancelledError:
            if self._reader is asyncio.current_task():  # not by _unbind: the loop is ending
                self._unbind()
            raise
        except Exception as exc:
            self._fail(AuditError(f"audit writer process sent garbage: {exc!r}"))

    def _handle(self, msg: tuple) -> None:
        op = msg[0]
        if op == "A":
            self._stats_raw = msg[2]
            waiting = self._waiting
            origin = self.origin
            for res in msg[1]:
                if not waiting:
                    self._fail(AuditError("audit writer process acknowledged more records "
                                          "than it was sent"))
                    return
                fut, _t, kind, fields = waiting.popleft()
                if fut.done():
                    continue
                if type(res) is tuple:  # (seq, ts, prev, key_id, sig): rebuild the record
                    seq, ts, prev, key_id, sig = res
                    rec = {"v": VERSION, "origin": origin, "seq": seq, "ts": ts,
                           "kind": kind, "prev": prev, "key_id": key_id}
                    rec.update(fields)
                    if kind == "decision" and "id" not in rec:
                        rec["id"] = f"{origin}:{seq}"
                    rec["sig"] = sig
                    fut.set_result(rec)
                elif type(res) is dict:
                    fut.set_result(res)
                else:
                    fut.set_exception(AuditRecordError(res))
        elif op == "L":
            log.log(msg[1], "%s", msg[2])
        elif op == "F":  # the child's AuditWriter logged it CRITICAL (forwarded just before)
            self._fail(OSError(f"{msg[1]} failed in the audit writer process: {msg[2]}"),
                       logged=True)
        elif op == "C":
            self._stats_raw = msg[1]
            if self._waiting:
                self._fail(AuditError("audit writer process closed with records unanswered"))
            if self._closed_fut is not None and not self._closed_fut.done():
                self._closed_fut.set_result(None)

    def _on_eof(self) -> None:
        if self._closed_fut is not None and self._closed_fut.done():
            return
        code = self._proc.poll() if self._proc else None
        how = f"exit code {code}" if code is not None and code >= 0 else (
            f"killed by signal {-code}" if code is not None else "closed its socket")
        self._fail(AuditError(f"audit writer process died ({how})"))

    def _check_acks(self) -> None:
        self._watchdog = None
        if not self._waiting or self._failed is not None or self._loop is None:
            return
        late = time.monotonic() - self._waiting[0][1]
        if late >= self.ack_timeout:
            self._fail(AuditError(f"audit writer process did not acknowledge a record within "
                                  f"{self.ack_timeout:.0f}s (hung?)"))
            self._stop_child(kill=True)
            return
        self._watchdog = self._loop.call_later(self.ack_timeout - late, self._check_acks)

    # ------------------------------------------------------------------ failure

    def _fail(self, exc: BaseException, *, logged: bool = False) -> None:
        if self._failed is None:
            self._failed = exc
            self.stats.write_failures = max(1, self.stats.write_failures)
            if not logged:
                log.critical(
                    "AUDIT LOG WRITE FAILED (%s: %s) in %s; the audit writer is permanently "
                    "failed and no further records will be written: LLM traffic must stop",
                    type(exc).__name__, exc, self.directory,
                )
        self._fail_waiting()
        if self._closed_fut is not None and not self._closed_fut.done():
            self._closed_fut.set_exception(AuditError(str(exc)))
            self._closed_fut.exception()  # retrieved: close() reports it
        self._unbind()

    def _fail_waiting(self) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        self._out.clear()
        for fut, *_rest in waiting:
            if not fut.done():
                try:
                    fut.set_exception(AuditError(f"audit record not written: {self._failed}"))
                except RuntimeError:  # its loop is closed
                    pass

    # ------------------------------------------------------------------ the process

    def _stop_child(self, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        sock, self._sock = self._sock, None
        stop_child(proc, sock, kill=kill, timeout=self.ack_timeout)
