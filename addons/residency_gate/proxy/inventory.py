"""AI services the catalog does not place (consumer AI apps, unplaced LLM APIs): tunnel and
count them, or refuse them when the client's requirement is enforced.

  http_connect        -> remember the proxy-auth user of the tunnel
  next_layer          -> TLS to an inventory service: a client with an enforced
                         requirement is left to the normal path (intercepted, decided as a
                         destination of unknown place, refused with the block page); every
                         other client's connection becomes a counted tunnel: its TLS is never
                         intercepted, only bytes and time are measured
  client_disconnected -> the tunnel's connection joins the tally
  every minute, done  -> the tally is written as one signed `inventory` record per
                         (client, user, service, host) and window, not one per connection

mitmproxy relays an ignored connection without any hook per chunk, so the tunnel is
mitmproxy's own raw TCP relay (ignore=True) with a byte count added.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mitmproxy import connection, http
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import TCPLayer
from mitmproxy.proxy.layers.tcp import TcpMessageInjected
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.proxy.utils import expect

from ..audit.record import inventory_fields
from ..core.admission import is_ip
from ..core.endpoints import Endpoint
from ..core.requirement import Requirement
from .interface import GateHolder

log = logging.getLogger("residency_gate")

MAX_KEYS = 10_000  # tally rows held before an early flush: memory stays bounded
FLUSH_SECONDS = 60.0


@dataclass
class Tunnel:
    """One counted connection to an inventory service."""

    key: tuple
    would_block: bool  # a requirement applies, in report mode: enforcing would refuse it
    started: float = field(default_factory=time.monotonic)
    up: int = 0
    down: int = 0


@dataclass
class Row:
    """What one window holds for one (client, user, service, host)."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: int = 0
    would_block: int = 0


class CountedTunnel(TCPLayer):
    """mitmproxy's raw relay for an ignored connection, counting bytes each way."""

    def __init__(self, context, tunnel: Tunnel) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel

    @expect(events.DataReceived, events.ConnectionClosed, TcpMessageInjected)
    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.tunnel.up += len(event.data)
            else:
                self.tunnel.down += len(event.data)
        yield from super().relay_messages(event)


class Inventory:
    """Tunnels and counts AI-service connections; see the module docstring."""

    def __init__(self, owner: GateHolder) -> None:
        self.owner = owner
        self.users: dict[str, str] = {}  # client connection id -> proxy-auth user
        self.tunnels: dict[str, Tunnel] = {}  # client connection id -> its counted tunnel
        self.rows: dict[tuple, Row] = {}
        self.window_start = datetime.now(UTC)
        self._timer: asyncio.Task | None = None

    @property
    def gate(self):
        return self.owner.gate

    # ------------------------------------------------------------------ connections

    def http_connect(self, flow: http.HTTPFlow) -> None:
        user = (flow.metadata.get("proxyauth") or (None,))[0]
        if user:
            self.users[flow.client_conn.id] = user

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            self._next_layer(nextlayer)
        except Exception:  # left alone: the connection takes the normal (intercepted) path
            log.exception("cannot classify a connection for the AI inventory")

    def _next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        if self.gate is None or context.client.transport_protocol != "tcp" \
                or not context.server.address or context.client.id in self.tunnels:
            return
        data = nextlayer.data_client()
        if not starts_like_tls_record(data):
            return
        host = context.server.address[0]
        sni = None
        catalog = self.gate.bundle.catalog
        # A CONNECT names the host; an address (transparent mode) needs the SNI. An SNI
        # naming a service behind a CONNECT to another host is fronting: left to the
        # normal path, which refuses it.
        if is_ip(host):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                return  # not TLS we understand: the normal path decides
            if hello is None:
                nextlayer.layer = None  # the ClientHello is incomplete: ask again
                return
            sni = hello.sni
        service = catalog.service(sni or host)
        if service is None:
            return
        client, user = context.client.peername[0], self.users.get(context.client.id)
        requirement = self.gate.bundle.policy.requirements.resolve((), client, user)
        if requirement.places is not None and requirement.enforces(None):
            return  # intercepted and refused: no service of unknown place satisfies it
        tunnel = Tunnel(self._key(service, client, user, host, sni, requirement),
                        requirement.places is not None)
        self.tunnels[context.client.id] = tunnel
        nextlayer.layer = CountedTunnel(context, tunnel)
        if self.gate.metrics:
            self.gate.metrics.inventory_connections.labels(provider=service.provider.id).inc()
            self.gate.metrics.flows.labels(kind="tunnelled").inc()

    def _key(self, service: Endpoint, client: str, user: str | None, host: str,
             sni: str | None, requirement: Requirement) -> tuple:
        regions = self.gate.bundle.regions
        return (client, user, service.provider.id, service.id, host, sni,
                tuple(requirement.names), tuple(regions.region_list(requirement.places) or ())
                if requirement.places is not None else None)

    def client_disconnected(self, client: connection.Client) -> None:
        self.users.pop(client.id, None)
        self._close(client.id)

    def _close(self, client_id: str) -> None:
        tunnel = self.tunnels.pop(client_id, None)
        if tunnel is None:
            return
        row = self.rows.get(tunnel.key)
        if row is None:
            row = self.rows[tunnel.key] = Row()
        row.connections += 1
        row.bytes_up += tunnel.up
        row.bytes_down += tunnel.down
        row.duration_ms += int((time.monotonic() - tunnel.started) * 1000)
        row.would_block += tunnel.would_block
        if len(self.rows) >= MAX_KEYS:
            self.flush()

    # ------------------------------------------------------------------ records

    def running(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._every())

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            self.flush()

    @property
    def flush_seconds(self) -> float:
        gate = self.gate
        return gate.bundle.config.audit.inventory_seconds if gate is not None else FLUSH_SECONDS

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for client_id in list(self.tunnels):  # still open at shutdown: counted so far
            self._close(client_id)
        self.flush()

    def flush(self) -> None:
        """One signed `inventory` record per row of the window that ends now."""
        rows, self.rows = self.rows, {}
        start, self.window_start = self.window_start, datetime.now(UTC)
        if not rows or self.gate is None:
            return
        seconds = max(1, int((self.window_start - start).total_seconds()))
        records = [inventory_fields(start, seconds, *key, row.connections, row.bytes_up,
                                    row.bytes_down, row.duration_ms, row.would_block)
                   for key, row in rows.items()]
        self.gate.spawn(self._write(records))

    async def _write(self, records: list[dict[str, Any]]) -> None:
        audit = self.gate.audit
        try:
            for fields in records:
                await audit.append("inventory", fields)
                if self.gate.metrics:
                    self.gate.metrics.audit_records.inc()
        except Exception as e:
            log.critical("cannot write inventory records: %s", e)
