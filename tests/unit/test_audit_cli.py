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
                "decision": dec, "reason": f"reason <{i}>", "body_sha256": "00" * 32})
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


def test_report_html(env, capsys):
    root, certs, d = env
    html_file = root / "r.html"
    rc, out, _ = cli(capsys, "report", str(d), "--html", str(html_file),
                     "--pubkey", str(certs / "audit-signing-key.pub.pem"))
    page = html_file.read_text()
    assert rc == 0 and "1 blocked" in out
    assert page.index("Verification") < page.index("Blocked flows") < page.index("by provider")
    assert "INTACT" in page and "reason &lt;0&gt;" in page and "<script" not in page
    assert "http://" not in page.replace("https://api.", "") and "src=" not in page


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
