"""The admin listener: /healthz, /readyz and Prometheus /metrics.

A deliberately small HTTP/1.1 server on asyncio streams (no extra dependency).
One request per connection (``Connection: close``), GET and HEAD only, bounded
request size, per-connection timeouts and a cap on concurrent connections. Any
error while serving a client is logged at debug level and the connection is
closed; nothing propagates into the event loop.

``ready_checks()`` returns ``{name: value}``. A check passes when its value is
``True``; ``False`` or a string (the reason) means it fails. It may also be a
coroutine function. /readyz answers 200 with every check when all pass, else
503 naming the failing ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

__all__ = ["AdminServer"]

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 8192  # request line + headers
MAX_CONNECTIONS = 64
READ_TIMEOUT = 5.0  # whole request head must arrive within this
WRITE_TIMEOUT = 5.0
CHECK_TIMEOUT = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminServer:
    def __init__(
        self,
        host: str,
        port: int,
        registry: Any,
        ready_checks: Callable[[], dict[str, bool | str]],
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.registry = registry
        self.ready_checks = ready_checks
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    # lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually listened on (the requested one until started)."""
        if self._server is not None and self._server.sockets:
            return self._server.sockets[0].getsockname()[1]
        return self._requested_port

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle,
            host=self.host or None,
            port=self._requested_port,
            limit=MAX_REQUEST_HEAD,
            reuse_address=True,
        )
        log.debug("admin listener on %s", self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2.0)

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # serving -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= self.max_connections:
            with contextlib.suppress(Exception):
                writer.close()
            return
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(self.read_timeout):
                    method, path = await self._read_head(reader)
            except TimeoutError:
                await self._send(writer, 408, "request timeout\n", head_only=False)
                return
            except _BadRequest as e:
                await self._send(writer, e.status, f"{e}\n", head_only=False)
                return
            status, body, ctype, extra = await self._route(method, path)
            await self._send(writer, status, body, ctype, extra, head_only=method == "HEAD")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # a leaf task: end quietly (re-raising makes asyncio log the cancelled
            # connection callback as an error on some Python versions)
            pass
        except Exception:  # never into the loop
            log.debug("admin listener: error serving a client", exc_info=True)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        """Read the request line and headers (CRLF or bare LF); headers are ignored."""
        lines: list[bytes] = []
        size = 0
        while True:
            try:
                raw = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                raise _BadRequest(431, "request head too large") from None
            size += len(raw)
            if size > MAX_REQUEST_HEAD:
                raise _BadRequest(431, "request head too large")
            if not raw.endswith(b"\n"):  # EOF before the end of the head
                if not lines and not raw:
                    raise ConnectionResetError("client closed")
                raise _BadRequest(400, "incomplete request")
            if raw in (b"\r\n", b"\n"):
                if lines:
                    break
                continue  # tolerate leading empty lines (RFC 9112 2.2)
            lines.append(raw)
        line = lines[0].rstrip(b"\r\n")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise _BadRequest(400, "bad request line") from None
        parts = text.split(" ")
        if len(parts) != 3 or not parts[0].isalpha():
            raise _BadRequest(400, "bad request line")
        method, target, version = parts
        if not version.startswith("HTTP/1."):
            raise _BadRequest(505, "HTTP/1.x only")
        if target.startswith(("http://", "https://")):  # absolute-form
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        path = target.split("?", 1)[0].split("#", 1)[0]
        return method.upper(), path

    async def _route(self, method: str, path: str) -> tuple[int, str, str, dict[str, str]]:
        routes = {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}
        handler = routes.get(path.rstrip("/") or path)
        if handler is None:
            return 404, "not found\n", "text/plain; charset=utf-8", {}
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"}
        try:
            status, body, ctype = await handler()
        except Exception as e:
            log.warning("admin listener: %s failed: %s", path, e)
            return 500, "internal error\n", "text/plain; charset=utf-8", {}
        return status, body, ctype, {}

    async def _healthz(self) -> tuple[int, str, str]:
        return 200, "ok\n", "text/plain; charset=utf-8"

    async def _readyz(self) -> tuple[int, str, str]:
        try:
            result = self.ready_checks()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, CHECK_TIMEOUT)
            checks = {str(k): _check_value(v) for k, v in dict(result).items()}
        except Exception as e:
            checks = {"ready_checks": f"error: {type(e).__name__}: {e}"}
        failing = {k: v for k, v in checks.items() if v is not True}
        if failing:
            body = {"ready": False, "failing": failing, "checks": checks}
            status = 503
        else:
            body = {"ready": True, "checks": checks}
            status = 200
        return status, json.dumps(body, sort_keys=True) + "\n", "application/json"

    async def _metrics(self) -> tuple[int, str, str]:
        return 200, generate_latest(self.registry).decode(), CONTENT_TYPE_PLAIN_0_0_4

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: str,
        ctype: str = "text/plain; charset=utf-8",
        extra: dict[str, str] | None = None,
        *,
        head_only: bool,
    ) -> None:
        payload = body.encode("utf-8")
        headers = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(payload)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        headers += [f"{k}: {v}" for k, v in (extra or {}).items()]
        data = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")
        if not head_only:
            data += payload
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)


def _check_value(v: object) -> bool | str:
    if v is True or v is False:
        return v
    if isinstance(v, str):
        return v
    return bool(v)
