"""An audit sink that outlives its writer process: a crash is a blip, a failed write is not.

The writer process can die for reasons that say nothing about the disk (OOM killer, a
stray SIGKILL, a bug). Then this sink opens a new writer with the same settings (it
recovers the chain exactly as at start: a torn last line is marked, `seq` goes on, a
`start` record is written) and the proxy serves again within seconds. While it does,
`healthy` is False, so LLM requests are refused (503), never forwarded unrecorded; the
records the old process acknowledged are on disk, the ones it had not are refused to
whoever waited on them.

A write or fsync that failed (`failure` is an OSError) is never retried: the disk
cannot be trusted, the writer stays failed for good, as does a writer that keeps dying
(`restarts` times in a row, each within STABLE_SECONDS of starting). `failed_for_good`
tells the admin listener to fail /healthz so an orchestrator restarts the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .writer import AuditError

log = logging.getLogger("residency_gate.audit")

POLL_SECONDS = 0.2  # how soon a writer that died with nothing to write is noticed
FIRST_BACKOFF = 0.25  # seconds before the first restart; doubled for each one in a row
MAX_BACKOFF = 8.0
STABLE_SECONDS = 60.0  # a writer that lived this long resets the count of restarts in a row


class Writer(Protocol):
    """What this sink needs of a writer (ProcessAuditWriter has it)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def failure(self) -> BaseException | None: ...

    def open(self) -> None: ...

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]: ...

    def append_nowait(self, kind: str, fields: dict[str, Any]) -> asyncio.Future: ...

    async def close(self) -> None: ...


def write_failed(failure: BaseException) -> bool:
    """A failed write or fsync (the writer reports it as an OSError): never restart.
    Anything else (the process died, hung, or its socket broke) is the process."""
    return isinstance(failure, OSError)


class ResilientAudit:
    def __init__(self, make: Callable[[], Writer], restarts: int = 5,
                 on_restart: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._make = make
        self._restarts = restarts
        self._on_restart = on_restart
        self._writer: Writer | None = None
        self._opened_at = 0.0
        self._streak = 0  # restarts in a row
        self._given_up: BaseException | None = None
        self._restarting: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._closing = False
        self.restart_count = 0

    # ------------------------------------------------------------------ the sink

    def open(self) -> None:
        """Open the first writer (synchronous, before serving, like the writer's own)."""
        writer = self._make()
        writer.open()
        self._writer, self._opened_at = writer, time.monotonic()

    @property
    def healthy(self) -> bool:
        w = self._writer
        return w is not None and w.healthy and self._restarting is None and not self._closing

    @property
    def failure(self) -> BaseException | None:
        return self._given_up or (self._writer.failure if self._writer else None)

    @property
    def failed_for_good(self) -> bool:
        return self._given_up is not None

    @property
    def writer(self) -> Writer | None:
        """The writer process in use now (tests, diagnostics)."""
        return self._writer

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        writer = self._usable()
        try:
            return await writer.append(kind, fields)
        finally:
            if writer.failure is not None:
                self._on_failure(writer)

    def append_nowait(self, kind: str, fields: dict[str, Any]) -> asyncio.Future:
        """The writer's append_nowait (for records nobody waits on: outcomes). A writer that
        fails meanwhile is noticed by the next append, or within POLL_SECONDS."""
        writer = self._usable()
        try:
            return writer.append_nowait(kind, fields)
        finally:
            if writer.failure is not None:
                self._on_failure(writer)

    def _usable(self) -> Writer:
        self._supervise()
        writer = self._writer
        if self._given_up is not None:
            raise AuditError(f"audit log failed for good: {self._given_up}")
        if writer is None or self._restarting is not None:
            raise AuditError("audit writer process is being restarted")
        return writer

    async def close(self) -> None:
        self._closing = True
        for task in (self._watch, self._restarting):
            if task is not None:
                task.cancel()
        if self._writer is not None:
            await self._writer.close()

    # ------------------------------------------------------------------ restarts

    def _supervise(self) -> None:
        """Watch the writer from the running loop (started with the first append)."""
        if self._watch is None and not self._closing:
            self._watch = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            writer = self._writer
            if writer is not None and writer.failure is not None:
                self._on_failure(writer)

    def _on_failure(self, writer: Writer) -> None:
        if writer is not self._writer or self._restarting or self._given_up or self._closing:
            return
        failure = writer.failure
        assert failure is not None
        if write_failed(failure):
            self._give_up(failure, "a write or fsync failed; not restarting")
            return
        if time.monotonic() - self._opened_at >= STABLE_SECONDS:
            self._streak = 0
        if self._streak >= self._restarts:
            self._give_up(failure, f"it died {self._streak + 1} times in a row")
            return
        self._restarting = asyncio.get_running_loop().create_task(self._restart(failure))

    async def _restart(self, failure: BaseException) -> None:
        old = self._writer
        reason = f"{type(failure).__name__}: {failure}"
        try:
            if old is not None:
                try:
                    await old.close()  # reaps the dead child
                except Exception as e:
                    log.debug("closing the dead audit writer: %s", e)
            delay = min(FIRST_BACKOFF * 2 ** self._streak, MAX_BACKOFF)
            while True:
                self._streak += 1
                log.critical("audit writer failed (%s); restarting it in %.2fs (%d of %d)",
                             reason, delay, self._streak, self._restarts)
                await asyncio.sleep(delay)
                writer = self._make()
                try:
                    await asyncio.get_running_loop().run_in_executor(None, writer.open)
                    break
                except Exception as e:
                    if self._streak >= self._restarts:
                        self._give_up(e, f"it could not be restarted {self._streak} times")
                        return
                    log.critical("audit writer did not start again: %s", e)
                    delay = min(delay * 2, MAX_BACKOFF)
            self._writer, self._opened_at = writer, time.monotonic()
            self.restart_count += 1
            log.warning("audit writer restarted (pid %s) after: %s",
                        getattr(writer, "pid", "?"), reason)
        finally:
            self._restarting = None
        if self._on_restart is not None:
            try:
                await self._on_restart(reason)
            except Exception as e:
                log.critical("cannot record the audit writer restart: %s", e)

    def _give_up(self, failure: BaseException, why: str) -> None:
        self._given_up = failure
        log.critical("AUDIT LOG FAILED FOR GOOD (%s: %s): %s. LLM traffic is refused until "
                     "the proxy is restarted.", type(failure).__name__, failure, why)
