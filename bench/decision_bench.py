"""Decision engine micro-benchmark: decisions/s and µs per call of the pure engine.

    .venv/bin/python bench/decision_bench.py [--quick] [--seconds S]

No network, no proxy: builds a Policy from the shipped catalog plus a small config
(Azure resources, a client CIDR rule) and calls ``Bundle.decide`` (core.decision.decide) in a tight loop,
first per kind of request, then on a round-robin mix. Also times catalog load and
policy compilation (what `run`, `check` and a SIGHUP reload pay once).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from residency_gate.catalog.bundle import build_bundle, load_bundle
from residency_gate.catalog.compile import load_catalog
from residency_gate.catalog.config import load_config
from residency_gate.core.request import Request as RequestInfo

CONFIG = """\
azure:
  resources:
    myres-eu:
      region: swedencentral
      deployments: {gpt4o-dz: DataZoneStandard, gpt4o-global: GlobalStandard}
residency:
  clients:
    - {cidr: 10.20.0.0/16, require: eu}
"""

CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello " * 20}]}).encode()
CLAUDE = json.dumps({"model": "claude-opus-4-6", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "hi"}]}).encode()
GEMINI = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}).encode()
CONVERSE = json.dumps({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}).encode()
VERTEX = "/v1/projects/p/locations/europe-west4/publishers/google/models/gemini-2.5-flash:generateContent"
BEDROCK_PLAIN = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
BEDROCK_EU = "/model/eu.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"


def req(host: str, path: str, body: bytes | None, tags: tuple[str, ...] = (),
        client: str = "192.0.2.10") -> RequestInfo:
    return RequestInfo(method="POST", scheme="https", host=host, port=443, path=path,
                       tag_values=tags, body=body, client_ip=client)


# (label, request, expected verdict)
CASES: list[tuple[str, RequestInfo, str]] = [
    ("not an LLM host (tunnel)", req("www.example.com", "/", None), "allow"),
    ("untagged openai", req("api.openai.com", "/v1/chat/completions", CHAT), "allow"),
    ("allow vertex eu-west4 tag eu", req("europe-west4-aiplatform.googleapis.com", VERTEX, GEMINI,
                                          ("eu",)), "allow"),
    ("block openai tag eu +advice", req("api.openai.com", "/v1/chat/completions", CHAT, ("eu",)),
     "block"),
    ("block anthropic (CIDR rule)", req("api.anthropic.com", "/v1/messages", CLAUDE,
                                         client="10.20.3.4"), "block"),
    ("allow bedrock %3A plain model", req("bedrock-runtime.eu-central-1.amazonaws.com",
                                           BEDROCK_PLAIN, CONVERSE, ("eu",)), "allow"),
    ("block bedrock eu. profile %3A", req("bedrock-runtime.eu-central-1.amazonaws.com",
                                           BEDROCK_EU, CONVERSE, ("eu",)), "block"),
    ("allow azure DataZone (config)", req("myres-eu.openai.azure.com",
                                           "/openai/deployments/gpt4o-dz/chat/completions"
                                           "?api-version=2024-10-21", CHAT, ("eu",)), "allow"),
    ("block azure Global (config)", req("myres-eu.openai.azure.com",
                                         "/openai/deployments/gpt4o-global/chat/completions"
                                         "?api-version=2024-10-21", CHAT, ("eu",)), "block"),
    ("unknown tag -> 400", req("api.openai.com", "/v1/chat/completions", CHAT, ("atlantis",)),
     "block"),
]


def bench_calls(policy, requests: list[RequestInfo], seconds: float) -> tuple[int, float]:
    """Call decide() round-robin over `requests` for ~seconds; return (calls, elapsed)."""
    n = len(requests)
    batch = 200 * n
    calls = 0
    gc.collect()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for i in range(batch):
            policy.decide(requests[i % n])
        calls += batch
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - t0


def time_it(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~7 s instead of ~30 s")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per measurement")
    args = ap.parse_args()
    per = args.seconds or (0.3 if args.quick else 2.0)
    loads = 3 if args.quick else 10

    with tempfile.TemporaryDirectory(prefix="decision-bench-") as tmp:
        cfg = Path(tmp) / "residency-gate.yaml"
        cfg.write_text(CONFIG)

        # -- load / compile -------------------------------------------------------
        config = load_config(cfg)
        load_t = time_it(lambda: load_catalog(config.catalog), loads)
        catalog = load_catalog(config.catalog)
        build_t = time_it(lambda: build_bundle(config, catalog), loads)
        full_t = time_it(lambda: load_bundle(cfg), loads)
        policy = load_bundle(cfg)
        print(f"catalog: {len(catalog.endpoints)} endpoints, revision {catalog.revision}")
        print(f"{'load/compile step':34} {'median ms':>10} {'min ms':>8}")
        for label, ts in (("load_catalog (YAML+schema+compile)", load_t),
                          ("build_bundle (config compile)", build_t),
                          ("load_bundle (all of it)", full_t)):
            print(f"{label:34} {1000 * statistics.median(ts):10.1f} {1000 * min(ts):8.1f}")
        print()

        # -- sanity: every case decides as expected -------------------------------
        for label, r, verdict in CASES:
            d = policy.decide(r)
            if d.verdict != verdict:
                print(f"UNEXPECTED: {label}: {d.verdict} ({d.code}) {d.reason}", file=sys.stderr)
                return 1

        # -- per case -------------------------------------------------------------
        print(f"{'request kind':34} {'decisions/s':>12} {'µs/call':>8}")
        rates = []
        for label, r, _ in CASES:
            calls, elapsed = bench_calls(policy, [r], per)
            rates.append(calls / elapsed)
            print(f"{label:34} {calls / elapsed:12,.0f} {1e6 * elapsed / calls:8.2f}")
        calls, elapsed = bench_calls(policy, [r for _, r, _ in CASES], per * 2)
        print(f"{'MIX (round-robin of the above)':34} {calls / elapsed:12,.0f} "
              f"{1e6 * elapsed / calls:8.2f}")
        print()
        print(f"slowest/fastest kind: {max(rates) / min(rates):.1f}x; mix: "
              f"{1e6 * elapsed / calls:.1f} µs per decision (compare with the proxy's CPU per "
              "request in proxy_bench.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
