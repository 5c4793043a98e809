"""Time and count limits on every connection: slow clients and silent providers are cut off.

What mitmproxy offers is one inactivity timeout per connection (`tcp_timeout`, mapped
from `limits.tunnel_idle_seconds`) and nothing else: a client that trickles a byte every
few seconds, or a provider that accepts TCP and never answers, holds a connection for as
long as it likes. `ConnectionLimits` adds what it lacks, through mitmproxy's public
hooks and its layer API:

- `client_connected`: refuse a connection over `max_connections` (in all) or
  `max_connections_per_client` (from one address) at once (`client.error`).
- `next_layer`: wrap the connection's top layer in a `Guard`, which sees every event
  (bytes from client and provider, connects, wake-ups) and every hook on its way out, and
  keeps two clocks: `ClientClock` (request head, TLS handshake, body rate, keep-alive idle,
  head size) and `UpstreamClock` (connect, TLS handshake, first response byte, silence
  between response chunks). An expired client limit closes the client connection; an
  expired upstream limit marks the flows waiting on that provider connection and closes
  it, so mitmproxy reports the failure through the `error` hook, where the gate answers
  in the provider's own shape (`upstream.py`). A connect or TLS failure and a connection
  the provider closed are marked the same way (`UPSTREAM_FAILURE`): the outcome record
  names the kind of failure without parsing error strings.

Deadlines are computed from start times and the limits in force (a reload applies to
open connections too); the Guard asks mitmproxy for one wake-up at the next deadline,
so nothing here polls or blocks the event loop.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_hooks  # the hook classes it exports
from mitmproxy.proxy.layers import tcp, tls, websocket

from ..catalog.config import Limits
from . import upstream
from .interface import GateHolder
from .upstream import UPSTREAM_FAILURE, UpstreamFailure

log = logging.getLogger("residency_gate")


# client phases
OPENING, HANDSHAKE, WAIT_HEAD, HEAD, ACTIVE, IDLE, TUNNEL = (
    "opening", "handshake", "wait_head", "head", "active", "idle", "tunnel")


@dataclass
class ClientClock:
    """Where a client connection is, since when, and what the limits allow it.

    OPENING (accepted) / WAIT_HEAD (TLS done) / IDLE (keep-alive) wait for the first byte
    of a request head; HEAD has it; a CONNECT or ClientHello starts HANDSHAKE; heads done
    make it ACTIVE while requests are open; a tunnel (TCP, WebSocket) is not timed here."""

    phase: str = OPENING
    since: float = 0.0
    head_bytes: int = 0
    bodies: dict[Any, list[float]] = field(default_factory=dict)  # flow -> [start, bytes]
    open_requests: set[Any] = field(default_factory=set)

    def data(self, n: int, now: float, http2: bool = False) -> bool:
        """Count `n` bytes from the client; True if that may bring a deadline closer (a new
        head started, or a head grew). HTTP/2 frames (pings, settings) start no head: an
        HTTP/2 connection is idle until a request's headers are complete."""
        for body in self.bodies.values():  # HTTP/2 interleaves: every open body may count it
            body[1] += n
        if self.phase == IDLE and not http2:
            self.phase, self.since, self.head_bytes = HEAD, now, 0
        if self.phase in (OPENING, WAIT_HEAD, HEAD):
            self.head_bytes += n
            return True
        return False

    def to(self, phase: str, now: float) -> None:
        if self.phase != TUNNEL:
            self.phase, self.since, self.head_bytes = phase, now, 0

    def head_done(self, flow: Any, now: float) -> None:
        self.open_requests.add(flow)
        self.bodies[flow] = [now, 0.0]
        self.to(ACTIVE, now)

    def body_done(self, flow: Any) -> None:
        self.bodies.pop(flow, None)

    def flow_done(self, flow: Any, now: float) -> None:
        self.bodies.pop(flow, None)
        self.open_requests.discard(flow)
        if not self.open_requests and self.phase == ACTIVE:
            self.to(IDLE, now)

    def head_over(self, limits: Limits) -> bool:
        """A request head (or what precedes the first) larger than limits.max_header_bytes."""
        return self.phase in (OPENING, WAIT_HEAD, HEAD) and self.head_bytes > limits.max_header_bytes

    def expired(self, now: float, limits: Limits) -> str | None:
        """The limits.* key that this connection has broken, if any."""
        if self.phase == TUNNEL:
            return None
        if self.head_over(limits):
            return "max_header_bytes"
        deadline, key = self.deadline(limits)
        if deadline is not None and now >= deadline:
            return key
        return None

    def deadline(self, limits: Limits) -> tuple[float | None, str]:
        if self.phase in (OPENING, WAIT_HEAD, HEAD):
            return self.since + limits.client_header_seconds, "client_header_seconds"
        if self.phase == HANDSHAKE:
            return self.since + limits.client_handshake_seconds, "client_handshake_seconds"
        if self.phase == IDLE:
            return self.since + limits.client_idle_seconds, "client_idle_seconds"
        if self.phase == ACTIVE and self.bodies:
            return (min(start + limits.client_body_seconds + got / limits.client_body_min_rate
                        for start, got in self.bodies.values()), "client_body_seconds")
        return None, ""


