import asyncio
import json
import shutil

import pytest

from residency_gate.audit.keys import load_or_create_signing_key
from residency_gate.audit.writer import AuditWriter
from residency_gate.cli.audit import main, parse_time

ORIGIN = "gw-1"


@pytest.fixture
def env(tmp_path):
    certs = tmp_path / "certs"
    key = load_or_create_signing_key(certs)
    d = tmp_path / "audit"

    async def go():
        w = AuditWriter(d, key, ORIGIN)
        w.open()
        for i, (dec, prov, req, client) in enumerate([
            ("block", "openai", ["eu"], "10.20.0.7"),
            ("allow", "anthropic", ["eu"], "10.20.0.8"),
            ("reroute", "openai", ["de"], "10.30.0.1"),
            ("allow", "openai", [], "10.20.0.9"),
        ]):
            rec = await w.append("decision", {
                "client": client, "user": "hr-bot" if i == 2 else None, "method": "POST",
                "url": f"https://api.{prov}.com/v1/x", "host": f"api.{prov}.com",
                "provider": prov, "model": "m", "requirement": req, "places": ["us"],
                "decision": dec, "reason": f"reason <{i}>", "body_sha256": "00" * 32,
                "code": "outside_requirement" if dec == "block" else "ok",
                "status": 451 if dec == "block" else 0, "enforced": True})
            await w.append("outcome", {"decision_id": rec["id"], "status": 200 + i,
                                       "bytes_in": 1, "bytes_out": 2, "duration_ms": 3,
                                       "error": None})
        await w.close()
    asyncio.run(go())
    return tmp_path, certs, d


