"""Proxy benchmark: bare mitmdump vs `residency-gate run` against the same fake provider.

    .venv/bin/python bench/proxy_bench.py [--quick] [--clients K] [--seconds S]

Starts the e2e fake provider (tests/e2e/fakeprovider.py, own process), bare mitmdump with
the options residency-gate sets (connection_strategy=lazy, the same upstream trust
bundle), a mitmdump with a 5-line addon that answers 451 itself (the baseline for a
refusal), and residency-gate with its audit log on (default, fsync group) and off
(RESIDENCY_GATE_BENCH_NO_AUDIT=1, benchmark only). Then, on loopback only:

1. throughput: K clients, each over one keep-alive connection through the proxy (CONNECT
   + TLS), POST /v1/chat/completions back to back: allowed (tag satisfied), blocked (451
   from the proxy), untagged; requests/s, p50/p99 latency, ratios.
2. the audit's cost: allowed and blocked with audit on vs off, interleaved.
3. SSE: time to the first byte vs the whole stream, through each proxy.
4. mitmproxy's connection_strategy, eager vs lazy, under K concurrent clients, with
   keep-alive and with a new connection per request (stalls: p99, max, errors).
5. `resolve` (CONNECT api.openai.com:443, redirected by residency-gate): keep-alive check.

Every process is stopped at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    TAG_HEADER,
    FakeServer,
    ProxyProc,
    Result,
    direct,
    header,
    load,
    row,
    sse_once,
    start_mitmdump,
    start_rg,
    stream_memory,
    through,
    workdir_base,
)


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}" if b else "  n/a"


def cpu_per_request(base: Path, fake: FakeServer, procs: list[ProxyProc], *, clients: int,
                    seconds: float, warmup: float, rounds: int) -> None:
    """Section 0: CPU seconds of each proxy's process tree (proxy + audit writer child) per
    request, the figure that holds on a shared machine; rounds interleaved, medians."""
    with ThreadPoolExecutor() as pool:
        futures = [
            pool.submit(start_mitmdump, base / "bare", fake, pass_through=True,
                        name="mitmdump -q + pass-through addon"),
            pool.submit(start_mitmdump, base / "bare451", fake, answer_451=True,
                        name="mitmdump -q + 451 addon"),
            pool.submit(start_rg, base / "rg-cpu", fake),
            pool.submit(start_rg, base / "rg-reroute", fake, name="residency-gate reroute",
                        extra={"residency": {"on_violation": "reroute"}}),
            pool.submit(start_rg, base / "rg-noaudit", fake, audit=False,
                        name="residency-gate, audit off"),
        ]
        for f in futures:
            if f.exception() is None:
                procs.append(f.result())
        bare, bare451, rg, rr, noaudit = (f.result() for f in futures)
    cases = {
        "bare mitmdump, forwarded": (bare, {}),
        "bare mitmdump, 451 from an addon": (bare451, {}),
        "gate allowed, forwarded": (rg, {TAG_HEADER: "global"}),
        "gate blocked (451, no upstream)": (rg, {TAG_HEADER: "eu"}),
        "gate rerouted (eu.api.openai.com)": (rr, {TAG_HEADER: "eea_ch"}),
        "gate allowed, audit off (bench only)": (noaudit, {TAG_HEADER: "global"}),
        "gate blocked, audit off (bench only)": (noaudit, {TAG_HEADER: "eu"}),
    }
    per: dict[str, list[float]] = {k: [] for k in cases}
    rps: dict[str, list[float]] = {k: [] for k in cases}
    print(f"== 0. CPU per request: {clients} keep-alive HTTPS clients, {seconds:.1f} s per case, "
          f"{rounds} interleaved rounds (medians); proxy = its whole process tree")
    for _ in range(rounds):
        for name, (proxy, headers) in cases.items():
            r = load(name, through(proxy, fake, headers=headers), clients=clients,
                     warmup=warmup, seconds=seconds, pids={"proxy": proxy.pid})
            if r.requests:
                per[name].append(1000 * r.cpu["proxy"] * r.seconds / r.requests)
                rps[name].append(r.rps)
    med = {k: statistics.median(v) if v else float("nan") for k, v in per.items()}
    base_ms = med["bare mitmdump, forwarded"]
    print(f"{'path':36} {'ms CPU/req':>10} {'req/s':>7} {'vs bare forwarded':>18}")
    for name in cases:
        print(f"{name:36} {med[name]:10.2f} {statistics.median(rps[name] or [0]):7.0f} "
              f"{med[name] / base_ms:17.2f}x")
    print("  (the 451 row is the floor for a refusal: mitmproxy answering a request itself, "
          "with nothing decided or recorded;\n   audit off shows what the signed records cost: "
          "the writer child's CPU is part of the gate's figure)")
    print(f"  goals: allowed <= 1.00x bare ({'met' if med['gate allowed, forwarded'] <= base_ms else 'NOT met'}), "
          f"blocked <= 0.50x ({'met' if med['gate blocked (451, no upstream)'] <= 0.5 * base_ms else 'NOT met'})")
    slow = "/slow?n=6&seconds=1"
    first = {}
    for label, proxy in (("bare", bare), ("gate", rg)):
        runs = [sse_once(through(proxy, fake, path=slow, headers={TAG_HEADER: "global"}))
                for _ in range(5)]
        first[label] = statistics.median(x[0] for x in runs)
    print(f"  SSE first byte: bare {first['bare']:.1f} ms, gate {first['gate']:.1f} ms "
          f"({first['gate'] - first['bare']:+.1f} ms; goal within 1 ms)")
    for label, proxy in (("bare", bare), ("gate", rg)):
        idle, peak, n = stream_memory(through(proxy, fake, path="/big?mb=100",
                                              headers={TAG_HEADER: "global"}), proxy.pid)
        print(f"  100 MB response through {label}: {n / 1e6:.0f} MB read, RSS idle "
              f"{idle / 1024:.0f} MB, peak {peak / 1024:.0f} MB (+{(peak - idle) / 1024:.0f} MB)")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~15 s instead of ~60 s")
    ap.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    ap.add_argument("--seconds", type=float, default=None, help="measurement window per case")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (./var/bench-*)")
    ap.add_argument("--cpu", action="store_true",
                    help="only section 0: CPU per request, bare mitmdump vs residency-gate")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds for section 0 (median taken; default 3, 5 full)")
    args = ap.parse_args()
    quick = args.quick
    T = args.seconds or (0.8 if quick else 2.5)
    W = 0.3 if quick else 0.5
    K = args.clients
    rounds = 1 if quick else 2
    sse_runs = 1 if quick else 2

    base = workdir_base()
    fake = None
    procs: list[ProxyProc] = []
    try:
        fake = FakeServer(base / "fake")
        cpu_per_request(base, fake, procs, clients=8, seconds=max(T, 1.5), warmup=W,
                        rounds=args.rounds or (3 if quick or args.cpu else 5))
        if args.cpu:
            return 0
        with ThreadPoolExecutor() as pool:  # start the proxies side by side
            futures = [
                pool.submit(start_mitmdump, base / "mitmdump", fake),
                pool.submit(start_mitmdump, base / "mitmdump451", fake, answer_451=True,
                            name="mitmdump+451"),
                pool.submit(start_rg, base / "rg", fake),
                pool.submit(start_rg, base / "rg-noaudit", fake, audit=False,
                            name="rg-noaudit"),
            ]
            for f in futures:  # register each one that started, even if another failed
                if f.exception() is None:
                    procs.append(f.result())
            md, md451, rg, rgn = (f.result() for f in futures)

        def run(label: str, spec, proxy: ProxyProc | None = None, **kw) -> Result:
            pids = {"proxy": proxy.pid} if proxy else {}
            pids["fake"] = fake.pid
            r = load(label, spec, clients=kw.pop("clients", K), warmup=W,
                     seconds=kw.pop("seconds", T), pids=pids, **kw)
            print(row(r), flush=True)
            return r

        allow = {TAG_HEADER: "global"}  # api.openai.com satisfies `global`: forwarded
        block = {TAG_HEADER: "eu"}  # it does not satisfy `eu`: 451 from the proxy

        print(f"== 1. throughput: {K} keep-alive clients, {T:.1f} s per case "
              f"(POST /v1/chat/completions, 68 B body, ~330 B response)")
        print(header())
        d = run("direct to the fake provider (no proxy)", direct(fake))
        m = run("mitmdump, forwarded", through(md, fake), md)
        m451 = run("mitmdump + 451 addon (answers itself)", through(md451, fake), md451)
        ra = run("residency-gate allowed (tag global)", through(rg, fake, headers=allow), rg)
        rb = run("residency-gate blocked (tag eu -> 451)", through(rg, fake, headers=block), rg)
        ru = run("residency-gate untagged (forwarded)", through(rg, fake), rg)
        print()
        print(f"  residency-gate / mitmdump   allowed {ratio(ra.rps, m.rps)}   "
              f"untagged {ratio(ru.rps, m.rps)}   blocked vs mitmdump+451 "
              f"{ratio(rb.rps, m451.rps)}   blocked vs mitmdump forwarded {ratio(rb.rps, m.rps)}")
        print(f"  p99 latency ms: mitmdump {m.p99:.1f}, residency-gate allowed {ra.p99:.1f}, "
              f"blocked {rb.p99:.1f} (mitmdump+451 {m451.p99:.1f})")
        busiest = max(d.cpu.values())
        print(f"  load generator + fake provider ceiling (direct): {d.rps:.0f} req/s = "
              f"{d.rps / max(m.rps, 1):.1f}x mitmdump; client CPU {100 * d.cpu['client']:.0f}%, "
              f"fake CPU {100 * d.cpu['fake']:.0f}%"
              + ("  (the fake provider's single Python process is the ceiling, not the client)"
                 if d.cpu["fake"] >= busiest else ""))
        for r in (m, ra, ru):
            if r.cpu.get("client", 0) > 0.8:
                print(f"  WARNING: client CPU {100 * r.cpu['client']:.0f}% in '{r.label}': "
                      "the load generator may be limiting")
        print()

        print(f"== 2. audit cost (fsync group vs benchmark null sink); audit-on runs: section 1 "
              f"{'+ 1 more' if rounds > 1 else 'only'}")
        print(header())
        on_a, off_a, on_b, off_b = [], [], [], []
        on_a.append(ra)  # section 1's allowed and blocked runs count as audit-on rounds
        on_b.append(rb)
        for i in range(rounds):
            off_a.append(run(f"allowed, audit off #{i + 1}", through(rgn, fake, headers=allow),
                             rgn))
            if i:
                on_a.append(run(f"allowed, audit on  #{i + 1}", through(rg, fake, headers=allow),
                                rg))
        off_b.append(run("blocked, audit off #1", through(rgn, fake, headers=block), rgn))

        def mean(rs: list[Result]) -> float:
            return statistics.mean(r.rps for r in rs)

        print()
        for what, on, off in (("allowed", on_a, off_a), ("blocked", on_b, off_b)):
            rr = mean(on) / mean(off)
            cpu_on = statistics.mean(r.cpu["proxy"] for r in on)
            cpu_off = statistics.mean(r.cpu["proxy"] for r in off)
            print(f"  {what}: audit on {mean(on):.0f} req/s, off {mean(off):.0f} req/s, "
                  f"ratio {rr:.3f} ({100 * (rr - 1):+.1f}%; goal >= 0.95: "
                  f"{'met' if rr >= 0.95 else 'NOT met'}); proxy CPU/request on "
                  f"{1e6 * cpu_on / mean(on):.0f} µs, off {1e6 * cpu_off / mean(off):.0f} µs")
        print()

        slow = "/slow?n=6&seconds=1"
        print(f"== 3. SSE time to first byte: GET {slow} (first event at once, then 5 more "
              "over 1 s)")
        print(f"{'through':34} {'first byte ms':>14} {'whole stream ms':>16} {'bytes':>6}")
        sse = {"direct": direct(fake, path=slow),
               "mitmdump (defaults)": through(md, fake, path=slow),
               "residency-gate": through(rg, fake, path=slow)}
        for label, spec in sse.items():
            runs = [sse_once(spec) for _ in range(sse_runs)]
            first = statistics.median(x[0] for x in runs)
            full = statistics.median(x[1] for x in runs)
            print(f"{label:34} {first:14.1f} {full:16.1f} {runs[0][2]:6d}")
        print("  (bare mitmdump buffers whole responses unless stream_large_bodies is set: its "
              "first byte comes with the last)")
        print()

        if quick:
            print("== 4. connection_strategy eager vs lazy: skipped with --quick")
            print("== 5. resolve path: skipped with --quick")
            return 0
        print(f"== 4. connection_strategy under {2 * K} concurrent clients (bare mitmdump; "
              "residency-gate runs lazy)")
        print(header())
        for p in (md, md451):
            p.stop()
        md_eager = start_mitmdump(base / "mitmdump-eager", fake, strategy="eager",
                                  name="mitmdump eager")
        procs.append(md_eager)
        strat = {"lazy": md, "eager": md_eager}
        md = start_mitmdump(base / "mitmdump-lazy", fake, name="mitmdump lazy")
        strat["lazy"] = md
        procs.append(md)
        out: dict[tuple[str, bool], Result] = {}
        for fresh in (False, True):
            for name, p in strat.items():
                label = f"{name:5} {'new conn per request' if fresh else 'keep-alive'}"
                out[name, fresh] = run(label, through(p, fake, new_connection_per_request=fresh),
                                       p, clients=2 * K)
        print()
        for fresh in (False, True):
            lz, eg = out["lazy", fresh], out["eager", fresh]
            print(f"  {'new connection per request' if fresh else 'keep-alive':26} eager/lazy "
                  f"req/s {ratio(eg.rps, lz.rps)}; p99 ms eager {eg.p99:.1f} lazy {lz.p99:.1f}; "
                  f"max ms eager {eg.max_ms:.1f} lazy {lz.max_ms:.1f}; errors eager {eg.errors} "
                  f"lazy {lz.errors}")
        print()

        print("== 5. `resolve` path: CONNECT api.openai.com:443, redirected by residency-gate's "
              "server_connect hook")
        print(header())
        rr = run("residency-gate allowed via resolve", through(rg, fake, headers=allow,
                                                               via_resolve=True), rg,
                 clients=4, seconds=min(T, 2.0), timeout=1.0)
        if rr.errors:
            print(f"  STALLS: {rr.errors} request(s) timed out after 1 s ({rr.error_kinds}). "
                  "The hook rewrites server.address, so mitmproxy never reuses the upstream "
                  "connection (a new TCP+TLS connection per request) and, on one client "
                  "connection, the 6th request hangs. See bench/README.md.")
        return 0
    finally:
        for p in procs:
            p.stop()
        if fake is not None:
            fake.close()
        if args.keep:
            print(f"work dir kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
