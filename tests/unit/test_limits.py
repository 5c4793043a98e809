"""The clocks behind the connection limits (proxy/limits.py), table by table, and the
limits' documentation: every `limits.*` key is in docs/deploy.md with its default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from residency_gate.catalog.config import DEFAULTS, Limits
from residency_gate.proxy.limits import (
    ACTIVE,
    HANDSHAKE,
    IDLE,
    TUNNEL,
    WAIT_HEAD,
    ClientClock,
    UpstreamClock,
)

LIMITS = Limits(**{**DEFAULTS["limits"], "client_header_seconds": 10,
                   "client_handshake_seconds": 5, "client_idle_seconds": 60,
                   "client_body_seconds": 30, "client_body_min_rate": 1000,
                   "max_header_bytes": 1000})
DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def test_a_new_connection_must_send_a_whole_head_in_time_however_it_trickles():
    c = ClientClock(since=0.0)
    for t in range(1, 10):
        c.data(1, float(t))  # a byte a second: no extension
        assert c.expired(float(t), LIMITS) is None
    assert c.expired(10.0, LIMITS) == "client_header_seconds"
    assert c.deadline(LIMITS) == (10.0, "client_header_seconds")


def test_head_size_is_checked_while_reading():
    c = ClientClock(since=0.0)
    c.data(999, 1.0)
    assert c.expired(1.0, LIMITS) is None
    c.data(2, 1.1)
    assert c.expired(1.1, LIMITS) == "max_header_bytes"


def test_connect_then_handshake_then_head():
    c = ClientClock(since=0.0)
    c.to(HANDSHAKE, 2.0)  # CONNECT head arrived
    assert c.expired(6.9, LIMITS) is None and c.expired(7.0, LIMITS) == "client_handshake_seconds"
    c.to(WAIT_HEAD, 6.0)  # TLS established
    assert c.expired(15.9, LIMITS) is None and c.expired(16.0, LIMITS) == "client_header_seconds"


def test_a_body_must_keep_up_the_minimum_rate():
    c = ClientClock(since=0.0)
    c.head_done("f", 1.0)
    assert c.phase == ACTIVE and c.deadline(LIMITS) == (31.0, "client_body_seconds")
    c.data(5000, 20.0)  # 5 s more
    assert c.expired(35.9, LIMITS) is None and c.expired(36.0, LIMITS) == "client_body_seconds"
    c.body_done("f")  # complete: waiting for the provider is not the client's time
    assert c.deadline(LIMITS) == (None, "") and c.expired(10_000.0, LIMITS) is None


def test_keepalive_idle_then_the_next_head():
    c = ClientClock(since=0.0)
    c.head_done("f", 1.0)
    c.body_done("f")
    c.flow_done("f", 2.0)
    assert c.phase == IDLE and c.expired(61.9, LIMITS) is None
    assert c.expired(62.0, LIMITS) == "client_idle_seconds"
    c.data(10, 50.0)  # the next request starts: its head has 10 s from its first byte
    assert c.deadline(LIMITS) == (60.0, "client_header_seconds")


def test_http2_requests_keep_the_connection_active_until_the_last_is_done():
    c = ClientClock(since=0.0)
    c.head_done("a", 1.0)
    c.head_done("b", 1.0)
    c.flow_done("a", 2.0)
    assert c.phase == ACTIVE
    c.flow_done("b", 3.0)
    assert c.phase == IDLE


def test_http2_frames_on_an_idle_connection_start_no_head():
    c = ClientClock(since=0.0)
    c.to(IDLE, 1.0)
    c.data(17, 30.0, http2=True)  # a PING
    assert c.phase == IDLE and c.deadline(LIMITS) == (61.0, "client_idle_seconds")


def test_a_tunnel_is_not_timed_here():
    c = ClientClock(since=0.0)
    c.to(TUNNEL, 1.0)
    c.to(WAIT_HEAD, 2.0)  # nothing brings a tunnel back
    assert c.phase == TUNNEL and c.expired(1e9, LIMITS) is None


class Conn:  # stands in for connection.Server in the upstream clock's tables
    pass


class Flow:
    def __init__(self, server: Conn) -> None:
        self.server_conn = server


def test_upstream_waits_each_expire_at_their_limit():
    u = UpstreamClock()
    s1, s2 = Conn(), Conn()
    f = Flow(s1)
    u.connecting[s1] = 0.0
    u.handshaking[s2] = 0.0
    u.first_byte[f] = 0.0
    assert u.deadline(LIMITS) == LIMITS.upstream_connect_seconds
    expired = dict((k, v) for k, v in u.expired(1e6, LIMITS))
    assert expired == {"upstream_connect_seconds": s1, "upstream_tls_seconds": s2,
                       "upstream_first_byte_seconds": f}


def test_a_stream_that_keeps_sending_never_expires():
    u = UpstreamClock()
    s = Conn()
    f = Flow(s)
    u.streaming[f] = 0.0
    idle = LIMITS.upstream_idle_seconds
    for t in range(1, 2000):  # a chunk every second for half an hour
        u.server_data(s, float(t))
        assert not list(u.expired(float(t) + idle - 1, LIMITS))
    assert list(u.expired(1999 + idle, LIMITS)) == [("upstream_idle_seconds", f)]
    u.flow_done(f)
    assert u.deadline(LIMITS) is None


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(Limits)])
def test_every_limit_is_documented_with_its_default(key):
    text = DEPLOY.read_text()
    row = next((line for line in text.splitlines() if line.startswith(f"| `limits.{key}`")),
               None)
    assert row, f"docs/deploy.md has no row for limits.{key}"
    default = DEFAULTS["limits"][key]
    shown = re.findall(r"`([^`]*)`", row)[1]
    want = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
    assert shown in want, (row, default)
    assert "residency_gate_" in row, f"limits.{key}: no metric named"
