"""Report mode: a violation of the place comparison in report mode is forwarded and recorded
as the decision enforcing would take, with enforced: false; broken input is still refused.
Modes come from the client rule, then the zone, then `on_violation`."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import tflow, tutils

from helpers import decide_url, policy_from
from residency_gate.catalog.source import InvalidSource
from residency_gate.core.decision import ReasonCode
from residency_gate.ops.metrics import Metrics
from residency_gate.proxy.addon import ResidencyGate
from residency_gate.proxy.interface import Gate
from test_addon_failclosed import chat_flow, drive, open_writer, run
from test_answer_path import decisions

CHAT = "https://api.openai.com/v1/chat/completions"
EU_CHAT = "https://eu.api.openai.com/v1/chat/completions"
GPT = {"model": "gpt-4o", "messages": []}

PHASED = {"residency": {
    "zones": {"pilot": {"places": ["eu"], "mode": "report"}, "strict": ["de"],
              "emea": {"places": ["eea", "ch", "gb"]}},
    "clients": [{"cidr": "10.1.0.0/16", "require": "eu", "mode": "report"},
                {"cidr": "10.2.0.0/16", "require": "eu"},
                {"user": "pilot-bot", "require": "pilot"},
                {"user": "strict-bot", "require": "pilot", "mode": "enforce"}]}}


@pytest.fixture
def phased(tmp_path):
    return policy_from(tmp_path, PHASED)


def test_rule_in_report_mode_reports_what_enforcing_would_do(phased) -> None:
    d = decide_url(phased, CHAT, body=GPT, client="10.1.2.3")
    enforced = decide_url(phased, CHAT, body=GPT, client="10.2.2.3")
    assert (d.code, d.verdict, d.enforced, d.disposition) == (
        ReasonCode.OUTSIDE_REQUIREMENT, "block", False, "report")
    assert (enforced.code, enforced.enforced, enforced.disposition) == (
        ReasonCode.OUTSIDE_REQUIREMENT, True, "block")
    # the same reason and requirement as the enforced block, client rule apart
    assert d.reason == enforced.reason.replace("10.2.0.0/16", "10.1.0.0/16")
    assert d.requirement.places == enforced.requirement.places


def test_compliant_requests_are_plain_allows_in_report_mode(phased) -> None:
    d = decide_url(phased, "https://bedrock-runtime.eu-central-1.amazonaws.com/model/"
                   "anthropic.claude-3-haiku-20240307-v1:0/converse", body={},
                   client="10.1.2.3")
    assert (d.code, d.enforced, d.disposition) == (ReasonCode.COMPLIANT, True, "allow")


def test_zone_mode_and_the_rules_own_mode_wins(phased) -> None:
    assert not decide_url(phased, CHAT, body=GPT, user="pilot-bot").enforced  # zone: report
    assert decide_url(phased, CHAT, body=GPT, user="strict-bot").enforced  # rule says enforce
    assert not decide_url(phased, CHAT, body=GPT, tags=["pilot"]).enforced  # tag of the zone
    assert decide_url(phased, CHAT, body=GPT, tags=["emea"]).enforced  # object form, no mode


def test_enforced_part_decides_when_parts_are_mixed(phased) -> None:
    """Report-mode client rule + an enforced tag: refused only when the enforced tag is
    violated; a destination inside the tag but outside the report-mode rule is reported."""
    # eu.api.openai.com processes in eea_ch: inside tag emea (enforced), outside eu (report)
    d = decide_url(phased, EU_CHAT, body=GPT, tags=["emea"], client="10.1.0.9")
    assert (d.code, d.enforced) == (ReasonCode.OUTSIDE_REQUIREMENT, False)
    # api.openai.com (global) violates the enforced tag too
    d = decide_url(phased, CHAT, body=GPT, tags=["emea"], client="10.1.0.9")
    assert (d.code, d.enforced) == (ReasonCode.OUTSIDE_REQUIREMENT, True)
    # one header value naming a report zone and an enforced region: the region is enforced
    d = decide_url(phased, CHAT, body=GPT, tags=["pilot, strict"])
    assert d.enforced
    assert [p.mode for p in d.requirement.parts] == ["enforce"]


def test_global_report_with_one_rule_enforced(tmp_path) -> None:
    bundle = policy_from(tmp_path, {"residency": {
        "on_violation": "report", "default": "eu",
        "clients": [{"cidr": "10.9.0.0/16", "require": "eu", "mode": "enforce"}]}})
    assert not decide_url(bundle, CHAT, body=GPT, client="10.1.0.1").enforced  # default
    assert not decide_url(bundle, CHAT, body=GPT, tags=["us"]).enforced  # a tag
    assert decide_url(bundle, CHAT, body=GPT, client="10.9.0.1").enforced  # phased in
    empty = decide_url(bundle, CHAT, body=GPT, tags=["us"], client="10.2.0.1")
    assert (empty.code, empty.enforced) == (ReasonCode.EMPTY_REQUIREMENT, False)
    unknown = decide_url(bundle, "https://api.perplexity.ai/chat/completions", body=GPT)
    assert (unknown.code, unknown.enforced) == (ReasonCode.UNKNOWN_PLACE, False)


def test_broken_input_is_refused_in_report_mode(tmp_path) -> None:
    bundle = policy_from(tmp_path, {"residency": {"on_violation": "report", "default": "eu"}})
    d = decide_url(bundle, CHAT, body=GPT, tags=["atlantis"])
    assert (d.code, d.enforced, d.status) == (ReasonCode.UNKNOWN_TAG, True, 400)
    d = decide_url(bundle, CHAT, raw_body=b"{not json")
    assert (d.code, d.enforced, d.status) == (ReasonCode.BAD_BODY, True, 400)
    reportable = {c for c in ReasonCode if c.reportable}
    assert reportable == {ReasonCode.EMPTY_REQUIREMENT, ReasonCode.UNKNOWN_PLACE,
                          ReasonCode.OUTSIDE_REQUIREMENT, ReasonCode.NO_COMPLIANT_ROUTE,
                          ReasonCode.REROUTED}


def test_report_rule_with_reroute_records_the_reroute_it_would_make(tmp_path) -> None:
    bundle = policy_from(tmp_path, {"residency": {"on_violation": "reroute", "clients": [
        {"cidr": "10.1.0.0/16", "require": "eea_ch", "mode": "report"}]}})
    d = decide_url(bundle, CHAT, body=GPT, client="10.1.0.1")
    assert (d.code, d.verdict, d.enforced, d.disposition) == (
        ReasonCode.REROUTED, "reroute", False, "report")
    assert d.route.host == "eu.api.openai.com"


def test_bad_mode_is_a_config_error(tmp_path) -> None:
    with pytest.raises(InvalidSource, match="mode"):
        policy_from(tmp_path, {"residency": {"clients": [
            {"cidr": "10.0.0.0/8", "require": "eu", "mode": "audit"}]}})
    with pytest.raises(InvalidSource):
        policy_from(tmp_path, {"residency": {"zones": {"z": {"places": ["eu"],
                                                              "mode": "maybe"}}}})


# ------------------------------------------------------------------ through the addon


@pytest.fixture
def key(tmp_path):
    from residency_gate.audit.keys import load_or_create_signing_key

    return load_or_create_signing_key(tmp_path / "certs")


def _drive(tmp_path, bundle, key, flows):
    w = open_writer(tmp_path, key)
    metrics = Metrics()
    addon = ResidencyGate(Gate(bundle=bundle, audit=w, metrics=metrics))

    async def go():
        for f in flows:
            await drive(addon, f)
            if f.response is None:  # forwarded: the provider answers
                f.response = tutils.tresp(status_code=200)
                addon.responseheaders(f)
        await w.close()

    run(go)
    return metrics


def test_addon_forwards_a_reported_violation_and_records_it(tmp_path, key) -> None:
    bundle = policy_from(tmp_path, {"residency": {"on_violation": "report"}})
    reported, unknown = chat_flow("eu"), chat_flow("atlantis")
    metrics = _drive(tmp_path, bundle, key, [reported, unknown])
    assert reported.response.status_code == 200  # it reached "the provider"
    assert "x-data-residency" not in reported.request.headers  # stripped like any forward
    assert reported.response.headers["X-Residency-Decision"] == "report"
    assert reported.response.headers["X-Residency-Reason"] == "outside_requirement"
    assert unknown.response.status_code == 400
    assert unknown.response.headers["X-Residency-Decision"] == "block"
    rec, bad = decisions(tmp_path, key)  # records validate against the schema
    assert (rec["decision"], rec["enforced"], rec["code"], rec["status"]) == (
        "block", False, "outside_requirement", 451)
    assert rec["requirement"] == ["eu"] and rec["requirement_sources"][0]["mode"] == "report"
    assert reported.response.headers["X-Residency-Audit-Id"] == rec["id"]
    assert (bad["code"], bad["enforced"]) == ("unknown_tag", True)
    assert metrics.reported.labels(provider="openai", decision="block",
                                   reason="outside_requirement")._value.get() == 1
    assert metrics.decisions.labels(provider="openai", decision="block",
                                    reason="outside_requirement")._value.get() == 0
    assert metrics.decisions.labels(provider="openai", decision="block",
                                    reason="unknown_tag")._value.get() == 1


def test_a_reported_reroute_is_not_applied(tmp_path, key) -> None:
    bundle = policy_from(tmp_path, {"residency": {"on_violation": "reroute", "clients": [
        {"cidr": "0.0.0.0/0", "require": "eea_ch", "mode": "report"},
        {"cidr": "::/0", "require": "eea_ch", "mode": "report"}]}})
    f = chat_flow()
    _drive(tmp_path, bundle, key, [f])
    assert f.request.host == "api.openai.com"  # not rewritten
    assert f.response.headers["X-Residency-Decision"] == "report"
    assert "X-Residency-Routed-To" not in f.response.headers
    (rec,) = decisions(tmp_path, key)
    assert (rec["decision"], rec["enforced"], rec["routed_to"]) == (
        "reroute", False, "eu.api.openai.com")


def _browser_flow():
    f = chat_flow("eu")
    f.request.headers["accept"] = "text/html,application/xhtml+xml,*/*;q=0.8"
    return f


def test_browser_gets_the_block_page_api_client_the_json_error(tmp_path, key) -> None:
    bundle = policy_from(tmp_path, {"block_page": {"contact": "the IT help desk (ext. 4242)",
                                                   "instead": "the company chat at https://chat.corp"}})
    browser, api = _browser_flow(), chat_flow("eu")
    _drive(tmp_path, bundle, key, [browser, api])
    assert browser.response.status_code == api.response.status_code == 451
    assert browser.response.headers["content-type"].startswith("text/html")
    page = browser.response.get_text()
    audit_id = browser.response.headers["X-Residency-Audit-Id"]
    for text in (audit_id, "header X-Data-Residency: eu", "the IT help desk (ext. 4242)",
                 "https://chat.corp", "https://api.openai.com/v1/chat/completions"):
        assert text in page, text
    assert "<script" not in page and "http://" not in page.replace("https://chat.corp", "")
    assert api.response.headers["content-type"] == "application/json"
    assert api.response.json()["error"]["code"] == "outside_requirement"


def test_flow_helpers_are_real_mitmproxy_flows() -> None:
    assert isinstance(chat_flow(), type(tflow.tflow()))


def test_explain_shows_the_mode(tmp_path, capsys) -> None:
    from residency_gate.cli.main import main

    cfg = tmp_path / "rg.yaml"
    cfg.write_text("residency:\n  clients:\n    - {cidr: 10.1.0.0/16, require: eu, mode: report}\n")
    code = main(["explain", "-c", str(cfg), CHAT, "--model", "gpt-4o", "--client", "10.1.2.3"])
    out = capsys.readouterr().out
    assert code == 0  # forwarded: report mode
    assert "from client 10.1.0.0/16: eu (report mode)" in out
    assert "Mode:         REPORT" in out and "BLOCK (HTTP 451) [outside_requirement]" in out
    assert main(["explain", "-c", str(cfg), CHAT, "--model", "gpt-4o", "--client", "10.1.2.3",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["decision"], record["enforced"]) == ("block", False)
    assert record["requirement_sources"][0]["mode"] == "report"