@dataclass
class UpstreamClock:
    """Provider connections being opened, and flows waiting for (more of) a response."""

    connecting: dict[connection.Server, float] = field(default_factory=dict)
    handshaking: dict[connection.Server, float] = field(default_factory=dict)
    first_byte: dict[http.HTTPFlow, float] = field(default_factory=dict)  # flow -> forwarded
    streaming: dict[http.HTTPFlow, float] = field(default_factory=dict)  # flow -> last read

    def server_data(self, server: connection.Server, now: float) -> None:
        for flow in self.streaming:
            if flow.server_conn is server:
                self.streaming[flow] = now

    def flow_done(self, flow: http.HTTPFlow) -> None:
        self.first_byte.pop(flow, None)
        self.streaming.pop(flow, None)

    def closed(self, server: connection.Server) -> None:
        self.connecting.pop(server, None)
        self.handshaking.pop(server, None)

    def expired(self, now: float, limits: Limits) -> Iterator[tuple[str, Any]]:
        """(limits key, server connection or flow) for every wait that ran out."""
        for server, t in list(self.connecting.items()):
            if now >= t + limits.upstream_connect_seconds:
                yield "upstream_connect_seconds", server
        for server, t in list(self.handshaking.items()):
            if now >= t + limits.upstream_tls_seconds:
                yield "upstream_tls_seconds", server
        for flow, t in list(self.first_byte.items()):
            if now >= t + limits.upstream_first_byte_seconds:
                yield "upstream_first_byte_seconds", flow
        for flow, t in list(self.streaming.items()):
            if now >= t + limits.upstream_idle_seconds:
                yield "upstream_idle_seconds", flow

    def deadline(self, limits: Limits) -> float | None:
        times = [t + limits.upstream_connect_seconds for t in self.connecting.values()]
        times += [t + limits.upstream_tls_seconds for t in self.handshaking.values()]
        times += [t + limits.upstream_first_byte_seconds for t in self.first_byte.values()]
        times += [t + limits.upstream_idle_seconds for t in self.streaming.values()]
        return min(times, default=None)


