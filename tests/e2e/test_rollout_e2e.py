"""Issue 13, rolling it out without breaking anyone, through the running proxy: report mode
per client network (and its switch to enforce by hot reload, without dropped requests),
the AI usage inventory of a mixed run, what-if replay of that run, and the pages people
read (block page, inventory, replay), rendered in headless Chromium.

Client networks: the proxy listens on 127.0.0.1; each client binds its socket to another
loopback address (127.0.0.2, 127.0.0.3) to stand for another subnet.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from browser import check_page

from .conftest import RESIDENCY_GATE, TAG_HEADER, Proxy
from .fakeprovider import PLAIN_HOST, FakeProvider, free_port
from .opshelpers import CHAT, Reply, audit_records, basic, wait_for, wait_reloads
from .test_ops_e2e import write_config

pytestmark = pytest.mark.e2e

REPORT_NET, ENFORCE_NET = "127.0.0.2", "127.0.0.3"
GPT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


class Conn:
    """One keep-alive TLS connection through a CONNECT tunnel, from a chosen source address.

    `ctx` decides whom the client trusts: the proxy's CA for hosts the proxy intercepts,
    the fake provider's for hosts it must tunnel untouched."""

    def __init__(self, proxy: Proxy, host: str, source: str = "127.0.0.1", *,
                 ctx: ssl.SSLContext | None = None, auth: str | None = None) -> None:
        self.conn = http.client.HTTPSConnection(
            proxy.host, proxy.port, context=ctx or proxy.ssl_context(), timeout=20,
            source_address=(source, 0))
        self.conn.set_tunnel(host, 443, headers={"Proxy-Authorization": auth} if auth else None)
        self.conn.connect()
        self.conn.auto_open = 0  # a dropped connection fails the next request

    def request(self, method: str = "POST", path: str = CHAT, body: Any = GPT,
                tag: str | None = None, accept: str | None = None) -> Reply:
        headers = {"Authorization": "Bearer sk-test-key"}
        payload = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            payload = json.dumps(body).encode()
        if tag is not None:
            headers[TAG_HEADER] = tag
        if accept is not None:
            headers["Accept"] = accept
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        return Reply(resp, resp.read())

    def close(self) -> None:
        self.conn.close()


def one(proxy: Proxy, host: str, source: str = "127.0.0.1", **kw: Any) -> Reply:
    ctx, auth = kw.pop("ctx", None), kw.pop("auth", None)
    c = Conn(proxy, host, source, ctx=ctx, auth=auth)
    try:
        return c.request(**kw)
    finally:
        c.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RESIDENCY_GATE), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def decisions(proxy: Proxy) -> list[dict[str, Any]]:
    return [r for r in audit_records(proxy.audit_dir) if r["kind"] == "decision"]


# ---------------------------------------------------------------------------- report mode


