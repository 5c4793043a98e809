"""Local HTTPS servers standing in for the LLM providers in end-to-end tests.

One ``trustme`` CA issues one server certificate that names every provider host
the tests use (plus ``localhost`` and ``127.0.0.1``). A single threaded
HTTP/1.1 server with keep-alive answers for all of them on 127.0.0.1:<port>,
dispatching on the path (and on the Host header for the non-LLM site), and
records every request it receives so a test can assert what reached "the
provider" -- or that nothing did.

Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import re
import socket
import ssl
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import trustme

# Fixed AWS credentials used by the tests; the fake Bedrock verifies SigV4 with them.
AWS_ACCESS_KEY_ID = "AKIDEXAMPLE"
AWS_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

PLAIN_HOST = "plain.example.test"
PLAIN_PAGE = b"<html><body>plain.example.test: not an LLM</body></html>\n"
AI_APP_HOSTS = ("chatgpt.com", "claude.ai")  # consumer AI apps (catalog inventory.yaml)

HOSTS: tuple[str, ...] = (
    "api.openai.com",
    "eu.api.openai.com",
    "us.api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "europe-west3-aiplatform.googleapis.com",
    "europe-west4-aiplatform.googleapis.com",
    "us-central1-aiplatform.googleapis.com",
    "aiplatform.eu.rep.googleapis.com",
    "aiplatform.us.rep.googleapis.com",
    "bedrock-runtime.eu-central-1.amazonaws.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "myres-eu.openai.azure.com",
    "myres-global.openai.azure.com",
    "unknownres.openai.azure.com",
    "api.mistral.ai",
    "api.eu.mistral.ai",
    "onprem.llm.test",
    PLAIN_HOST,
    *AI_APP_HOSTS,
)
CERT_NAMES: tuple[str, ...] = (*HOSTS, "localhost", "127.0.0.1")

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SIGV4_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<signed>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]+)"
)
_BEDROCK_RE = re.compile(
    r"^/model/(?P<model>[^/]+)/(?P<op>converse|converse-stream|invoke|invoke-with-response-stream)$"
)
_GOOGLE_RE = re.compile(r"/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")
_AZURE_DEPLOYMENT_RE = re.compile(r"^/openai/deployments/(?P<deployment>[^/]+)/(?P<rest>.+)$")


def decode_body(body: bytes, encoding: str | None) -> bytes:
    """Undo a Content-Encoding (gzip/deflate); other encodings are returned as is."""
    enc = (encoding or "").strip().lower()
    if not body or enc in ("", "identity"):
        return body
    if enc in ("gzip", "x-gzip"):
        return gzip.decompress(body)
    if enc == "zstd":
        return zstd_raw_decode(body)
    if enc == "br":
        import brotli

        return brotli.decompress(body)
    if enc == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    return body


def zstd_raw_encode(data: bytes) -> bytes:
    """A valid zstd frame made of raw (stored) blocks: no zstd library needed."""
    out = bytearray(b"\x28\xb5\x2f\xfd")  # magic
    out.append(0xA0)  # single segment, 4-byte frame content size, no checksum, no dict
    out += struct.pack("<I", len(data))
    blocks = [data[i : i + 65536] for i in range(0, len(data), 65536)] or [b""]
    for i, block in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        out += struct.pack("<I", last | (len(block) << 3))[:3] + block
    return bytes(out)


def zstd_raw_decode(frame: bytes) -> bytes:
    """Decode what zstd_raw_encode produces (raw blocks only)."""
    if frame[:4] != b"\x28\xb5\x2f\xfd" or frame[4] != 0xA0:
        raise ValueError("not a raw-block zstd frame")
    pos, out = 9, bytearray()
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        size, kind = header >> 3, (header >> 1) & 3
        if kind != 0:
            raise ValueError("compressed zstd blocks are not supported by the fake provider")
        out += frame[pos + 3 : pos + 3 + size]
        pos += 3 + size
        if header & 1:
            return bytes(out)


@dataclass
class Recorded:
    """One request as the fake provider received it."""

    sni: str | None
    host: str  # Host header without port
    host_header: str  # Host header as received
    method: str
    path: str  # raw request target (path + query), as received
    headers: list[tuple[str, str]]
    body: bytes  # as received (possibly compressed)
    client: tuple[str, int]
    sigv4_valid: bool | None = None  # None: not a SigV4-signed request
    sigv4_signed_headers: tuple[str, ...] = ()
    t: float = field(default_factory=time.monotonic)

    @property
    def url_path(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None

    @property
    def decoded_body(self) -> bytes:
        return decode_body(self.body, self.header("content-encoding"))

    def json(self) -> Any:
        return json.loads(self.decoded_body or b"null")


def verify_sigv4(
    method: str,
    host_header: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    secret_key: str = AWS_SECRET_ACCESS_KEY,
    access_key: str = AWS_ACCESS_KEY_ID,
) -> tuple[bool, tuple[str, ...]]:
    """Recompute a SigV4 signature from a request as received.

    Returns (valid, signed header names). Uses botocore's own SigV4Auth, fed
    only the headers the signature claims to cover, with the timestamp, region
    and service taken from the request.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    auth = next((v for k, v in headers if k.lower() == "authorization"), "")
    m = _SIGV4_AUTH_RE.search(auth)
    if not m:
        return False, ()
    try:
        akid, date, region, service, terminator = m.group("cred").split("/")
    except ValueError:
        return False, ()
    signed = tuple(m.group("signed").split(";"))
    if akid != access_key or terminator != "aws4_request":
        return False, signed
    amz_date = next((v for k, v in headers if k.lower() == "x-amz-date"), "")
    if not amz_date.startswith(date):
        return False, signed
    if "host" not in signed:
        return False, signed
    req = AWSRequest(method=method, url=f"https://{host_header}{path}", data=body)
    present = set()
    for k, v in headers:
        if k.lower() in signed:
            req.headers[k] = v  # HTTPHeaders appends: repeated headers are kept
            present.add(k.lower())
    if present != set(signed):
        return False, signed  # a signed header went missing on the way
    req.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key), service, region)
    # headers_to_sign() drops a few names (user-agent, expect, ...) that a
    # client never signs; if the client claims to have signed them, honour that.
    canonical = signer.canonical_request(req)
    if signer.signed_headers(signer.headers_to_sign(req)) != ";".join(signed):
        return False, signed
    expected = signer.signature(signer.string_to_sign(req, canonical), req)
    return hmac.compare_digest(expected, m.group("sig")), signed


