"""Fuzzing `residency-gate check`: no traceback, no hang, no blow-up, on any file.

A fixed, seeded set of cases (the same every run): random text mutations of a valid
config and of a catalog provider file, structured mutations (a weird value at a real
key), and the known bombs (alias expansion, deep flow and block nesting, odd tags, huge
numbers, NUL and control bytes, huge files). One child process runs the real `check`
on every case in turn under RLIMIT_AS; each case gets CASE_SECONDS or the child is
killed and the case named. Every answer must be exit 0, or exit 1 with nothing but
`file:line: message` lines.
"""

from __future__ import annotations

import copy
import json
import random
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from test_check import PROVIDER as ONE_ENDPOINT

SEED = 20261129
MUTATED_CONFIGS = 160
STRUCTURED = 80
MUTATED_CATALOGS = 50
CASE_SECONDS = 5.0  # per case, including a full catalog load
MEMORY_LIMIT = 2 << 30  # RLIMIT_AS of the child: a 2.4 GB alias bomb cannot fit
RSS_GROWTH_KB = 150 << 10  # peak RSS may grow by this much over the whole run

CONFIG = """\
listen: 127.0.0.1:8080
mode: regular
admin: 127.0.0.1:9464
workers: 1
certs_dir: certs
resolve: {api.openai.com: "127.0.0.1:9443"}
residency:
  header: X-Data-Residency
  zones: {emea-safe: [eea, ch, gb]}
  default: null
  clients:
    - {cidr: 10.20.0.0/16, require: eu}
    - {user: hr-bot, require: de}
  on_violation: block
azure:
  resources:
    myres-eu: {region: swedencentral, deployments: {gpt4o: DataZoneStandard}}
private_endpoints:
  - name: onprem
    url: https://llm.internal:8443/v1
    region: private
    models: {gpt-4o: llama-3.3-70b}
audit:
  dir: var/audit
  fsync: group
limits:
  request_body_bytes: 33554432
  decision_timeout_seconds: 10
log:
  format: text
"""

PROVIDER = ONE_ENDPOINT + """\
  - id: geo
    name: Acme regional
    hosts: ['{geo}.api.acme.example']
    model:
      - {body: model}
    locate: {from: host, capture: geo, values: {eu: [eu], us: {processing: [us], storage: [us]}}}
    source: https://acme.example/docs
    reviewed: 2026-11-28
"""

ODD_CHARS = [*":-[]{}&*!|>'\"#%@`,?~\t\n ", "\x00", "\x07", "\x1b", "\x7f", "\ufeff", "\u2028",
             "\u00e9", "\U0001f600", "\r"]
SNIPPETS = [
    "&a ", "*a", "&a [1, 2]", "!!int xyz", "!!float abc", "!!bool maybe", "!!str 1",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary AAAA",
    "!!timestamp 2001-12-14", "!!set {a}", "!!omap [a: 1]", "!custom x", "! x", "9" * 5000,
    "-" + "9" * 4400, "0x" + "f" * 5000, "1e99999", ".nan", "-.inf", "0o7777777777777",
    "<<: {a: 1}", "? [a, b]\n: c", '"\\x00"', '"\\u0000"', "~", "yes", "no", "on",
    "2026-13-45", "1:2:3:4:5", "%YAML 1.1\n---\n", "%TAG ! tag:x,2000:\n---\n", "\n---\n",
    "\n...\n", "'" * 3, "|\n  block", ">-\n  folded", "[" * 500, "{" * 500, "x" * 2000,
    "\x00", "\x01\x02", "\ud800", "\t- a",
]


def alias_bomb(levels: int, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def bombs() -> list[str]:
    """The shapes that broke `check` before (issue 10), and their neighbours."""
    return [
        alias_bomb(9), alias_bomb(12, 10), "residency:\n  zones:\n" + alias_bomb(6, 20),
        "[" * 200_000, "{" * 200_000, "- " * 50_000 + "x\n",
        "".join(" " * i + "k:\n" for i in range(3000)),
        "".join(" " * i + "k:\n" for i in range(1300)),
        "listen: !!int xyz\n", "limits: {request_body_bytes: !!float abc}\n",
        "workers: " + "9" * 5000 + "\n", "limits:\n  request_body_bytes: " + "1" * 4000 + "\n",
        "limits: {decision_timeout_seconds: .nan}\n", "limits: {decision_timeout_seconds: 1e400}\n",
        "listen: 127.0.0.1:8080\x00\n", "log:\n  format: te\x07xt\n", "\x00" * 100,
        "a: b\n" * 30_000, "x: " + "y" * (2 << 20) + "\n", "k" * 2000 + ": v\n",
        "residency:\n  zones:\n" + "".join(f"    z{i}: [de]\n" for i in range(5000)),
        "!!python/object/apply:os.system ['echo pwned']\n", "--- !!map\n? a\n: b\n",
        "residency: {clients: [{cidr: '" + "1" * 3000 + "', require: eu}]}\n",
        "workers: 0x" + "f" * 5000 + "\n",  # no digit limit on hex: jsonschema's repr raised
        "private_endpoints: [{name: x, url: 'https://a:b:1/v1', region: private, "
        "models: {a: b}}]\n",  # a port that is not a number raised in urlsplit
        "\ufeff" + CONFIG, CONFIG.replace("\n", "\r\n"), CONFIG.encode("utf-16").decode("latin-1"),
    ]


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(text) + 1)
        if op == 0:
            text = text[:pos] + rng.choice(ODD_CHARS) + text[pos + 1:]
        elif op == 1:
            text = text[:pos] + rng.choice(SNIPPETS) + text[pos:]
        elif op == 2:
            end = min(len(text), pos + rng.randint(1, 40))
            text = text[:pos] + text[end:]
        elif op == 3:
            lines = text.splitlines(keepends=True)
            if lines:
                i = rng.randrange(len(lines))
                lines.insert(i, lines[i] * rng.randint(1, 3))
                text = "".join(lines)
        elif op == 4:
            lines = text.splitlines(keepends=True)
            if lines:
                i = rng.randrange(len(lines))
                lines[i] = " " * rng.randint(0, 6) + lines[i].lstrip(" ")
                text = "".join(lines)
        elif op == 5:
            text = text[:pos]
        elif op == 6:
            lines = text.splitlines(keepends=True)
            rng.shuffle(lines)
            text = "".join(lines)
        else:  # a value replaced by something odd
            text = re.sub(r": [^\n{]+", lambda m: ": " + rng.choice(SNIPPETS)
                          if rng.random() < 0.2 else m.group(0), text, count=3)
    return text


