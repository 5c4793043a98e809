"""Hand-made HTTP through a proxy, for what the SDKs cannot express: a CONNECT
tunnel whose TLS and Host header the test controls (domain fronting, checking
which certificate a tunnelled site presents), compressed or broken bodies."""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


def connect_tunnel(proxy_host: str, proxy_port: int, host: str, port: int = 443, timeout: float = 15.0) -> socket.socket:
    """Open a CONNECT tunnel through an HTTP proxy; raise if the proxy refuses."""
    sock = socket.create_connection((proxy_host, proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise ConnectionError(f"proxy closed the connection during CONNECT {host}: {data!r}")
        data += chunk
    status_line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        sock.close()
        raise ConnectionError(f"CONNECT {host}:{port} refused: {status_line}")
    return sock


def request_over(
    tls: ssl.SSLSocket,
    method: str,
    path: str,
    host_header: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Send one HTTP/1.1 request over an established (TLS) connection and read the answer."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}", "Connection: close"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    resp = http.client.HTTPResponse(tls, method=method)  # type: ignore[arg-type]
    resp.begin()
    data = resp.read()
    return RawResponse(resp.status, list(resp.getheaders()), data)


def tunnel_request(
    proxy_host: str,
    proxy_port: int,
    *,
    connect_host: str,
    connect_port: int = 443,
    ssl_context: ssl.SSLContext,
    sni: str | None = None,
    method: str = "POST",
    path: str = "/",
    host_header: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """CONNECT connect_host, TLS with ``sni`` (default: connect_host), then one request."""
    sock = connect_tunnel(proxy_host, proxy_port, connect_host, connect_port)
    try:
        with ssl_context.wrap_socket(sock, server_hostname=sni or connect_host) as tls:
            return request_over(tls, method, path, host_header or connect_host, headers, body)
    finally:
        sock.close()
