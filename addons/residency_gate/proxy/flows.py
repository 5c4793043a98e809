"""Flow <-> request: what the core sees of a mitmproxy flow, and how a decision is applied
back onto it (tag header removed, route rewritten)."""

from __future__ import annotations

import hashlib
import os

from mitmproxy import http

from ..audit.record import BodyDigest
from ..catalog.config import Limits
from ..core.admission import Destination, is_ip
from ..core.request import Request
from ..core.reroute import Route, apply_body_fields
from ..core.sigv4 import is_signed, signed_headers
from . import decoding
from .connections import NAMED_TARGET_MODES


def destination_of(flow: http.HTTPFlow) -> Destination:
    """What the connection goes to, and the names the request uses for it."""
    req = flow.request
    return Destination.of(req.host, req.host_header, flow.client_conn.sni, req.scheme, req.port,
                          req.path)


def connect_by_name(flow: http.HTTPFlow, host: str) -> None:
    """An IP-literal CONNECT target decided by the LLM name in its Host header (checked to
    resolve to that address): connect to the name, so the upstream TLS carries that SNI and
    its certificate is checked for it, and a connection opened for one name is never reused
    for another. The Host header stays as the client sent it."""
    r = flow.request
    if is_ip(r.host) and isinstance(flow.client_conn.proxy_mode, NAMED_TARGET_MODES):
        host_header = r.host_header
        r.host = host
        r.host_header = host_header


def client_of(flow: http.HTTPFlow) -> tuple[str | None, str | None]:
    """(client address, proxy-auth user)."""
    peer = flow.client_conn.peername
    return (peer[0] if peer else None), (flow.metadata.get("proxyauth") or (None,))[0]


def request_of(flow: http.HTTPFlow, host: str, header: str, body: bytes | None = None,
               body_error: str | None = None) -> Request:
    """The request as it will leave: `host` is the checked destination."""
    r = flow.request
    client, user = client_of(flow)
    return Request(method=r.method, scheme=r.scheme, host=host, port=r.port, path=r.path,
                   tag_values=tuple(r.headers.get_all(header)), body=body, client_ip=client,
                   user=user, body_error=body_error,
                   signed=is_signed(r.headers.get("authorization", ""), r.path))


def read_body(flow: http.HTTPFlow, limits: Limits) -> tuple[bytes | None, str | None,
                                                            BodyDigest]:
    """Decoded body (or the raw one with the reason it cannot be decoded), and its digest.

    Decoding is bounded (`decoding.decode`): a body that would decode beyond
    `limits.request_body_decoded_bytes`, or beyond `request_body_ratio` times its size once
    past RATIO_FLOOR, raises decoding.TooLarge before it is held in memory."""
    raw = flow.request.raw_content or b""
    limit, key = limits.request_body_decoded_bytes, "limits.request_body_decoded_bytes"
    by_ratio = max(Limits.RATIO_FLOOR, limits.request_body_ratio * len(raw))
    if by_ratio < limit:
        limit, key = by_ratio, "limits.request_body_ratio"
    encoding = flow.request.headers.get("content-encoding")
    error = None
    try:
        body: bytes | None = decoding.decode(raw, encoding, limit, key)
    except decoding.Undecodable as e:
        body = flow.request.raw_content
        error = f"body cannot be decoded (Content-Encoding: {encoding}: {e})"
    data = body or b""
    return body, error, BodyDigest(hashlib.sha256(data).hexdigest(), len(data))


def strip_tag(flow: http.HTTPFlow, header: str, signed: bool | None = None) -> None:
    """The tag is ours, not the provider's, unless the request's signature covers it.
    `signed`: whether the request is SigV4-signed, when already known (False: no need to
    read which headers the signature covers)."""
    r = flow.request
    if header not in r.headers:
        return
    if signed is not False and header.lower() in signed_headers(
            r.headers.get("authorization", ""), r.path):
        return
    del r.headers[header]


class MissingKey(RuntimeError):
    """A route's key variable vanished after the policy was loaded."""


def apply_route(flow: http.HTTPFlow, route: Route) -> None:
    """Send the request where the plan says; its credential comes from the environment."""
    headers = flow.request.headers
    for name in route.remove_headers:
        headers.pop(name, None)
    if route.credential is not None:
        secret = os.environ.get(route.credential.env)
        if not secret:
            raise MissingKey(f"environment variable {route.credential.env} is not set")
        headers[route.credential.header] = route.credential.format.replace("{key}", secret)
    if route.body_fields:
        flow.request.content = apply_body_fields(flow.request.get_content(strict=True),
                                                 route.body_fields)
    flow.request.scheme = route.scheme
    flow.request.host = route.host
    flow.request.port = route.port
    flow.request.path = route.path
    default = 443 if route.scheme == "https" else 80
    flow.request.host_header = route.host if route.port == default else f"{route.host}:{route.port}"