WEIRD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, 10**300, -(10**50), 0.5, -1e-9, 1e308, "", " ",
    "x" * 500, "\u00e9\u00e8", "127.0.0.1:99999", "[::1]:8080", "0.0.0.0:0", "eu", "nowhere",
    [], [None], [1, [2, [3]]], {}, {"a": {"b": {"c": None}}}, ["eu", 5], "10.0.0.0/8",
    "upstream:http://x:1", "local", "reverse:https://x", "wireguard", "@/nonexistent",
    "../../../../etc/passwd", "/dev/zero",
]


def structured(rng: random.Random) -> str:
    """The valid config with one weird value at a real key (or a new one)."""
    data = yaml.safe_load(CONFIG)
    paths: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(data, ())
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths[1:])
        key = path[-1] if rng.random() < 0.85 else f"extra{rng.randint(0, 9)}"
        try:  # an earlier change may have replaced a parent
            parent = data
            for part in path[:-1]:
                parent = parent[part]
            parent[key] = copy.deepcopy(rng.choice(WEIRD_VALUES))
        except (TypeError, IndexError, KeyError):
            continue
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_cases(root: Path) -> Path:
    rng = random.Random(SEED)
    cases = root / "cases"
    catalogs = root / "catalogs"
    cases.mkdir()
    catalogs.mkdir()
    texts: list[str] = list(bombs())
    texts += [mutate(CONFIG, rng) for _ in range(MUTATED_CONFIGS)]
    texts += [structured(rng) for _ in range(STRUCTURED)]
    for i in range(MUTATED_CATALOGS):  # a config naming one mutated provider file
        provider = catalogs / f"provider-{i:03}.yaml"
        provider.write_bytes(mutate(PROVIDER, rng).encode("utf-8", "surrogatepass"))
        texts.append(f"catalog: [{json.dumps(str(provider))}]\n")
    for i, text in enumerate(texts):
        (cases / f"case-{i:04}.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
    return cases


LOCATED = re.compile(r"^.+:\d+: \S.*$")


@pytest.mark.slow
def test_check_survives_fuzzed_configs_and_catalogs(tmp_path):
    cases = write_cases(tmp_path)
    total = len(list(cases.glob("case-*.yaml")))
    child = Path(__file__).with_name("check_fuzz_child.py")
    proc = subprocess.Popen([sys.executable, str(child), str(cases), str(MEMORY_LIMIT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    results: dict[str, dict] = {}
    current, started, baseline = None, time.monotonic(), None
    slowest = (0.0, "")
    try:
        while len(results) < total:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    pytest.fail(f"check died (exit {proc.returncode}) on {current}:\n"
                                f"{proc.stderr.read()[-3000:]}")
                if current and time.monotonic() - started > CASE_SECONDS:
                    pytest.fail(f"check hung on {current} (> {CASE_SECONDS:g}s):\n"
                                f"{(cases / current).read_bytes()[:300]!r}")
                continue
            line = proc.stdout.readline()
            if not line:
                continue
            msg = json.loads(line)
            if "begin" in msg:
                current, started = msg["begin"], time.monotonic()
                continue
            took = time.monotonic() - started
            slowest = max(slowest, (took, msg["case"]))
            results[msg["case"]] = msg
            assert "crash" not in msg, (
                f"check raised on {msg['case']}:\n{msg['crash']}\ninput: "
                f"{(cases / msg['case']).read_bytes()[:300]!r}")
            baseline = baseline or msg["maxrss_kb"]
            assert msg["rc"] in (0, 1), msg
            bad = [ln for ln in msg["lines"] if not LOCATED.match(ln)]
            assert not bad, (f"{msg['case']}: not `file:line: message`: {bad[:3]}\ninput: "
                             f"{(cases / msg['case']).read_bytes()[:300]!r}")
            if msg["rc"] == 1:
                assert msg["lines"], f"{msg['case']}: exit 1 without a message"
    finally:
        proc.kill()
        proc.wait()
    peak = max(r["maxrss_kb"] for r in results.values())
    assert peak - baseline < RSS_GROWTH_KB, f"RSS grew {peak - baseline} kB (max {slowest})"
    failed = sum(r["rc"] == 1 for r in results.values())
    assert 0 < failed < total  # the corpus has both valid and invalid files
    print(f"{total} cases, {failed} refused, slowest {slowest[0]:.2f}s ({slowest[1]}), "
          f"peak RSS {peak} kB")
