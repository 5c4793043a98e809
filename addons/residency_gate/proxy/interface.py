"""What the proxy needs from its neighbours: an audit sink and a metrics sink.

The proxy layer does not import the writer or the Prometheus registry; `ops.run`
hands it objects with these shapes (and tests hand it their own).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..catalog.bundle import Bundle


class AuditSink(Protocol):
    """Appends one record and returns it (with its `id`) once it is durable."""

    @property
    def healthy(self) -> bool: ...

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]: ...

    def append_nowait(self, kind: str, fields: dict[str, Any]) -> asyncio.Future:
        """Queue a record nobody waits on (outcomes); the future says how it went."""
        ...


@dataclass
class Gate:
    """Shared, swappable state: the bundle in force, the audit sink, the metrics."""

    bundle: Bundle
    audit: AuditSink
    metrics: Any = None  # ops.metrics.Metrics, or None (tests)
    background: set[asyncio.Task] = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)


class GateHolder(Protocol):
    """Whoever holds the gate (the main addon): connection addons read it through this."""

    gate: Gate | None
