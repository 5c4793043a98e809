"""The PAC file, evaluated for real by a JavaScript engine (node)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from residency_gate.ops.pac import pac_file, pattern_regex, proxy_directive

NODE = shutil.which("node") or shutil.which("nodejs")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node is not installed: cannot evaluate the PAC file in a JS engine"
)

# Runs the PAC in a bare context (no PAC helper functions: the file must not need
# them) and prints {host: FindProxyForURL("https://host/", host)}.
RUNNER = r"""
const vm = require("vm");
const fs = require("fs");
const ctx = vm.createContext({});
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx, {filename: "proxy.pac"});
const hosts = JSON.parse(fs.readFileSync(0, "utf8"));
const out = {};
for (const h of hosts) out[h] = ctx.FindProxyForURL("https://" + h + "/x", h);
process.stdout.write(JSON.stringify(out));
"""

PATTERNS = [
    "api.openai.com",
    "api.anthropic.com",
    "{resource}.openai.azure.com",
    "bedrock-runtime.{region}.amazonaws.com",
    "{location}-aiplatform.googleapis.com",
    "{geo}.api.openai.com",
]
PROXY = "proxy.corp.example:8080"

CASES = {
    # exact names, any case, trailing dot
    "api.openai.com": True,
    "API.OpenAI.com": True,
    "api.openai.com.": True,
    "api.anthropic.com": True,
    # captures: one label part each
    "myres.openai.azure.com": True,
    "my-res-01.openai.azure.com": True,
    "bedrock-runtime.eu-central-1.amazonaws.com": True,
    "Bedrock-Runtime.US-EAST-1.amazonaws.com.": True,
    "europe-west4-aiplatform.googleapis.com": True,
    "us-central1-aiplatform.googleapis.com": True,
    "eu.api.openai.com": True,
    # a capture never spans labels, never matches empty
    "a.b.openai.azure.com": False,
    "openai.azure.com": False,
    ".openai.azure.com": False,
    "bedrock-runtime.amazonaws.com": False,
    "bedrock-runtime.a.b.amazonaws.com": False,
    "-aiplatform.googleapis.com": False,
    "x.europe-west4-aiplatform.googleapis.com": False,
    "aiplatform.googleapis.com": False,
    "x.y.api.openai.com": False,
    # look-alikes and suffix tricks
    "api.openai.com.evil.example": False,
    "evilapi.openai.com.": False,  # not {geo}.api.openai.com: there is no 'api' label
    "xapi.openai.com": False,
    "api-openai.com": False,
    "apixopenai.com": False,
    "myres.openai.azure.com.evil.example": False,
    "myres_x.openai.azure.com": False,
    "bedrock-runtimeXeu-central-1.amazonaws.com": False,
    # everything else goes direct
    "example.com": False,
    "github.com": False,
    "pypi.org": False,
    "localhost": False,
    "10.1.2.3": False,
    "": False,
}


def evaluate(pac: str, hosts: list[str], tmp_path: Path) -> dict[str, str]:
    pac_path = tmp_path / "proxy.pac"
    pac_path.write_text(pac)
    runner = tmp_path / "run.js"
    runner.write_text(RUNNER)
    proc = subprocess.run(
        [NODE, str(runner), str(pac_path)],
        input=json.dumps(hosts),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@needs_node
def test_pac_sends_only_catalog_hosts_through_the_proxy(tmp_path):
    pac = pac_file(PATTERNS, PROXY)
    result = evaluate(pac, list(CASES), tmp_path)
    wrong = {
        h: got
        for h, got in result.items()
        if got != (f"PROXY {PROXY}" if CASES[h] else "DIRECT")
    }
    assert not wrong, wrong


@needs_node
def test_pac_agrees_with_python_regexes(tmp_path):
    """The same regexes, evaluated by Python re, give the same answers as node."""
    regexes = [re.compile(pattern_regex(p)) for p in PATTERNS]
    result = evaluate(pac_file(PATTERNS, PROXY), list(CASES), tmp_path)
    for host, got in result.items():
        h = host.lower().removesuffix(".")
        py = any(r.match(h) for r in regexes)
        assert (got != "DIRECT") == py, host


@needs_node
def test_pac_for_the_shipped_catalog(tmp_path):
    """Every host of the real catalog is proxied; ordinary sites are not."""
    try:
        from residency_gate.catalog.compile import load_catalog
    except ImportError:  # pragma: no cover
        pytest.skip("catalog module not available")
    catalog = load_catalog()
    patterns = catalog.host_patterns()
    assert patterns
    hosts = []
    for p in patterns:
        hosts.append(re.sub(r"\{[^}]+\}", "x1-y", p))
        hosts.append(re.sub(r"\{[^}]+\}", "abc", p).upper() + ".")
    direct = ["example.com", "www.google.com", "github.com", "login.microsoftonline.com"]
    result = evaluate(pac_file(patterns, "10.0.0.1:3128"), hosts + direct, tmp_path)
    for h in hosts:
        assert result[h] == "PROXY 10.0.0.1:3128", h
        assert catalog.match(h) is not None, h  # the catalog agrees it is an LLM host
    for h in direct:
        assert result[h] == "DIRECT", h
        assert catalog.match(h) is None, h


@needs_node
def test_empty_pattern_list_is_valid_js_and_all_direct(tmp_path):
    result = evaluate(pac_file([], PROXY), ["api.openai.com"], tmp_path)
    assert result == {"api.openai.com": "DIRECT"}


def test_pac_is_deterministic_and_has_no_direct_fallback():
    a = pac_file(PATTERNS, PROXY)
    b = pac_file([*list(reversed(PATTERNS)), "API.OPENAI.COM."], PROXY)
    assert a == b
    assert f'"PROXY {PROXY}"' in a
    assert "PROXY proxy.corp.example:8080; DIRECT" not in a
    assert "function FindProxyForURL(url, host)" in a


def test_proxy_directive_validation():
    assert proxy_directive("proxy:8080") == "PROXY proxy:8080"
    assert proxy_directive("PROXY 10.0.0.1:3128") == "PROXY 10.0.0.1:3128"
    assert proxy_directive("a:1, b:2") == "PROXY a:1; PROXY b:2"
    assert proxy_directive("[::1]:8080") == "PROXY [::1]:8080"
    for bad in ("proxy", "proxy:", "proxy:0", "proxy:99999", "http://proxy:8080", "a b:1", "",
                'x";alert(1);"', "a:1\nb:2"):
        with pytest.raises(ValueError):
            proxy_directive(bad)


def test_invalid_host_patterns_are_refused():
    for bad in ("", "api.*.com", "a..b.com", ".a.com", "a/b.com", 'a".com', "a b.com",
                "{}.x.com", "{x.com"):
        with pytest.raises(ValueError):
            pattern_regex(bad)
    with pytest.raises(ValueError):
        pac_file(["ok.com", "bad pattern"], PROXY)
