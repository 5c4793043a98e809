"""The admin listener: /healthz, /readyz and Prometheus /metrics on asyncio streams.

One request per connection, GET and HEAD only. A bounded request head, a read timeout
and a cap on concurrent connections limit what a bad client costs; an error serving one
closes its connection only, nothing propagates into the event loop. ``ready_checks()``
(plain or coroutine function) returns ``{name: True | False | "reason"}``; /readyz is
503 naming the failing checks. ``live_checks()``, when given, does the same for /healthz:
a gate that can no longer serve at all (its audit log failed for good) says so there, so
an orchestrator restarts it; without it /healthz is 200 while the process answers. ``reuse_port=False`` is explicit: worker processes make
SO_REUSEPORT the default (workers.py), and an admin port must never be shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

__all__ = ["AdminServer"]

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # request line + headers
MAX_CONNECTIONS = 64
READ_TIMEOUT = WRITE_TIMEOUT = CHECK_TIMEOUT = 5.0  # seconds (read: the whole head)

Checks = dict[str, bool | str]
Response = tuple[int, str, str, dict[str, str]]  # status, body, content type, extra headers


def _text(status: int, body: str, **headers: str) -> Response:
    return status, body + "\n", "text/plain; charset=utf-8", headers


class _Refuse(Exception):
    """_Refuse(response): the request is answered with it, not routed."""


class AdminServer:
    def __init__(self, host: str, port: int, registry: Collector,
                 ready_checks: Callable[[], Checks | Awaitable[Checks]], *,
                 live_checks: Callable[[], Checks | Awaitable[Checks]] | None = None,
                 read_timeout: float = READ_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.host, self._requested_port = host, port
        self.registry, self.ready_checks = registry, ready_checks
        self.live_checks = live_checks
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        """The port actually listened on (the requested one until started)."""
        socks = self._server.sockets if self._server is not None else ()
        return socks[0].getsockname()[1] if socks else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{self.port}"

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.host or None, self._requested_port,
                limit=MAX_REQUEST_HEAD, reuse_address=True, reuse_port=False)

    async def stop(self) -> None:
        """Stop listening and close every client connection (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in self._clients:
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients, timeout=2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= self.max_connections:
            writer.close()  # over the cap: closed without an answer
            return
        self._clients.add(task)
        method = "GET"
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    method, path = await _read_request(reader)
                status, body, ctype, extra = await self._route(method, path)
            except TimeoutError:
                status, body, ctype, extra = _text(408, "request timeout")
            except _Refuse as e:
                status, body, ctype, extra = e.args[0]
            payload = body.encode()
            head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {ctype}",
                    f"Content-Length: {len(payload)}", "Cache-Control: no-store",
                    "Connection: close", *(f"{k}: {v}" for k, v in extra.items())]
            writer.write("\r\n".join(head).encode() + b"\r\n\r\n"
                         + (b"" if method == "HEAD" else payload))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left, or stop(): a leaf task ends quietly
        except Exception:
            log.debug("admin listener: error serving a client", exc_info=True)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _route(self, method: str, path: str) -> Response:
        path = path.rstrip("/") or path
        if path not in ("/healthz", "/readyz", "/metrics"):
            return _text(404, "not found")
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed", Allow="GET, HEAD")
        try:
            if path == "/metrics":
                return 200, generate_latest(self.registry).decode(), CONTENT_TYPE_PLAIN_0_0_4, {}
            if path == "/readyz":
                return await self._checks(self.ready_checks, "ready")
            if self.live_checks is not None:
                failing = await self._checks(self.live_checks, "live")
                if failing[0] != 200:
                    return failing
            return _text(200, "ok")
        except Exception as e:
            log.warning("admin listener: %s failed: %s", path, e)
            return _text(500, "internal error")

    async def _checks(self, checks_of: Callable[[], Checks | Awaitable[Checks]],
                      name: str) -> Response:
        try:
            result = checks_of()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, CHECK_TIMEOUT)
            checks = {str(k): v if isinstance(v, bool | str) else bool(v)
                      for k, v in dict(result).items()}
        except Exception as e:
            checks = {f"{name}_checks": f"error: {type(e).__name__}: {e}"}
        failing = {k: v for k, v in checks.items() if v is not True}
        doc = {name: not failing, **({"failing": failing} if failing else {}), "checks": checks}
        body = json.dumps(doc, sort_keys=True) + "\n"
        return 503 if failing else 200, body, "application/json", {}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(METHOD, path) from the request head (CRLF or bare LF); headers are ignored."""
    head = b""
    while not re.search(rb"\n\r?\n", head):  # a body after the head is ignored
        chunk = await reader.read(MAX_REQUEST_HEAD + 1 - len(head))
        if not chunk:  # EOF before the end of the head
            if not head:
                raise ConnectionResetError("closed without a request")
            raise _Refuse(_text(400, "incomplete request"))
        head = (head + chunk).lstrip(b"\r\n")  # RFC 9112 2.2: skip empty lines before it
        if len(head) > MAX_REQUEST_HEAD:
            raise _Refuse(_text(431, "request head too large"))
    try:
        method, target, version = head.split(b"\n", 1)[0].rstrip(b"\r").decode("ascii").split(" ")
    except ValueError:  # also UnicodeDecodeError
        raise _Refuse(_text(400, "bad request line")) from None
    if not method.isalpha():
        raise _Refuse(_text(400, "bad request line"))
    if not version.startswith("HTTP/1."):
        raise _Refuse(_text(505, "HTTP/1.x only"))
    if target.startswith(("http://", "https://")):  # absolute-form
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return method.upper(), target.split("?", 1)[0].split("#", 1)[0]
