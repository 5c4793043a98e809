"""proxy.connections.Access on mitmproxy's own test connections and flows: who may
connect, where CONNECT may go, failing closed, and a log that outsiders cannot flood."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

from mitmproxy.test import tflow

from residency_gate.catalog.config import AccessConfig
from residency_gate.ops.metrics import Metrics
from residency_gate.proxy.connections import Access


@dataclass
class Owner:
    access: AccessConfig
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def gate(self):
        config = SimpleNamespace(access=self.access)
        return SimpleNamespace(bundle=SimpleNamespace(config=config), metrics=self.metrics)


def refused(owner: Owner, reason: str) -> float:
    return owner.metrics.refused_connections.labels(reason=reason)._value.get()


def client(address: str):
    conn = tflow.tclient_conn()
    conn.peername = (address, 50000)
    return conn


def test_client_networks_and_loopback():
    owner = Owner(AccessConfig(clients=(ipaddress.ip_network("10.20.0.0/16"),)))
    access = Access(owner)
    for address in ("10.20.3.4", "127.0.0.1", "::1", "::ffff:10.20.0.9"):
        conn = client(address)
        access.client_connected(conn)
        assert conn.error is None, address
    for address in ("10.21.0.1", "192.168.1.5", "fe80::1%eth0"):
        conn = client(address)
        access.client_connected(conn)
        assert "not in access.clients" in conn.error, address
    assert refused(owner, "client") == 3


def test_no_client_list_lets_everyone_in():
    conn = client("192.0.2.1")
    Access(Owner(AccessConfig())).client_connected(conn)
    assert conn.error is None


def test_fails_closed_without_a_config():
    broken = SimpleNamespace(gate=None)
    conn = client("10.20.3.4")
    Access(broken).client_connected(conn)
    assert conn.error
    flow = tflow.tflow()
    flow.request.port = 443
    Access(broken).http_connect(flow)
    assert flow.response.status_code == 403


def test_connect_ports_and_a_log_line_per_client_per_minute(caplog):
    owner = Owner(AccessConfig(connect_ports=frozenset({443, 8443})))
    access = Access(owner)
    with caplog.at_level(logging.WARNING, "residency_gate"):
        for port in (443, 8443, 22, 25, 22):
            flow = tflow.tflow()
            flow.request.host, flow.request.port = "example.com", port
            access.http_connect(flow)
            if port in (443, 8443):
                assert flow.response is None
            else:
                assert flow.response.status_code == 403
                assert b"ports 443, 8443" in flow.response.content
    assert refused(owner, "connect_port") == 3
    assert len([r for r in caplog.records if "refused CONNECT" in r.getMessage()]) == 1


def test_an_answered_connect_is_left_alone():
    flow = tflow.tflow(resp=True)
    flow.request.port = 22
    status = flow.response.status_code
    Access(Owner(AccessConfig())).http_connect(flow)
    assert flow.response.status_code == status
