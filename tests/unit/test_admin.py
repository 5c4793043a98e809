"""The admin listener: /healthz, /readyz, /metrics, and robustness against bad clients."""

from __future__ import annotations

import asyncio
import json

from prometheus_client import CollectorRegistry, Counter

from residency_gate.ops.admin import AdminServer


async def raw(port: int, data: bytes, *, half_close: bool = True, timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    return parse(await raw(port, req, half_close=False))


def serve(checks=lambda: {"catalog": True, "audit": True}, registry=None, **kw):
    if registry is None:
        registry = CollectorRegistry()
        Counter("demo_total", "Demo.", registry=registry).inc(3)
    return AdminServer("127.0.0.1", 0, registry, checks, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_port_zero_gets_a_real_port_and_healthz_answers():
    async def main():
        async with serve() as srv:
            assert srv.port != 0
            status, headers, body = await get(srv.port, "/healthz")
            assert status == 200 and body == b"ok\n"
            assert headers["content-length"] == "3"
            assert headers["connection"] == "close"

    run(main())


def test_readyz_all_pass_is_200_with_checks():
    async def main():
        async with serve() as srv:
            status, headers, body = await get(srv.port, "/readyz")
            assert status == 200
            assert headers["content-type"] == "application/json"
            assert json.loads(body) == {"ready": True, "checks": {"catalog": True, "audit": True}}

    run(main())


def test_readyz_failing_is_503_naming_the_failures():
    state = {"catalog": True, "audit": "audit dir /x not writable"}

    async def main():
        async with serve(lambda: dict(state)) as srv:
            status, _, body = await get(srv.port, "/readyz")
            doc = json.loads(body)
            assert status == 503
            assert doc["ready"] is False
            assert doc["failing"] == {"audit": "audit dir /x not writable"}
            state["audit"] = True  # recovers: evaluated per request
            status, _, _ = await get(srv.port, "/readyz")
            assert status == 200
            state["catalog"] = False
            status, _, body = await get(srv.port, "/readyz")
            assert status == 503 and json.loads(body)["failing"] == {"catalog": False}

    run(main())


def test_readyz_check_raising_or_async():
    def boom():
        raise RuntimeError("catalog not loaded yet")

    async def async_checks():
        return {"catalog": True}

    async def main():
        async with serve(boom) as srv:
            status, _, body = await get(srv.port, "/readyz")
            assert status == 503
            assert "catalog not loaded yet" in json.loads(body)["failing"]["ready_checks"]
        async with serve(async_checks) as srv:
            status, _, _ = await get(srv.port, "/readyz")
            assert status == 200

    run(main())


def test_metrics_is_prometheus_text():
    async def main():
        async with serve() as srv:
            status, headers, body = await get(srv.port, "/metrics?x=1")
            assert status == 200
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            assert b"# TYPE demo_total counter\ndemo_total 3.0\n" in body
            assert int(headers["content-length"]) == len(body)

    run(main())


def test_head_has_no_body_unknown_is_404_post_is_405():
    async def main():
        async with serve() as srv:
            status, headers, body = await get(srv.port, "/healthz", "HEAD")
            assert status == 200 and body == b"" and headers["content-length"] == "3"
            status, _, _ = await get(srv.port, "/nope")
            assert status == 404
            status, _, _ = await get(srv.port, "/")
            assert status == 404
            status, headers, _ = await get(srv.port, "/metrics", "POST")
            assert status == 405 and headers["allow"] == "GET, HEAD"

    run(main())


def test_bare_lf_http10_and_absolute_form():
    async def main():
        async with serve() as srv:
            status, _, body = parse(await raw(srv.port, b"GET /healthz HTTP/1.0\n\n"))
            assert status == 200 and body == b"ok\n"
            req = b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            status, _, _ = parse(await raw(srv.port, req))
            assert status == 200

    run(main())


def test_garbage_oversize_slow_and_silent_clients_do_not_hurt():
    async def main():
        async with serve(read_timeout=0.3) as srv:
            port = srv.port
            status, _, _ = parse(await raw(port, b"\x00\xff\xfe garbage\r\n\r\n"))
            assert status == 400
            status, _, _ = parse(await raw(port, b"GET /healthz HTTP/2.0\r\n\r\n"))
            assert status == 505
            status, _, _ = parse(await raw(port, b"GET /healthz\r\n\r\n"))
            assert status == 400
            big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
            resp = await raw(port, big)
            assert parse(resp)[0] == 431
            many = b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 3000 + b"\r\n"
            assert parse(await raw(port, many))[0] == 431
            # incomplete head then EOF
            status, _, _ = parse(await raw(port, b"GET /healthz HTTP/1.1\r\nHost:"))
            assert status == 400
            # connect and close without a byte: nothing to answer
            assert await raw(port, b"") == b""
            # a slow client that never finishes its head is cut off
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /heal")
            await writer.drain()
            resp = await asyncio.wait_for(reader.read(), 3)
            writer.close()
            assert parse(resp)[0] == 408
            # still serving
            status, _, _ = await get(port, "/healthz")
            assert status == 200

    run(main())


def test_connection_limit_and_stop_closes_idle_connections():
    async def main():
        srv = serve(read_timeout=30, max_connections=2)
        await srv.start()
        port = srv.port
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        # over the limit: closed without an answer (EOF or reset)
        try:
            assert await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
        except ConnectionResetError:
            pass
        await asyncio.wait_for(srv.stop(), 5)
        for reader, writer in idle:
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
        try:
            await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            pass
        else:  # pragma: no cover
            raise AssertionError("still listening after stop()")
        await srv.stop()  # idempotent

    run(main())


def test_metrics_render_error_is_500_and_server_survives():
    class Broken:
        def collect(self):
            raise RuntimeError("bad registry")

    async def main():
        async with serve(registry=Broken()) as srv:
            status, _, _ = await get(srv.port, "/metrics")
            assert status == 500
            status, _, _ = await get(srv.port, "/healthz")
            assert status == 200

    run(main())


def test_healthz_fails_when_the_live_checks_do():
    """A gate that can no longer serve (audit log failed for good) says so on /healthz."""
    state = {"audit": True}

    async def main():
        async with serve(live_checks=lambda: dict(state)) as srv:
            assert (await get(srv.port, "/healthz"))[::2] == (200, b"ok\n")
            state["audit"] = "the audit log failed for good"
            status, headers, body = await get(srv.port, "/healthz")
            assert status == 503 and headers["content-type"] == "application/json"
            assert json.loads(body)["failing"] == {"audit": "the audit log failed for good"}

    run(main())
