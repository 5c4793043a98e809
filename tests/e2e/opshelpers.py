"""Helpers for the operations e2e tests: a keep-alive client through the proxy,
the admin listener, Prometheus text parsing, audit files, waiting."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import TAG_HEADER, Proxy

CHAT = "/v1/chat/completions"


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
        return p
    raise RuntimeError("no two consecutive free ports")


# ---------------------------------------------------------------------------
# clients


class Reply:
    def __init__(self, resp: http.client.HTTPResponse, body: bytes) -> None:
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.body = body

    @property
    def decision(self) -> str | None:
        return self.headers.get("x-residency-decision")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.decision} {self.body[:200]!r}>"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class KeepAlive:
    """One TLS connection through the proxy's CONNECT tunnel, reused for every request.

    It never reconnects by itself (``auto_open = 0``): if the proxy dropped the
    connection, the next request fails instead of silently opening a new one.
    """

    def __init__(self, proxy: Proxy, host: str, *, proxy_auth: str | None = None) -> None:
        self.host = host
        self.conn = http.client.HTTPSConnection(
            proxy.host, proxy.port, context=proxy.ssl_context(), timeout=20)
        headers = {"Proxy-Authorization": proxy_auth} if proxy_auth else None
        self.conn.set_tunnel(host, 443, headers=headers)
        self.conn.connect()
        self.conn.auto_open = 0
        self.local = self.conn.sock.getsockname()

    def post(self, path: str = CHAT, body: dict[str, Any] | None = None,
             tag: str | None = None) -> Reply:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-key"}
        if tag is not None:
            headers[TAG_HEADER] = tag
        if path.startswith("/v1/messages"):
            headers["x-api-key"] = "sk-ant-test"
            headers["anthropic-version"] = "2023-06-01"
        payload = json.dumps(body if body is not None else {
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
        self.conn.request("POST", path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        reply = Reply(resp, data)
        assert self.conn.sock is not None, f"the proxy closed the connection after {reply}"
        assert self.conn.sock.getsockname() == self.local, "not the same connection"
        return reply

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------
# admin listener and metrics


def admin_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """Parsed Prometheus text: m.value(name, **labels), m.samples(name)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            labels = dict(_LABEL.findall(m.group(2) or ""))
            self._samples.append((m.group(1), labels, float(m.group(3))))

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, v) for n, labels, v in self._samples if n == name]

    def value(self, name: str, default: float | None = None, **labels: str) -> float:
        for n, lab, v in self._samples:
            if n == name and lab == labels:
                return v
        if default is not None:
            return default
        raise KeyError(f"no sample {name}{labels} in\n{self.text}")


def metrics(port: int) -> Metrics:
    status, _, body = admin_get(port, "/metrics")
    assert status == 200, body
    return Metrics(body.decode())


def reloads(port: int, result: str) -> float:
    return metrics(port).value("residency_gate_config_reloads_total", result=result)


def wait_reloads(port: int, result: str, count: float, timeout: float = 10.0) -> None:
    wait_for(lambda: reloads(port, result) >= count, timeout,
             what=f'residency_gate_config_reloads_total{{result="{result}"}} >= {count}')


# ---------------------------------------------------------------------------
# audit files


def audit_records(audit_dir: Path, origin: str | None = None) -> list[dict[str, Any]]:
    """Decision/outcome/... records of every chain file (not the checkpoint files)."""
    out = []
    for p in sorted(audit_dir.glob("*.jsonl")):
        if p.name.startswith("checkpoints-"):
            continue
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if origin is None or rec.get("origin") == origin:
                    out.append(rec)
    return out