class Guard(layer.Layer):
    """Wraps a client connection's top layer: passes every event down and every command up
    unchanged, keeping the two clocks, and closes what has run out of time."""

    def __init__(self, inner: layer.Layer, owner: ConnectionLimits) -> None:
        # not Layer.__init__: this wrapper is no layer of the stack (context.layers)
        self.inner = inner
        self.context = inner.context
        self.owner = owner
        self.debug = None
        self._paused = None
        self._paused_event_queue = deque()
        self.client = ClientClock(since=time.monotonic())
        self.upstream = UpstreamClock()
        # provider connections of this client connection -> the address they were opened
        # for (before `resolve` or DNS changed it): how a waiting flow finds its connection
        self.servers: dict[connection.Server, tuple] = {}
        self._wakeups: dict[commands.RequestWakeup, float] = {}
        self._closed = False
        self._killed = False
        self._dirty = True  # a clock changed: recompute the deadlines
        self._due = 0.0  # the earliest deadline, as last computed

    def __repr__(self) -> str:
        return f"Guard({self.inner!r}, client {self.client.phase})"

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from self.handle_event(event)  # pragma: no cover - handle_event is used

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        now = time.monotonic()
        if isinstance(event, events.Wakeup) and event.command in self._wakeups:
            del self._wakeups[event.command]
            yield from self._enforce(now)
            return
        self._before(event, now)
        if self._killed:  # a raw TCP flow an addon killed: close, never relay (connections.py)
            if not self._closed:
                self._closed = True
                yield commands.CloseConnection(self.context.client)
            return
        for command in self.inner.handle_event(event):
            self._after(command, now)
            yield command
        if self._dirty or now >= self._due:  # most events (bytes) change no deadline
            yield from self._enforce(now)

    # ------------------------------------------------------------------ bookkeeping

    def _before(self, event: events.Event, now: float) -> None:
        if isinstance(event, events.DataReceived):  # deadlines move later, none closer ...
            if event.connection is self.context.client:
                if self.client.data(len(event.data), now, self.context.client.alpn == b"h2"):
                    self._dirty = True  # ... except a head's: started now, or grown
            elif isinstance(event.connection, connection.Server):
                self.upstream.server_data(event.connection, now)
            return
        self._dirty = True
        if isinstance(event, events.OpenConnectionCompleted):
            server = event.command.connection
            if isinstance(server, connection.Server):
                self.upstream.connecting.pop(server, None)
                if event.reply is None and server.tls:
                    self.upstream.handshaking[server] = now
                elif event.reply is not None:
                    self._mark_waiting(server, UpstreamFailure("connect"))
                    self.servers.pop(server, None)
        elif isinstance(event, events.ConnectionClosed):
            if isinstance(event.connection, connection.Server):
                self._mark_waiting(event.connection, UpstreamFailure("reset"), streaming=True)
                self.upstream.closed(event.connection)
                self.servers.pop(event.connection, None)
        elif isinstance(event, events.HookCompleted):
            hook = event.command
            if isinstance(hook, tcp.TcpStartHook) and hook.flow.error is not None:
                self._killed = True  # mitmproxy would relay a killed TCP flow all the same
            elif isinstance(hook, http_hooks.HttpRequestHook):
                flow = hook.flow
                if flow.response is None and flow.error is None and flow.live:
                    self.upstream.first_byte[flow] = now  # forwarded now

    def _after(self, command: commands.Command, now: float) -> None:
        if isinstance(command, commands.SendData):
            return
        self._dirty = True
        if isinstance(command, commands.OpenConnection):
            server = command.connection
            if isinstance(server, connection.Server):
                self.upstream.connecting[server] = now
                self.servers[server] = tuple(server.address or ())[:2]
            return
        if not isinstance(command, commands.StartHook):
            return
        c, u = self.client, self.upstream
        if isinstance(command, http_hooks.HttpRequestHeadersHook):
            c.head_done(command.flow, now)
        elif isinstance(command, http_hooks.HttpRequestHook):
            c.body_done(command.flow)
        elif isinstance(command, http_hooks.HttpResponseHeadersHook):
            u.first_byte.pop(command.flow, None)
            u.streaming[command.flow] = now
        elif isinstance(command, http_hooks.HttpResponseHook | http_hooks.HttpErrorHook):
            u.flow_done(command.flow)
            c.flow_done(command.flow, now)
            if command.flow.websocket is not None:
                c.to(TUNNEL, now)
        elif isinstance(command, http_hooks.HttpConnectHook):
            c.flow_done(command.flow, now)
            c.to(HANDSHAKE, now)  # the tunnel's TLS handshake (or its first bytes) next
        elif isinstance(command, tls.TlsClienthelloHook):
            c.to(HANDSHAKE, now)
        elif isinstance(command, tls.TlsEstablishedClientHook):
            c.to(IDLE if self.context.client.alpn == b"h2" else WAIT_HEAD, now)
        elif isinstance(command, tls.TlsEstablishedServerHook | tls.TlsFailedServerHook):
            u.handshaking.pop(command.data.conn, None)
            if isinstance(command, tls.TlsFailedServerHook):
                self._mark_waiting(command.data.conn, UpstreamFailure("tls"))
        elif isinstance(command, tcp.TcpStartHook | websocket.WebsocketStartHook):
            c.to(TUNNEL, now)

    # ------------------------------------------------------------------ enforcement

    def _enforce(self, now: float) -> layer.CommandGenerator[None]:
        self._dirty, self._due = False, float("inf")
        if self._closed:
            return
        limits = self.owner.limits()
        if limits is None:
            return
        client_due, _ = self.client.deadline(limits)
        upstream_due = self.upstream.deadline(limits)
        # most calls find nothing run out: the deadlines say so without walking the waits
        if (client_due is not None and now >= client_due) or self.client.head_over(limits):
            key = self.client.expired(now, limits)
            if key is not None:
                self._closed = True
                self.owner.hit(key, f"closed client connection {_peer(self.context.client)} "
                                    f"({self.client.phase}): limits.{key} = "
                                    f"{getattr(limits, key)}")
                yield commands.CloseConnection(self.context.client)
                return
        if upstream_due is not None and now >= upstream_due:
            for key, what in list(self.upstream.expired(now, limits)):
                yield from self._give_up_upstream(key, what, limits)
            upstream_due = self.upstream.deadline(limits)
        deadline = (upstream_due if client_due is None else client_due if upstream_due is None
                    else min(client_due, upstream_due))
        if deadline is not None:
            self._due = deadline
        if deadline is not None and not any(t <= deadline for t in self._wakeups.values()):
            wakeup = commands.RequestWakeup(max(deadline - now, 0.0) + 0.01)
            self._wakeups[wakeup] = deadline
            yield wakeup

    def _give_up_upstream(self, key: str, what: Any, limits: Limits
                          ) -> layer.CommandGenerator[None]:
        seconds = getattr(limits, key)
        if isinstance(what, http.HTTPFlow):
            flows, server = [what], self._server_of(what)
        else:
            server = what
            flows = [f for f in self.upstream.first_byte if self._server_of(f) is server]
        for flow in flows:
            flow.metadata.setdefault(UPSTREAM_FAILURE, UpstreamFailure("timeout", key, seconds))
            self.upstream.flow_done(flow)
        if server is not None:
            self.upstream.closed(server)
        target = server.address if server is not None else what.request.host
        self.owner.hit(key, f"gave up on {target}: limits.{key} = {seconds}")
        if server is not None and server in self.servers:
            yield commands.CloseConnection(server)

    def _mark_waiting(self, server: connection.Server, failure: UpstreamFailure,
                      streaming: bool = False) -> None:
        waiting = list(self.upstream.first_byte)
        if streaming:
            waiting += [f for f in self.upstream.streaming if f.server_conn is server]
        for flow in waiting:
            if self._server_of(flow) is server:
                flow.metadata.setdefault(UPSTREAM_FAILURE, failure)

    def _server_of(self, flow: http.HTTPFlow) -> connection.Server | None:
        """The provider connection a flow waits on: its own, or the one being opened for it."""
        if flow.server_conn in self.servers:
            return flow.server_conn
        want = (flow.request.host, flow.request.port)
        return next((s for s, opened_for in self.servers.items() if opened_for == want), None)