# ---------------------------------------------------------------------------
# response bodies shaped like the real providers'


def openai_chat(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def openai_chat_chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def openai_response(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1_700_000_000,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_fake",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 3,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 4,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 7,
        },
    }


def anthropic_message(model: str, text: str, inference_geo: str) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4, "inference_geo": inference_geo},
    }


def bedrock_converse(text: str) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7},
        "metrics": {"latencyMs": 1},
    }


def google_generate(model: str, text: str) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
        "modelVersion": model,
    }


def _eventstream_message(headers: dict[str, str], payload: bytes) -> bytes:
    """Encode one AWS event-stream message (for Bedrock *-stream operations)."""
    hb = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        hb += struct.pack("!B", len(n)) + n + b"\x07" + struct.pack("!H", len(v)) + v
    total = 12 + len(hb) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hb))
    prelude += struct.pack("!I", zlib.crc32(prelude) & 0xFFFFFFFF)
    msg = prelude + hb + payload
    return msg + struct.pack("!I", zlib.crc32(msg) & 0xFFFFFFFF)


# ---------------------------------------------------------------------------
# the server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakeprovider/1"
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    # -- request plumbing --------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The whole body, or None when the connection ended before it was complete (a
        provider never acts on half a request, so it is not recorded)."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    return None
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    return None
                out += chunk
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        return body if len(body) == length else None

    def _record(self, body: bytes) -> Recorded:
        host_header = self.headers.get("Host", "")
        host = host_header
        if host.startswith("["):
            host = host[1 : host.index("]")]
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        headers = [(k, v) for k, v in self.headers.items()]
        rec = Recorded(
            sni=getattr(self.connection, "fake_sni", None),
            host=host.lower(),
            host_header=host_header,
            method=self.command,
            path=self.path,
            headers=headers,
            body=body,
            client=self.client_address,
        )
        if any(k.lower() == "authorization" and v.startswith("AWS4-HMAC-SHA256") for k, v in headers):
            try:
                rec.sigv4_valid, rec.sigv4_signed_headers = verify_sigv4(
                    self.command, host_header, self.path, headers, body
                )
            except Exception:
                rec.sigv4_valid = False
        self.server.fake.add(rec)
        return rec

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", extra)

    def _start_chunked(self, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _sse(self, events: list[bytes], seconds: float = 0.0) -> None:
        """Send events; the first at once, the rest spread over ``seconds``."""
        self._start_chunked("text/event-stream")
        gap = seconds / max(len(events) - 1, 1) if seconds else 0.0
        for i, ev in enumerate(events):
            if i and gap:
                time.sleep(gap)
            self._chunk(ev)
        self._end_chunked()

    # -- verbs -------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is None:
            self.close_connection = True
            return
        rec = self._record(body)
        try:
            self._route(rec)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True

    def _route(self, rec: Recorded) -> None:
        path = rec.url_path
        text = f"hello from {rec.host}"
        if self.headers.get("X-Fake-Hang"):  # a provider that reads the request, never answers
            return self._hang()
        stall = self.headers.get("X-Fake-Stall-After")
        if stall:  # a stream that sends `stall` events, then falls silent
            self._start_chunked("text/event-stream")
            for i in range(int(stall)):
                self._chunk(f"data: {json.dumps({'i': i})}\n\n".encode())
            return self._hang()
        if rec.host == PLAIN_HOST:
            return self._send(200, PLAIN_PAGE, "text/html", {"X-Fake-Site": "plain"})
        if rec.host in AI_APP_HOSTS:
            return self._send(200, b"<html><body>an AI app</body></html>\n", "text/html",
                              {"X-Fake-Site": "ai-app"})
        if (self.headers.get("Upgrade") or "").lower() == "websocket":
            return self._websocket(rec)
        if path == "/slow":
            q = rec.query
            n = int(q.get("n", ["6"])[0])
            secs = float(q.get("seconds", ["3"])[0])
            events = [f"data: {json.dumps({'i': i})}\n\n".encode() for i in range(n)]
            return self._sse([*events, b"data: [DONE]\n\n"], secs)
        if path == "/big":
            return self._big(float(rec.query.get("mb", ["1"])[0]))
        if path.endswith("/models") and rec.method == "GET":
            return self._json({"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "fake"}]})

        try:
            payload = rec.json() if rec.body else {}
        except (ValueError, OSError, EOFError, zlib.error):
            return self._json(
                {"error": {"message": "fake provider: body is not JSON", "type": "invalid_request_error", "code": None}},
                400,
            )
        if not isinstance(payload, dict):
            payload = {}
        delay = float(self.headers.get("X-Fake-Stream-Seconds") or 0)
        n_events = int(self.headers.get("X-Fake-Stream-Events") or 4)

        m = _BEDROCK_RE.match(path)
        if m:
            return self._bedrock(unquote(m.group("model")), m.group("op"), payload, text)
        m = _GOOGLE_RE.search(path)
        if m:
            return self._google(m.group("model"), m.group("method"), text, delay, n_events)
        m = _AZURE_DEPLOYMENT_RE.match(path)
        if m:
            path = "/v1/" + m.group("rest")
            payload.setdefault("model", m.group("deployment"))
        if path.endswith("/chat/completions"):
            return self._openai_chat(payload, text, delay, n_events)
        if path.endswith("/responses"):
            return self._json(openai_response(payload.get("model", "gpt-4o"), text))
        if path.endswith("/v1/messages"):
            return self._anthropic(payload, text, delay, n_events)
        return self._json(
            {"error": {"message": f"fake provider: no route for {rec.method} {path}", "type": "not_found", "code": None}},
            404,
        )

    # -- providers ---------------------------------------------------------

    def _openai_chat(self, payload: dict[str, Any], text: str, delay: float, n: int) -> None:
        model = payload.get("model", "gpt-4o")
        if not payload.get("stream"):
            return self._json(openai_chat(model, text))
        events = [
            b"data: " + json.dumps(openai_chat_chunk(model, {"role": "assistant", "content": ""}, None)).encode() + b"\n\n"
        ]
        words = [f"{text} " if i == 0 else f"part{i} " for i in range(max(n - 1, 1))]
        for w in words:
            events.append(b"data: " + json.dumps(openai_chat_chunk(model, {"content": w}, None)).encode() + b"\n\n")
        events.append(b"data: " + json.dumps(openai_chat_chunk(model, {}, "stop")).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        self._sse(events, delay)

    def _anthropic(self, payload: dict[str, Any], text: str, delay: float, n: int) -> None:
        model = payload.get("model", "claude-opus-4-6")
        geo = payload.get("inference_geo") or "global"
        msg = anthropic_message(model, text, geo)
        if not payload.get("stream"):
            return self._json(msg)

        def ev(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        start = dict(
            msg, content=[], stop_reason=None, usage={"input_tokens": 3, "output_tokens": 0, "inference_geo": geo}
        )
        events = [
            ev("message_start", {"type": "message_start", "message": start}),
            ev("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ]
        for i in range(max(n - 1, 1)):
            piece = text if i == 0 else f" part{i}"
            events.append(
                ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})
            )
        events += [
            ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ev(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 4, "inference_geo": geo},
                },
            ),
            ev("message_stop", {"type": "message_stop"}),
        ]
        self._sse(events, delay)

    def _bedrock(self, model: str, op: str, payload: dict[str, Any], text: str) -> None:
        extra = {"x-amzn-RequestId": "fake-request-id"}
        if op == "converse":
            return self._json(bedrock_converse(text), extra=extra)
        if op == "invoke":
            return self._json(anthropic_message(model, text, "global"), extra=extra)
        if op == "converse-stream":
            self._start_chunked("application/vnd.amazon.eventstream", extra)
            events = [
                ("messageStart", {"role": "assistant"}),
                ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}}),
                ("contentBlockStop", {"contentBlockIndex": 0}),
                ("messageStop", {"stopReason": "end_turn"}),
                ("metadata", {"usage": {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7}, "metrics": {"latencyMs": 1}}),
            ]
            for name, data in events:
                self._chunk(
                    _eventstream_message(
                        {":event-type": name, ":content-type": "application/json", ":message-type": "event"},
                        json.dumps(data).encode(),
                    )
                )
            return self._end_chunked()
        # invoke-with-response-stream: one chunk event carrying the whole message
        self._start_chunked("application/vnd.amazon.eventstream", extra)
        inner = base64.b64encode(json.dumps(anthropic_message(model, text, "global")).encode()).decode()
        self._chunk(
            _eventstream_message(
                {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
                json.dumps({"bytes": inner}).encode(),
            )
        )
        self._end_chunked()

    def _google(self, model: str, method: str, text: str, delay: float, n: int) -> None:
        if method == "generateContent":
            return self._json(google_generate(model, text))
        if method == "streamGenerateContent":
            pieces = [text] + [f" part{i}" for i in range(1, max(n, 1))]
            events = []
            for i, p in enumerate(pieces):
                obj = google_generate(model, p)
                if i < len(pieces) - 1:
                    del obj["candidates"][0]["finishReason"]
                events.append(b"data: " + json.dumps(obj).encode() + b"\r\n\r\n")
            return self._sse(events, delay)
        if method == "countTokens":
            return self._json({"totalTokens": 3})
        return self._json({"error": {"code": 404, "message": f"no method {method}", "status": "NOT_FOUND"}}, 404)

    def _hang(self, limit: float = 120.0) -> None:
        """Say nothing more until the other side closes (or `limit` seconds pass)."""
        self.close_connection = True
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                if not self.connection.recv(1 << 16):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _big(self, mb: float) -> None:
        total = int(mb * 1024 * 1024)
        block = (bytes(range(256)) * 4096)[: 1024 * 1024]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(total))
        self.end_headers()
        sent = 0
        view = memoryview(block)
        while sent < total:
            n = min(len(block), total - sent)
            self.wfile.write(view[:n])
            sent += n

    # -- websocket (OpenAI Realtime) --------------------------------------

    def _websocket(self, rec: Recorded) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        self._ws_send(0x1, json.dumps({"type": "session.created", "host": rec.host}).encode())
        while True:
            frame = self._ws_recv()
            if frame is None:
                return
            opcode, data = frame
            if opcode == 0x8:  # close
                self._ws_send(0x8, data[:2] or struct.pack("!H", 1000))
                return
            if opcode == 0x9:  # ping
                self._ws_send(0xA, data)
            elif opcode in (0x1, 0x2):
                self._ws_send(opcode, data)  # echo

    def _ws_send(self, opcode: int, data: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(data)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + struct.pack("!H", n)
        else:
            head += bytes([127]) + struct.pack("!Q", n)
        self.wfile.write(head + data)
        self.wfile.flush()

    def _ws_recv(self) -> tuple[int, bytes] | None:
        try:
            b = self.rfile.read(2)
            if len(b) < 2:
                return None
            opcode = b[0] & 0x0F
            masked = b[1] & 0x80
            n = b[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if masked else b""
            data = self.rfile.read(n)
            if masked:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            return opcode, data
        except (OSError, struct.error):
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], ssl_ctx: ssl.SSLContext, fake: FakeProvider):
        self.ssl_ctx = ssl_ctx
        self.fake = fake
        super().__init__(addr, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS handshake in the per-connection thread, not in the accept loop.
        request.settimeout(30)
        try:
            tls = self.ssl_ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.fake.tls_failures += 1
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet
        pass


class FakeProvider:
    """The fake provider: start(), .port, .ca_pem, .requests, .reset(), stop()."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fakeprovider-")
            workdir = Path(self._tmp.name)
        self.workdir = Path(workdir)
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(*CERT_NAMES)
        self.ca_pem = self.workdir / "fake-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self.tls_connections: list[str | None] = []  # SNI of every TLS handshake
        self.tls_failures = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeProvider:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(ctx)
        ctx.set_alpn_protocols(["http/1.1"])

        def on_sni(sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
            with contextlib.suppress(AttributeError):
                sslobj.fake_sni = server_name
            with self._lock:
                self.tls_connections.append(server_name)

        ctx.sni_callback = on_sni
        self._server = _Server((host, port), ctx, self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakeprovider", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def addr(self) -> str:
        assert self._server is not None
        return f"{self._server.server_address[0]}:{self.port}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context trusting only the fake provider's CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    # -- recordings --

    def add(self, rec: Recorded) -> None:
        with self._lock:
            self._requests.append(rec)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self.tls_connections.clear()
            self.tls_failures = 0

    def received(self, host: str | None = None, path_prefix: str | None = None) -> list[Recorded]:
        out = self.requests
        if host is not None:
            out = [r for r in out if r.host == host.lower()]
        if path_prefix is not None:
            out = [r for r in out if r.url_path.startswith(path_prefix)]
        return out

    def wait_for(self, count: int = 1, timeout: float = 5.0, **filters: Any) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(**filters)
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # manual poking: python fakeprovider.py
    with FakeProvider() as fp:
        print(f"fake provider on https://localhost:{fp.port}  CA: {fp.ca_pem}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
