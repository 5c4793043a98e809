"""`residency-gate check`: every problem as file:line: message, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from residency_gate.catalog.data import shipped_dir

SHIPPED_CATALOG = shipped_dir()

CLI = [sys.executable, "-m", "residency_gate"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_shipped_catalog_and_defaults_are_valid(tmp_path):
    r = run("check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "providers" in r.stdout


BAD_CONFIGS = [
    ("listen: 127.0.0.1:8080\nlisten_port: 9\n", 2, "unknown key 'listen_port'"),
    ("residency:\n  default: atlantis\n", 2, "unknown region or zone 'atlantis'"),
    ("residency:\n  clients:\n    - {cidr: 10.0.0.0/33, require: eu}\n", 3, "10.0.0.0/33"),
    ("residency:\n  zones:\n    eu: [de]\n", 3, "shadows a region"),
    ("residency:\n  on_violation: explode\n", 2, "'explode' is not one of"),
    ("azure:\n  resources:\n    r1: {region: marsnorth}\n", 3, "unknown Azure region"),
    ("audit:\n  fsync: sometimes\n", 2, "sometimes"),
    ("listen: [1, 2\n", 2, "invalid YAML"),
    ("admin: nowhere\n", 1, "not valid"),
    ("residency:\n  header: X-Data-Residency\n  header: X-Other\n", 3, "duplicate key"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_CONFIGS)
def test_bad_config_is_reported_with_its_line(tmp_path, text, line, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"{cfg}:{line}: " in r.stderr, r.stderr
    assert message in r.stderr


PROVIDER = """\
provider: acme
name: Acme
api: openai
source: https://acme.example/docs
reviewed: 2026-11-28
endpoints:
  - id: main
    name: Acme API
    hosts: [api.acme.example]
    places: [eu]
    source: https://acme.example/docs
    reviewed: 2026-11-28
"""

BAD_CATALOGS = [
    (PROVIDER.replace("places: [eu]", "places: [atlantis]"), 10, "unknown region 'atlantis'"),
    (PROVIDER.replace("    places: [eu]\n", "    places: [eu]\n    colour: blue\n"), 11,
     "unknown key 'colour'"),
    (PROVIDER.replace("api.acme.example", "api.openai.com"), 9, "claimed by"),
    (PROVIDER.replace("hosts: [api.acme.example]", "hosts: ['{x}.openai.azure.com']"), 9,
     "overlaps"),
    (PROVIDER.replace("places: [eu]", "locate: {from: host, capture: region, cloud: aws}"), 10,
     "rule can never match"),
    (PROVIDER.replace("hosts: [api.acme.example]", "hosts: ['{geo}.acme.example']").replace(
        "places: [eu]", "locate: {from: host, capture: geo, values: {eu.west: [eu]}}"), 10,
     "rule can never match"),
    (PROVIDER.replace("reviewed: 2026-11-28\nendpoints", "reviewed: yesterday\nendpoints"), 5,
     "does not match"),
    (PROVIDER.replace("hosts: [api.acme.example]", "hosts: ['api.{x}.example']"), 9,
     "last two labels"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD_CATALOGS)
def test_bad_catalog_is_reported_with_its_line(tmp_path, text, line, message):
    extra = tmp_path / "acme.yaml"
    extra.write_text(text)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"catalog: [{extra}]\n")
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1, r.stdout
    assert "Traceback" not in r.stderr
    assert f"{extra}:{line}: " in r.stderr, r.stderr
    assert message in r.stderr


def test_extra_catalog_loads_and_replaces(tmp_path):
    extra = tmp_path / "acme.yaml"
    extra.write_text(PROVIDER)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"catalog: [{extra}]\n")
    assert run("check", "-c", str(cfg)).returncode == 0
    r = run("explain", "-c", str(cfg), "https://api.acme.example/v1/x", "--tag", "eu", "--json")
    assert r.returncode == 0 and '"compliant"' in r.stdout


def test_broken_regions_file_in_a_replacement_dir(tmp_path):
    cat = tmp_path / "cat"
    cat.mkdir()
    shutil.copy(SHIPPED_CATALOG / "regions.yaml", cat / "regions.yaml")
    text = (cat / "regions.yaml").read_text().replace('"no": Norway', "no: Norway", 1)
    (cat / "regions.yaml").write_text(text)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"catalog: [{cat}]\n")
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1
    assert "quote it" in r.stderr, r.stderr


def test_missing_config_file(tmp_path):
    r = run("check", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_explain_text_tells_the_developer_what_to_change(tmp_path):
    r = run("explain", "https://aiplatform.googleapis.com/v1/projects/p/locations/global/"
            "publishers/google/models/gemini-2.5-flash:generateContent", "--tag", "eu",
            cwd=tmp_path)
    assert r.returncode == 1
    assert "BLOCK (HTTP 451)" in r.stdout
    assert "europe-west" in r.stdout  # a compliant location is named
    r = run("explain", "not a url", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_script_paths_exist():
    assert Path(SHIPPED_CATALOG / "schema" / "config.schema.json").exists()


def _yaml_block(text: str, after: str) -> str:
    import re

    start = text.index(after) if after else 0
    return re.search(r"```yaml\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.parametrize(
    ("doc", "after"),
    [
        (Path(__file__).resolve().parents[2] / "README.md", "## Configuration"),
        (Path(__file__).resolve().parents[3] / "shared" / "interface.md", "## Config file"),
    ],
    ids=["README", "interface.md"],
)
def test_documented_config_examples_pass_check(tmp_path, doc, after):
    """The config blocks people copy from must be valid configs."""
    if not doc.exists():
        pytest.skip(f"{doc} not beside this checkout")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_yaml_block(doc.read_text(), after))
    r = run("check", "-c", str(cfg))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("line", "message"), [
    ('mode: "reverse:not a url"', "mitmproxy refuses the options"),
    ('mode: "upstream:not a url"', "mitmproxy refuses the options"),
    ('proxy_auth: "ldap:nonsense"', "mitmproxy refuses the options"),
])
def test_check_agrees_with_run_on_mitmproxy_options(tmp_path, line, message):
    """Regression: `check` passed `mode: "reverse:not a url"`, then `run` died with a
    traceback. Both now ask mitmproxy itself."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(line + "\n")
    r = run("check", "-c", str(cfg))
    assert r.returncode == 1, r.stdout
    assert message in r.stderr and "Traceback" not in r.stderr
    r = run("run", "-c", str(cfg))  # refuses before listening, the same way
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
