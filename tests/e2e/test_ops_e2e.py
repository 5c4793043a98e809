"""Issue 6, run like infrastructure: hot reload (file change and SIGHUP, valid and
invalid, config and catalog) without dropping connections; Prometheus metrics
after real traffic; the health endpoints; proxy authentication feeding user rules.

Every test drives a real `residency-gate run` process and checks what the client
got, what the fake provider received, and what the admin listener and the audit
log say.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from .conftest import TAG_HEADER, Proxy
from .fakeprovider import PLAIN_HOST, FakeProvider, free_port
from .opshelpers import (
    CHAT,
    KeepAlive,
    admin_get,
    audit_records,
    basic,
    metrics,
    reloads,
    wait_for,
    wait_reloads,
)

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MISTRAL = REPO / "catalog" / "providers" / "mistral.yaml"


def write_config(proxy: Proxy, config: dict[str, Any], *, keep_stamp: bool = False) -> None:
    """Rewrite the proxy's config file in place (keep_stamp: same mtime, for SIGHUP)."""
    st = proxy.config_path.stat()
    text = yaml.safe_dump(config, sort_keys=False)
    if keep_stamp:
        assert len(text.encode()) == st.st_size, "keep_stamp needs a same-size change"
    proxy.config_path.write_text(text)
    if keep_stamp:
        os.utime(proxy.config_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    proxy.config = config


def with_clients(proxy: Proxy, require: str | None) -> dict[str, Any]:
    cfg = dict(proxy.config)
    cfg["residency"] = {"clients": [{"cidr": "127.0.0.0/8", "require": require}]} if require else {}
    return cfg


def admin_port(proxy: Proxy) -> int:
    return int(str(proxy.config["admin"]).rpartition(":")[2])


# ---------------------------------------------------------------------------
# hot reload


def test_reload_follows_new_config_and_catalog_without_dropping_connections(
    start_proxy: Any, fake: FakeProvider, tmp_path: Path
) -> None:
    extra = tmp_path / "extra-catalog" / "mistral.yaml"  # replaces the shipped provider file
    extra.parent.mkdir()
    shutil.copy(SHIPPED_MISTRAL, extra)
    proxy = start_proxy({"admin": f"127.0.0.1:{free_port()}", "catalog": [str(extra)]})
    port = admin_port(proxy)
    version0 = metrics(port).samples("residency_gate_catalog_info")

    us_openai = KeepAlive(proxy, "us.api.openai.com")
    mistral = KeepAlive(proxy, "api.mistral.ai")
    try:
        # no requirement at all: allowed
        r = us_openai.post()
        assert (r.status, r.decision) == (200, "allow"), r

        # 1. file change: every local client must stay in the EU -> the US host is refused,
        #    on the connection that was already open
        write_config(proxy, with_clients(proxy, "eu"))
        wait_reloads(port, "ok", 1)
        r = us_openai.post()
        assert (r.status, r.decision) == (451, "block"), r
        assert "requirement eu (from client 127.0.0.0/8)" in r.json()["error"]["message"]

        # 2. SIGHUP: a same-size change with the old mtime, which the file watcher cannot see
        write_config(proxy, with_clients(proxy, "us"), keep_stamp=True)
        time.sleep(1.5)  # two watcher rounds
        assert reloads(port, "ok") == 1, "the watcher saw a change it should not have"
        r = us_openai.post()
        assert r.status == 451, "config changed before SIGHUP"
        proxy.proc.send_signal(signal.SIGHUP)
        wait_reloads(port, "ok", 2)
        r = us_openai.post()
        assert (r.status, r.decision) == (200, "allow"), r

        # 3. catalog change in an extra catalog file listed in `catalog:`
        r = mistral.post(body={"model": "mistral-large-latest", "messages": []})
        assert (r.status, r.decision) == (451, "block"), r  # api.mistral.ai: global, not us
        text = extra.read_text()
        assert "    places: [global]\n" in text
        extra.write_text(text.replace("    places: [global]\n", "    places: [us]\n", 1))
        wait_reloads(port, "ok", 3)
        r = mistral.post(body={"model": "mistral-large-latest", "messages": []})
        assert (r.status, r.decision) == (200, "allow"), r
        version1 = metrics(port).samples("residency_gate_catalog_info")
        assert len(version1) == 1 and version1[0][1] == 1
        assert version1 != version0, "catalog_info still shows the old catalog version"
    finally:
        us_openai.close()
        mistral.close()

    # what reached the provider: exactly the allowed requests
    assert len(fake.received(host="us.api.openai.com")) == 2
    assert len(fake.received(host="api.mistral.ai")) == 1
    m = metrics(port)
    assert m.value("residency_gate_config_reloads_total", result="error") == 0
    assert m.value("residency_gate_config_reload_failure") == 0


def test_invalid_reload_is_refused_and_old_config_keeps_serving(
    start_proxy: Any, fake: FakeProvider
) -> None:
    proxy = start_proxy({
        "admin": f"127.0.0.1:{free_port()}",
        "residency": {"clients": [{"cidr": "127.0.0.0/8", "require": "eu"}]},
    })
    port = admin_port(proxy)
    client = KeepAlive(proxy, "api.openai.com")
    good = dict(proxy.config)
    try:
        assert client.post().status == 451  # eu requirement, api.openai.com is global

        # bad YAML
        proxy.config_path.write_text("listen: 127.0.0.1:1\nresidency: [unclosed\n")
        wait_reloads(port, "error", 1)
        m = metrics(port)
        assert m.value("residency_gate_config_reload_failure") == 1
        assert m.value("residency_gate_config_reloads_total", result="ok") == 0
        r = client.post()
        assert (r.status, r.decision) == (451, "block"), "the old config must keep serving"
        log = wait_for(lambda: "reload refused" in proxy.log_text() and proxy.log_text(), 5,
                       what="the refusal in the log")
        assert re.search(re.escape(str(proxy.config_path)) + r":\d+: invalid YAML", log), log[-2000:]

        # valid YAML, unknown region
        bad = dict(good)
        bad["residency"] = {"clients": [{"cidr": "127.0.0.0/8", "require": "atlantis"}]}
        write_config(proxy, bad)
        wait_reloads(port, "error", 2)
        assert metrics(port).value("residency_gate_config_reload_failure") == 1
        assert client.post().status == 451
        log = proxy.log_text()
        assert log.count("reload refused") == 2
        assert "atlantis" in log

        # a valid config again: accepted, failure gauge back to 0
        write_config(proxy, with_clients(proxy, None) | {"residency": {}})
        wait_reloads(port, "ok", 1)
        m = metrics(port)
        assert m.value("residency_gate_config_reload_failure") == 0
        assert m.value("residency_gate_config_reloads_total", result="error") == 2
        r = client.post()
        assert (r.status, r.decision) == (200, "allow"), r
    finally:
        client.close()
    assert len(fake.received(path_prefix=CHAT)) == 1


# ---------------------------------------------------------------------------
# metrics and health


@pytest.fixture(scope="module")
def admin_proxy(start_module_proxy: Any) -> Proxy:
    return start_module_proxy({"admin": f"127.0.0.1:{free_port()}"})


def test_metrics_after_real_traffic(admin_proxy: Proxy, fake: FakeProvider) -> None:
    proxy = admin_proxy
    port = admin_port(proxy)
    # the harness's readiness probe connection, closed by now
    wait_for(lambda: metrics(port).value("residency_gate_open_connections") == 0, 5,
             what="no open connections")
    assert metrics(port).samples("residency_gate_decisions_total") == []

    openai_c = KeepAlive(proxy, "api.openai.com")
    anthropic_c = KeepAlive(proxy, "api.anthropic.com")
    statuses = []
    for tag in (None, None, None, "eu", "eu", "atlantis"):
        statuses.append(openai_c.post(tag=tag).status)
    statuses.append(anthropic_c.post("/v1/messages", {
        "model": "claude-opus-4-6", "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}]}).status)
    assert statuses == [200, 200, 200, 451, 451, 400, 200]

    # a non-LLM site: tunnelled, its own certificate
    raw = socket_tunnel(proxy, PLAIN_HOST, fake)
    assert raw.startswith(b"HTTP/1.1 200")

    m = metrics(port)
    assert m.value("residency_gate_open_connections") == 2  # the two keep-alive clients
    openai_c.close()
    anthropic_c.close()
    wait_for(lambda: metrics(port).value("residency_gate_open_connections") == 0, 5,
             what="open_connections back to 0")

    m = metrics(port)
    decisions = {
        (lab["provider"], lab["decision"], lab["reason"]): v
        for lab, v in m.samples("residency_gate_decisions_total")
    }
    assert decisions == {
        ("openai", "allow", "no_requirement"): 3,
        ("openai", "block", "outside_requirement"): 2,
        ("openai", "block", "unknown_tag"): 1,
        ("anthropic", "allow", "no_requirement"): 1,
    }
    assert m.value("residency_gate_decision_seconds_count") == 7
    assert m.value("residency_gate_decision_seconds_bucket", le="+Inf") == 7
    assert 0 < m.value("residency_gate_decision_seconds_sum") < 7 * 0.1
    assert m.value("residency_gate_audit_write_seconds_count") == 7  # one decision record each
    assert m.value("residency_gate_audit_failures_total") == 0
    assert m.value("residency_gate_flows_total", kind="intercepted") == 2
    assert m.value("residency_gate_flows_total", kind="tunnelled") == 1

    from residency_gate.catalog.compile import load_catalog

    assert m.samples("residency_gate_catalog_info") == [({"version": load_catalog().revision}, 1)]

    # audit records: 7 decisions, and the counter agrees with the files
    def written() -> list[dict[str, Any]]:
        recs = audit_records(proxy.audit_dir)
        n = metrics(port).value("residency_gate_audit_records_total")
        kinds = [r["kind"] for r in recs if r["kind"] in ("decision", "outcome")]
        return recs if kinds.count("outcome") == 7 and n == len(kinds) else []

    recs = wait_for(written, 5, what="outcome records and audit_records_total")
    assert sum(r["kind"] == "decision" for r in recs) == 7
    assert len(fake.received(path_prefix=CHAT)) == 3
    assert len(fake.received(path_prefix="/v1/messages")) == 1


def socket_tunnel(proxy: Proxy, host: str, fake: FakeProvider) -> bytes:
    """CONNECT host, TLS trusting only the fake provider's CA (proves: not intercepted)."""
    from .rawhttp import connect_tunnel

    sock = connect_tunnel(proxy.host, proxy.port, host)
    ctx = ssl.create_default_context(cafile=str(fake.ca_pem))
    with ctx.wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data


def test_health_endpoints(admin_proxy: Proxy) -> None:
    port = admin_port(admin_proxy)
    status, headers, body = admin_get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = admin_get(port, "/readyz")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"ready": True, "checks": {"catalog": True, "audit": True}}
    status, headers, body = admin_get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE residency_gate_decisions_total counter" in body
    for path in ("/", "/nope", "/healthz/extra", "/metricsx"):
        assert admin_get(port, path)[0] == 404, path
    assert admin_get(port, "/healthz", method="POST")[0] == 405
    # the proxy port is not the admin port: no health endpoint there
    conn = http.client.HTTPConnection(admin_proxy.host, admin_proxy.port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status != 200
    conn.close()


# ---------------------------------------------------------------------------
# proxy authentication and user rules


def test_proxy_auth_user_rules(start_proxy: Any, fake: FakeProvider, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    bcrypt_hash = bcrypt.hashpw(b"hr-secret", bcrypt.gensalt(rounds=5)).decode()
    sha = base64.b64encode(hashlib.sha1(b"dev-secret").digest()).decode()
    htpasswd.write_text(f"hr-bot:{bcrypt_hash}\ndev:{{SHA}}{sha}\n")
    proxy = start_proxy({
        "proxy_auth": f"@{htpasswd}",
        "residency": {"clients": [{"user": "hr-bot", "require": "de"}]},
    })

    hr = KeepAlive(proxy, "api.openai.com", proxy_auth=basic("hr-bot", "hr-secret"))
    r = hr.post()
    hr.close()
    assert (r.status, r.decision) == (451, "block"), r
    message = r.json()["error"]["message"]
    assert "hr-bot" in message and "de" in message, message
    assert fake.received(path_prefix=CHAT) == []

    dev = KeepAlive(proxy, "api.openai.com", proxy_auth=basic("dev", "dev-secret"))
    r = dev.post()
    dev.close()
    assert (r.status, r.decision) == (200, "allow"), r
    assert len(fake.received(path_prefix=CHAT)) == 1

    # a wrong password and no credentials: 407 at CONNECT, nothing forwarded
    for auth in (basic("hr-bot", "wrong"), basic("nobody", "x"), None):
        with pytest.raises(OSError, match="407"):
            KeepAlive(proxy, "api.openai.com", proxy_auth=auth)
    # plain-HTTP proxy request with a wrong password: 407 as well
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    conn.request("POST", "http://api.openai.com/v1/chat/completions", body=b"{}",
                 headers={"Proxy-Authorization": basic("dev", "wrong"), TAG_HEADER: "eu"})
    resp = conn.getresponse()
    assert resp.status == 407
    assert resp.getheader("Proxy-Authenticate", "").startswith("Basic")
    conn.close()
    assert len(fake.received()) == 1

    decisions = [r for r in audit_records(proxy.audit_dir) if r["kind"] == "decision"]
    assert [(d["user"], d["decision"]) for d in decisions] == [
        ("hr-bot", "block"), ("dev", "allow")]