def cli(capsys, *argv):
    rc = main(["audit", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_verify_ok_and_fail(env, capsys):
    _root, certs, d = env
    rc, out, _ = cli(capsys, "verify", str(d), "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    assert rc == 0 and "intact" in out and "vouched seq 0-" in out
    seg = sorted(d.glob("gw-1-*.jsonl"))[0]
    seg.write_bytes(seg.read_bytes().replace(b'"decision":"block"', b'"decision":"allow"'))
    rc, out, _ = cli(capsys, "verify", str(d), "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    assert rc == 1
    assert f"{seg}:2: seq 1: bad-signature:" in out
    assert f"{seg}:3: seq 2: hash-mismatch:" in out


def test_verify_defaults_and_json(env, capsys):
    _root, certs, d = env

    import argparse
    ns = argparse.Namespace(paths=[], pubkey=None, anchor=None, json=True,
                            default_audit_dir=d, default_certs_dir=certs)
    from residency_gate.cli.audit import _guard, cmd_verify
    assert _guard(cmd_verify)(ns) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["origins"][ORIGIN]["vouched"][0][0] == 0


@pytest.mark.parametrize("argv", [
    ["verify", "/nonexistent/dir"],
    ["verify", "--pubkey", "/nonexistent.pem", "."],
    ["show", "--since", "yesterday-ish", "."],
    ["report", "/nonexistent"],
])
def test_bad_input_exit_2_no_traceback(env, capsys, argv, monkeypatch):
    root, _certs, _d = env
    monkeypatch.chdir(root)
    if argv[0] == "report":
        argv = [*argv, "--html", str(root / "r.html")]
    rc, _out, err = cli(capsys, *argv)
    assert rc == 2 and "Traceback" not in err and err.startswith("residency-gate audit: error:")


def test_verify_empty_dir(tmp_path, capsys):
    load_or_create_signing_key(tmp_path / "certs")
    (tmp_path / "empty").mkdir()
    rc, out, _ = cli(capsys, "verify", str(tmp_path / "empty"), "--pubkey",
                     str(tmp_path / "certs" / "audit-signing-key.pub.pem"))
    assert rc == 1 and "no-records" in out


@pytest.mark.parametrize(("filters", "expected"), [
    ([], ["block", "allow", "reroute", "allow"]),
    (["--decision", "block"], ["block"]),
    (["--provider", "openai"], ["block", "reroute", "allow"]),
    (["--requirement", "eu"], ["block", "allow"]),
    (["--client", "10.20.0.0/16"], ["block", "allow", "allow"]),
    (["--client", "hr-bot"], ["reroute"]),
    (["--since", "1h"], ["block", "allow", "reroute", "allow"]),
    (["--until", "2000-01-01"], []),
])
def test_show_filters_json(env, capsys, filters, expected):
    _root, _certs, d = env
    rc, out, _ = cli(capsys, "show", str(d), "--json", *filters)
    rows = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and [r["decision"] for r in rows] == expected
    for r in rows:
        assert r["outcome"]["status"] >= 200


def test_show_table(env, capsys):
    _root, _certs, d = env
    rc, out, err = cli(capsys, "show", str(d))
    assert rc == 0 and out.splitlines()[0].startswith("TIME")
    assert len(out.splitlines()) == 5 and "4 decision(s)" in err


def test_report_html_self_contained(env, capsys):
    root, certs, d = env
    html_file = root / "r.html"
    rc, out, _ = cli(capsys, "report", str(d), "--html", str(html_file),
                     "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    page = html_file.read_text()
    assert rc == 0 and "1 blocked" in out and "0 record(s) did not verify" in out
    assert page.index("Verified") < page.index("What vouches") < page.index("Blocked flows") \
        < page.index("by provider")
    assert "reason &lt;0&gt;" in page and '<meta name="viewport"' in page
    for forbidden in ("<script", "src=", "href=", "@import", "url("):
        assert forbidden not in page


@pytest.fixture(scope="module")
def browser():
    from browser import Browser

    with Browser() as b:
        yield b


def render_report(capsys, d, certs, html_file, browser, *extra):
    rc, out, _ = cli(capsys, "report", str(d), "--html", str(html_file), "--pubkey",
                     str(certs / "audit-signing-key.pub.pem"), *extra)
    views = {w: browser.render(html_file, w, screenshot=html_file.with_suffix(f".{w}.png"))
             for w in (1280, 390)}
    return rc, out, views


def test_report_rendered_intact(env, capsys, browser):
    root, certs, d = env
    rc, _out, views = render_report(capsys, d, certs, root / "r.html", browser)
    assert rc == 0
    for width, v in views.items():
        assert v.title.startswith("Verified"), v.title
        assert v.first.startswith("Verified: the audit trail is intact"), v.first
        assert v.first_top < 40  # the verdict is the first thing on the screen
        assert v.scroll_width <= v.inner_width, f"wider than {width} px"
        text = v.text
        assert text.index("What vouches") < text.index("Blocked flows (1)") \
            < text.index("Decisions by provider")
        assert "outside_requirement" in text and "451" in text  # code and status columns
        assert "reason <0>" not in text  # the prose is on demand, behind the code
        assert "no anchor given" in text
    assert "Decisions (4)" in views[1280].text


def test_report_rendered_tampered_shows_failure_first_and_counts_no_forgery(env, capsys,
                                                                           browser):
    root, certs, d = env
    seg = sorted(d.glob("gw-1-*.jsonl"))[0]
    seg.write_bytes(seg.read_bytes().replace(b'"decision":"block"', b'"decision":"allow"'))
    rc, out, views = render_report(capsys, d, certs, root / "t.html", browser)
    assert rc == 1 and "1 record(s) did not verify" in out and "FAILED" in out
    for width, v in views.items():
        assert v.title.startswith("VERIFICATION FAILED"), v.title
        assert v.first.startswith("VERIFICATION FAILED"), v.first
        assert "bad-signature" in v.first and v.first_top < 40
        assert v.scroll_width <= v.inner_width, f"wider than {width} px"
    text = views[1280].text
    # the forged allow is listed as not verified and counted nowhere: 3 genuine decisions,
    # two of them allow, none blocked
    assert "Records that did not verify (1)" in text
    assert "Decisions (3)" in text and "Blocked flows (0)" in text
    row = text[text.index("Decisions (3)"):].splitlines()
    assert any(line.split() == ["2", "0", "1", "0", "3"] for line in row), row[:6]
    unverified = text[text.index("Records that did not verify"):]
    assert "did not verify\t1\tdecision\tallow" in unverified


def test_report_size_is_bounded(tmp_path, capsys, key, certs):
    """Many distinct clients, many blocked decisions: the page stays small."""
    d = tmp_path / "audit"
    w = AuditWriter(d, key, ORIGIN)
    w.open()
    for i in range(0, 3000, 50):
        w.append_batch([("decision", {
            "client": f"10.{j % 250}.{j // 250}.1", "user": None, "provider": f"p{j % 40}",
            "requirement": [f"r{j % 30}"], "decision": "block", "code": f"c{j % 25}",
            "status": 451, "reason": "why " * 50, "enforced": True})
            for j in range(i, i + 50)])
    w.close_sync()
    html_file = tmp_path / "big.html"
    rc, out, _ = cli(capsys, "report", str(d), "--html", str(html_file),
                     "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    assert rc == 0 and "3000 decision(s), 3000 blocked" in out
    page = html_file.read_text()
    assert len(page) < 150_000
    assert "residency-gate audit show --decision block" in page  # the rest, by command


def test_verify_modes_and_from_checkpoint_cli(env, capsys):
    _root, certs, d = env
    pub = str(certs / "audit-signing-key.pub.pem")
    rc, out, _ = cli(capsys, "verify", str(d), "--pubkey", pub, "--thorough", "--json")
    data = json.loads(out)
    assert rc == 0 and data["mode"] == "thorough" and data["ok"]
    o = data["origins"][ORIGIN]
    assert o["signatures_checked"] == o["records"]
    rc, out, _ = cli(capsys, "verify", str(d), "--pubkey", pub, "--json")
    o = json.loads(out)["origins"][ORIGIN]
    assert rc == 0 and o["checkpoints_verified"] >= 1 and o["signatures_checked"] < o["records"]
    cpline = (d / "checkpoints-gw-1.jsonl").read_text().splitlines()[-1]
    rc, out, _ = cli(capsys, "verify", str(d), "--pubkey", pub, "--from-checkpoint", cpline)
    assert rc == 0 and "intact" in out  # the log starts at 0: verified from 0
    rc, _out, err = cli(capsys, "verify", str(d), "--pubkey", pub, "--from-checkpoint", "{}")
    assert rc == 2 and "--from-checkpoint" in err
    rc, _out, err = cli(capsys, "verify", str(d), "--pubkey", pub, "--thorough", "--jobs", "0")
    assert rc == 2 and "--jobs" in err


def test_show_streams_with_a_bounded_wait_for_outcomes():
    import argparse

    from residency_gate.cli.audit import iter_decisions

    args = argparse.Namespace(decision=None, provider=None, requirement=None, client=None,
                              since=None, until=None)

    def dec(n):
        return ("f", n, {"kind": "decision", "id": f"o:{n}", "seq": n, "decision": "allow"})

    def out(n):
        return ("f", n, {"kind": "outcome", "decision_id": f"o:{n}", "status": 200})

    # 0's outcome comes late (a long stream), 1 and 2 complete at once
    records = [dec(0), dec(1), out(1), dec(2), out(2), out(0)]
    rows = list(iter_decisions(records, args))
    assert [r["id"] for r in rows] == ["o:0", "o:1", "o:2"]  # chain order
    assert all(r["outcome"]["status"] == 200 for r in rows)
    late = [0]
    rows = list(iter_decisions(records, args, window=1, late=late))
    assert [r["id"] for r in rows] == ["o:0", "o:1", "o:2"]
    assert rows[0]["outcome"] is None and late == [1]  # held back at most `window` rows


def test_rotate_key_cli(env, capsys):
    _root, certs, _d = env
    old = load_or_create_signing_key(certs).key_id
    rc, out, _ = cli(capsys, "rotate-key", "--certs", str(certs))
    assert rc == 0 and old in out
    assert load_or_create_signing_key(certs).key_id != old
    shutil.rmtree(certs)
    rc, _out, err = cli(capsys, "rotate-key", "--certs", str(certs))
    assert rc == 2 and "nothing to rotate" in err


def test_parse_time():
    assert parse_time("2026-11-28T07:24:10Z").year == 2026
    assert parse_time("2026-11-28").hour == 0


def test_report_counts_report_mode_and_lists_config_records(tmp_path, capsys, key, certs):
    d = tmp_path / "audit"
    w = AuditWriter(d, key, ORIGIN)
    w.open()
    w.append_batch([
        ("config", {"revisions": {"catalog": "c1", "config": "k1"}, "config_file": "gw.yaml",
                    "catalog_files": [], "reason": "start"}),
        ("decision", {"client": "10.0.0.1", "user": None, "provider": "openai",
                      "requirement": ["eu"], "decision": "block", "enforced": False,
                      "code": "outside_requirement", "status": 0, "reason": "would block",
                      "revisions": {"catalog": "c1", "config": "k1"}}),
        ("decision", {"client": "10.0.0.2", "user": None, "provider": "openai",
                      "requirement": ["eu"], "decision": "block", "enforced": True,
                      "code": "outside_requirement", "status": 451, "reason": "blocked"}),
    ])
    w.close_sync()
    html_file = tmp_path / "r.html"
    rc, out, _ = cli(capsys, "report", str(d), "--html", str(html_file),
                     "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    page = html_file.read_text()
    assert rc == 0 and "2 decision(s), 1 blocked" in out  # report mode is not a block
    assert "Configuration in force (1 config record(s))" in page
    assert "catalog c1, config k1" in page and "gw.yaml" in page
    assert 'data-label="report (not enforced)">1<' in page  # counted apart from blocks
    assert 'data-label="block">1<' in page and "Blocked flows (1)" in page