def _peer(client: connection.Client) -> str:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else "?"


class ConnectionLimits:
    """The mitmproxy addon: connection counts, and a Guard on every client connection."""

    def __init__(self, owner: GateHolder) -> None:
        self.owner = owner
        self.open: dict[str, int] = defaultdict(int)  # client address -> connections open
        self.total = 0
        self._guarded: set[str] = set()  # client connection ids

    def limits(self) -> Limits | None:
        gate = self.owner.gate
        return gate.bundle.config.limits if gate is not None else None

    def hit(self, key: str, message: str) -> None:
        log.warning("%s", message)
        gate = self.owner.gate
        if gate is not None and gate.metrics:
            gate.metrics.limit_hits.labels(limit=key).inc()

    def client_connected(self, client: connection.Client) -> None:
        addr = client.peername[0] if client.peername else ""
        self.open[addr] += 1
        self.total += 1
        limits = self.limits()
        if limits is None:
            return
        if limits.max_connections is not None and self.total > limits.max_connections:
            client.error = "too many connections"
            self.hit("max_connections", f"refused a connection from {_peer(client)}: "
                                        f"limits.max_connections = {limits.max_connections}")
        elif (limits.max_connections_per_client is not None
              and self.open[addr] > limits.max_connections_per_client):
            client.error = "too many connections from this address"
            self.hit("max_connections_per_client",
                     f"refused a connection from {_peer(client)}: limits."
                     f"max_connections_per_client = {limits.max_connections_per_client}")

    def client_disconnected(self, client: connection.Client) -> None:
        addr = client.peername[0] if client.peername else ""
        self.total -= 1
        self.open[addr] -= 1
        if self.open[addr] <= 0:
            del self.open[addr]
        self._guarded.discard(client.id)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The first layer mitmproxy picks for a connection is its top: guard it."""
        upstream.install(nextlayer.layer, self.limits, self.hit)
        client = nextlayer.context.client
        if (nextlayer.layer is None or client.id in self._guarded
                or client.transport_protocol != "tcp"):
            return
        self._guarded.add(client.id)
        nextlayer.layer = Guard(nextlayer.layer, self)
