"""When the provider does not answer: the client hears it in the provider's own error shape.

mitmproxy answers a failed upstream request itself, from deep inside its HTTP layer,
with an HTML 502 page: no `X-Residency-*` headers, nothing an SDK can parse. The gate's
`error` hook (addon.py) prepares the answer it wants sent instead (`ANSWER` in the flow's
metadata: 502 or 504, in the API's error shape, with the decision's audit id); the
`GateHttpLayer` sends that answer where mitmproxy would send its page. mitmproxy builds
every HttpLayer; `install` swaps in this subclass from the `next_layer` hook, before the
layer has seen an event. It also refuses a request head with more than
`limits.max_header_count` fields or more than `limits.max_header_bytes` bytes (431)
before any hook sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.proxy import commands, layer
from mitmproxy.proxy.layers.http import (
    HttpLayer,
    HttpStream,
    RequestHeaders,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

from ..catalog.config import Limits

ANSWER = "residency_gate.upstream_answer"  # flow.metadata: the http.Response to send instead
UPSTREAM_FAILURE = "residency_gate.upstream_failure"  # flow.metadata: an UpstreamFailure

PROVIDER_KINDS = ("connect", "tls", "timeout", "reset")


@dataclass(frozen=True)
class UpstreamFailure:
    """Why a forwarded request got no (complete) answer (limits.Guard marks it; the first
    cause seen wins)."""

    kind: str  # connect | tls | timeout | reset
    limit: str | None = None  # the limits.* key, for a timeout
    seconds: float | None = None


def failure_of(flow: http.HTTPFlow) -> UpstreamFailure | None:
    """What went wrong with the provider for this flow (None: the client side, or unknown)."""
    return flow.metadata.get(UPSTREAM_FAILURE)


def error_kind(flow: http.HTTPFlow) -> str | None:
    """For the outcome record: connect, tls, timeout, reset; client; other."""
    if flow.error is None:
        return None
    failure = failure_of(flow)
    if failure is not None:
        return failure.kind
    return "client" if "client" in flow.error.msg.lower() else "other"


def head_too_large(request: http.Request, limits: Limits) -> str | None:
    """The limits key a parsed request head breaks, if any."""
    fields = request.headers.fields
    if len(fields) > limits.max_header_count:
        return "max_header_count"
    size = len(request.method) + len(request.path) + sum(len(k) + len(v) + 4 for k, v in fields)
    if size > limits.max_header_bytes:
        return "max_header_bytes"
    return None


class GateHttpLayer(HttpLayer):
    """mitmproxy's HttpLayer, answering upstream failures and oversized heads our way."""

    limits_of: Callable[[], Limits | None]
    on_limit: Callable[[str, str], None]

    def event_to_child(self, child: layer.Layer | HttpStream, event) -> layer.CommandGenerator[None]:
        client_conn = self.connections.get(self.context.client)
        if isinstance(event, ResponseProtocolError) and child is client_conn:
            stream = self.streams.get(event.stream_id)
            flow = getattr(stream, "flow", None)
            answer = flow.metadata.get(ANSWER) if flow is not None else None
            if answer is not None and flow.response is None:
                yield from self._respond(client_conn, event.stream_id, answer)
                return
        if isinstance(event, RequestHeaders) and isinstance(child, HttpStream):
            limits = self.limits_of()
            key = head_too_large(event.request, limits) if limits is not None else None
            if key is not None and client_conn is not None:
                self.streams.pop(event.stream_id, None)
                self.on_limit(key, f"refused a request head (431): limits.{key} = "
                                   f"{getattr(limits, key)}")
                yield from self._respond(client_conn, event.stream_id, http.Response.make(
                    431, f"Request header fields too large (limits.{key})\n",
                    {"Content-Type": "text/plain", "Connection": "close"}))
                yield commands.CloseConnection(self.context.client)
                return
        yield from super().event_to_child(child, event)

    def _respond(self, conn: layer.Layer, stream_id: int, response: http.Response
                 ) -> layer.CommandGenerator[None]:
        body = response.raw_content or b""
        yield from super().event_to_child(conn, ResponseHeaders(stream_id, response, not body))
        if body:
            yield from super().event_to_child(conn, ResponseData(stream_id, body))
        yield from super().event_to_child(conn, ResponseEndOfMessage(stream_id))


def install(top: layer.Layer | None, limits_of: Callable[[], Limits | None],
            on_limit: Callable[[str, str], None]) -> None:
    """Make every plain HttpLayer in a layer stack mitmproxy just built a GateHttpLayer.

    A class swap, not a copy: the layer is new (no event seen yet) and the subclass adds
    no state of its own, only the two functions it reads the limits and reports through."""
    lay = top
    while lay is not None:
        if type(lay) is HttpLayer:
            lay.__class__ = GateHttpLayer
            lay.limits_of = limits_of
            lay.on_limit = on_limit
        lay = getattr(lay, "child_layer", None)
