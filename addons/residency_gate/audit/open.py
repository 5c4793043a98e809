"""Open the audit writer a running proxy uses, as the config says."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from ..catalog.config import AuditConfig
from .housekeeping import Retention
from .keys import load_or_create_signing_key
from .resilient import ResilientAudit
from .writer import AuditWriter
from .writer_api import WriterSettings
from .writer_process import ProcessAuditWriter

log = logging.getLogger("residency_gate")


class NullAudit:
    """Benchmark-only sink (RESIDENCY_GATE_BENCH_NO_AUDIT=1): measures the cost of auditing."""

    healthy = True

    def __init__(self) -> None:
        self._seq = 0

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        return self._record()

    def append_nowait(self, kind: str, fields: dict[str, Any]) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self._record())
        return fut

    def _record(self) -> dict[str, Any]:
        self._seq += 1
        return {"id": f"bench:{self._seq}"}

    async def close(self) -> None:
        pass


def open_audit(audit: AuditConfig, certs_dir, origin: str | None = None,
               on_restart: Callable[[str], Awaitable[None]] | None = None
               ) -> ResilientAudit | AuditWriter | NullAudit:
    """The audit writer, open. By default in its own process (signing, hashing and fsync
    off the proxy's core), restarted when that process dies (`ResilientAudit`, up to
    `audit.writer_restarts` times in a row; `on_restart(reason)` runs after each);
    RESIDENCY_GATE_AUDIT_THREAD=1 keeps it on a thread in-process."""
    if os.environ.get("RESIDENCY_GATE_BENCH_NO_AUDIT") == "1":
        log.critical("RESIDENCY_GATE_BENCH_NO_AUDIT=1: NO AUDIT RECORDS ARE WRITTEN "
                     "(benchmarking only; never run a real proxy like this)")
        return NullAudit()
    key = load_or_create_signing_key(certs_dir)
    settings = WriterSettings(
        fsync=audit.fsync, rotate_bytes=audit.rotate_bytes, rotate_seconds=audit.rotate_seconds,
        checkpoint_every=audit.checkpoint_every, checkpoint_seconds=audit.checkpoint_seconds,
        anchor_file=audit.anchor, compress=audit.compress, retention=_retention(audit))
    origin = origin or audit.origin
    if os.environ.get("RESIDENCY_GATE_AUDIT_THREAD") == "1":
        writer = AuditWriter(audit.dir, key, origin, settings=settings)
        writer.open()
        return writer
    sink = ResilientAudit(lambda: ProcessAuditWriter(audit.dir, key, origin, settings=settings),
                          audit.writer_restarts, on_restart)
    sink.open()
    return sink


def _retention(audit: AuditConfig) -> Retention | None:
    r = audit.retention
    return None if r is None else Retention(r.max_age_days, r.max_bytes, r.archive_dir)