def test_report_mode_per_subnet_and_its_switch_by_hot_reload(
        start_proxy: Any, fake: FakeProvider) -> None:
    rules = [{"cidr": f"{REPORT_NET}/32", "require": "eu", "mode": "report"},
             {"cidr": f"{ENFORCE_NET}/32", "require": "eu"}]
    proxy = start_proxy({"admin": f"127.0.0.1:{free_port()}", "residency": {"clients": rules}})
    admin = int(proxy.config["admin"].rpartition(":")[2])

    r = one(proxy, "api.openai.com", REPORT_NET)
    assert (r.status, r.decision) == (200, "report"), r
    assert r.headers["x-residency-reason"] == "outside_requirement"
    assert len(fake.received(host="api.openai.com")) == 1  # it reached the provider
    r = one(proxy, "api.openai.com", ENFORCE_NET)
    assert (r.status, r.decision) == (451, "block"), r
    r = one(proxy, "api.openai.com", REPORT_NET, tag="atlantis")  # broken input: refused
    assert (r.status, r.decision) == (400, "block"), r
    assert r.json()["error"]["code"] == "unknown_tag"
    assert len(fake.received(host="api.openai.com")) == 1

    rep, enf, bad = decisions(proxy)
    assert (rep["client"], rep["decision"], rep["enforced"], rep["code"], rep["status"]) == (
        REPORT_NET, "block", False, "outside_requirement", 451)
    assert (enf["client"], enf["decision"], enf["enforced"], enf["code"]) == (
        ENFORCE_NET, "block", True, "outside_requirement")
    assert rep["reason"] == enf["reason"].replace(ENFORCE_NET, REPORT_NET)
    assert (bad["code"], bad["enforced"]) == ("unknown_tag", True)

    # Phase in the report subnet by hot reload while it sends requests back to back on one
    # keep-alive connection: every request is answered, first forwarded, then refused.
    stream = Conn(proxy, "api.openai.com", REPORT_NET)
    replies: list[Reply | BaseException] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            try:
                replies.append(stream.request())
            except BaseException as e:  # recorded: the assertion below names it
                replies.append(e)
                return

    sender = threading.Thread(target=send)
    sender.start()
    try:
        wait_for(lambda: len(replies) >= 5, 10, what="requests before the reload")
        enforced = [{**rules[0], "mode": "enforce"}, rules[1]]
        write_config(proxy, {**proxy.config, "residency": {"clients": enforced}})
        wait_reloads(admin, "ok", 1)
        seen = len(replies)
        wait_for(lambda: len(replies) >= seen + 5, 10, what="requests after the reload")
    finally:
        stop.set()
        sender.join(30)
        stream.close()
    errors = [r for r in replies if isinstance(r, BaseException)]
    assert not errors, f"dropped: {errors[0]!r}"
    statuses = [r.status for r in replies]
    switch = statuses.index(451)
    assert set(statuses[:switch]) == {200} and set(statuses[switch:]) == {451}, statuses
    assert all(r.decision == "report" for r in replies[:switch])
    assert len(fake.received(host="api.openai.com")) == 1 + switch
    streamed = [d for d in decisions(proxy) if d["client"] == REPORT_NET][2:]
    assert [d["enforced"] for d in streamed] == [False] * switch + [True] * (len(replies) - switch)


# ---------------------------------------------------------------------------- a mixed run


@pytest.fixture(scope="module")
def mixed_run(start_module_proxy: Any, fake: FakeProvider,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Allowed, blocked, reported, AI-app (tunnelled and refused) and non-AI traffic from
    three client networks and two proxy users; the proxy is stopped at the end, so the
    inventory of tunnelled connections is flushed into the trail."""
    fake.reset()
    htpasswd = tmp_path_factory.mktemp("auth") / "htpasswd"
    htpasswd.write_text("".join(
        f"{u}:{{SHA}}{base64.b64encode(hashlib.sha1(p.encode()).digest()).decode()}\n"
        for u, p in (("alice", "a-secret"), ("bob", "b-secret"))))
    proxy = start_module_proxy({
        "proxy_auth": f"@{htpasswd}",
        "residency": {"clients": [
            {"cidr": f"{REPORT_NET}/32", "require": "eea_ch", "mode": "report"},
            {"cidr": f"{ENFORCE_NET}/32", "require": "eea_ch"}]},
        "block_page": {"contact": "the IT help desk (ext. 4242)",
                       "instead": "the company assistant at https://chat.corp.example"},
        "audit": {"inventory_seconds": 3600}})
    alice, bob = basic("alice", "a-secret"), basic("bob", "b-secret")
    direct = fake.client_ssl_context()  # tunnelled hosts: the client sees the real server
    got: dict[str, Reply] = {}

    api = Conn(proxy, "api.openai.com", auth=alice)
    got["allowed"] = api.request()
    got["allowed2"] = api.request()
    api.close()
    api = Conn(proxy, "api.openai.com", REPORT_NET, auth=alice)
    got["reported"] = api.request()
    got["reported2"] = api.request()
    api.close()
    got["blocked"] = one(proxy, "api.openai.com", ENFORCE_NET, auth=bob)
    got["compliant"] = one(proxy, "eu.api.openai.com", ENFORCE_NET, auth=bob)
    for _ in range(2):
        got["app"] = one(proxy, "chatgpt.com", ctx=direct, auth=alice, method="GET",
                         path="/", body=None, accept=BROWSER)
    got["app_bob"] = one(proxy, "chatgpt.com", ctx=direct, auth=bob, method="GET", path="/",
                         body=None, accept=BROWSER)
    got["app_reported"] = one(proxy, "claude.ai", REPORT_NET, ctx=direct, auth=alice,
                              method="GET", path="/", body=None, accept=BROWSER)
    got["app_blocked"] = one(proxy, "chatgpt.com", ENFORCE_NET, auth=bob, method="GET",
                             path="/", body=None, accept=BROWSER)
    got["plain"] = one(proxy, PLAIN_HOST, ctx=direct, auth=bob, method="GET", path="/",
                       body=None)
    got["plain_enforced"] = one(proxy, PLAIN_HOST, ENFORCE_NET, ctx=direct, auth=bob,
                                method="GET", path="/", body=None)
    assert proxy.stop() == 0
    received = {h: len(fake.received(host=h)) for h in (
        "api.openai.com", "eu.api.openai.com", "chatgpt.com", "claude.ai", PLAIN_HOST)}
    return {"proxy": proxy, "replies": got, "received": received}


def test_mixed_run_answers_and_what_reached_the_providers(mixed_run: dict[str, Any]) -> None:
    got, received = mixed_run["replies"], mixed_run["received"]
    assert [got[k].decision for k in ("allowed", "reported", "blocked", "compliant")] == [
        "allow", "report", "block", "allow"]
    assert got["app"].status == 200 and got["app"].decision is None  # tunnelled untouched
    assert got["app_reported"].status == 200 and got["app_reported"].decision is None
    page = got["app_blocked"]
    assert (page.status, page.decision) == (451, "block")
    assert page.headers["content-type"].startswith("text/html")
    assert received == {"api.openai.com": 4, "eu.api.openai.com": 1, "chatgpt.com": 3,
                        "claude.ai": 1, PLAIN_HOST: 2}
    # the tunnelled apps were never intercepted: the fake saw the client's own TLS
    assert got["app"].headers.get("x-fake-site") == "ai-app"


def test_inventory_of_the_mixed_run(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    proxy = mixed_run["proxy"]
    verify = cli("audit", "verify", str(proxy.audit_dir), "--pubkey",
                 str(proxy.certs_dir / "audit-signing-key.pub.pem"))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    inventory = [r for r in audit_records(proxy.audit_dir) if r["kind"] == "inventory"]
    assert all(r["sni"] is None or r["sni"] == r["host"] for r in inventory)
    html = tmp_path / "inventory.html"
    done = cli("inventory", str(proxy.audit_dir), "-c", str(proxy.config_path), "--json",
               "--html", str(html))
    assert done.returncode == 0, done.stderr
    assert PLAIN_HOST not in done.stdout and "plain" not in done.stdout
    rows = {(r["provider"], r["endpoint"], r["network"], r["user"]): r
            for r in json.loads(done.stdout)["rows"]}
    counts = {k: (r["requests"], r["connections"], r["allowed"], r["blocked"], r["reported"],
                  r["would_block"]) for k, r in rows.items()}
    home = "127.0.0.0/24"
    assert counts == {
        ("openai", "global", home, "alice"): (2, 0, 2, 0, 0, 0),
        ("openai", "global", f"{REPORT_NET}/32", "alice"): (2, 0, 0, 0, 2, 2),
        ("openai", "global", f"{ENFORCE_NET}/32", "bob"): (1, 0, 0, 1, 0, 1),
        ("openai", "regional", f"{ENFORCE_NET}/32", "bob"): (1, 0, 1, 0, 0, 0),
        ("chatgpt", "app", home, "alice"): (0, 2, 0, 0, 0, 0),
        ("chatgpt", "app", home, "bob"): (0, 1, 0, 0, 0, 0),
        ("claude", "app", f"{REPORT_NET}/32", "alice"): (0, 1, 0, 0, 1, 1),
        ("chatgpt", "app", f"{ENFORCE_NET}/32", "bob"): (1, 0, 0, 1, 0, 1),
    }
    app = rows[("chatgpt", "app", home, "alice")]
    assert app["bytes_up"] > 0 and app["bytes_down"] > 0 and app["processed_in"] == "unknown"
    assert rows[("openai", "regional", f"{ENFORCE_NET}/32", "bob")]["processed_in"] == "eea_ch"
    assert any("eu.api.openai.com" in a
               for a in rows[("openai", "global", f"{REPORT_NET}/32", "alice")]["instead"])
    check_page(html, tmp_path / "shots", "inventory",
               ["AI usage inventory", "chatgpt", "claude", "would be blocked", "127.0.0.2/32"])


def test_replay_of_the_mixed_run(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    proxy = mixed_run["proxy"]
    recorded = decisions(proxy)
    assert len(recorded) == 7
    same = cli("audit", "replay", str(proxy.audit_dir), "-c", str(proxy.config_path), "--json")
    assert same.returncode == 0, same.stderr
    report = json.loads(same.stdout)
    assert report["decisions"] == report["exact"] == 7
    assert set(report["totals"].values()) == {0} and report["changes"] == []

    stricter = yaml.safe_load(proxy.config_path.read_text())
    stricter["residency"]["clients"] = [
        {"cidr": "127.0.0.1/32", "require": "eea_ch"},
        {"cidr": f"{REPORT_NET}/32", "require": "eea_ch"},  # report mode switched off
        {"cidr": f"{ENFORCE_NET}/32", "require": "eea_ch"}]
    candidate = proxy.workdir / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(stricter))
    html = tmp_path / "replay.html"
    done = cli("audit", "replay", str(proxy.audit_dir), "-c", str(candidate), "--json",
               "--html", str(html))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    expected = {d["id"] for d in recorded
                if d["provider"] == "openai" and d["endpoint"] == "global"
                and d["client"] in ("127.0.0.1", REPORT_NET)}
    assert len(expected) == 4
    assert {c["id"]: c["change"] for c in report["changes"]} == dict.fromkeys(
        expected, "newly_blocked")
    assert report["totals"]["newly_blocked"] == 4 and sum(report["totals"].values()) == 4
    assert report["by"]["network"] == {"127.0.0.1/32": {"newly_blocked": 2},
                                       f"{REPORT_NET}/32": {"newly_blocked": 2}}
    assert report["by"]["user"] == {"alice": {"newly_blocked": 4}}
    check_page(html, tmp_path / "shots", "replay",
               ["What-if", "4 of 7 recorded requests", "newly blocked", "alice"])


def test_block_page_in_the_browser(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    page = mixed_run["replies"]["app_blocked"]
    audit_id = page.headers["x-residency-audit-id"]
    (record,) = [d for d in decisions(mixed_run["proxy"]) if d["id"] == audit_id]
    assert (record["provider"], record["code"], record["user"]) == (
        "chatgpt", "unknown_place", "bob")
    rendered = check_page(page.body.decode(), tmp_path / "shots", "block-page", [
        "Blocked by residency policy", "https://chatgpt.com/", "ChatGPT",
        f"client {ENFORCE_NET}/32 requires eea_ch", audit_id,
        "the company assistant at https://chat.corp.example", "the IT help desk (ext. 4242)",
        "eu.api.openai.com"])
    assert rendered[390].title.startswith("Blocked by residency policy")
    # an API client asking the same host gets JSON, not the page
    api = mixed_run["replies"]["blocked"]
    assert api.headers["content-type"] == "application/json"
    assert api.json()["error"]["code"] == "outside_requirement"
