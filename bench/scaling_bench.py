"""Scaling benchmark: `residency-gate run --workers N` for N = 1, 2 (one core each).

    .venv/bin/python bench/scaling_bench.py [--quick] [--clients K] [--workers 1,2]

Same fake provider, client and traffic as proxy_bench.py (K keep-alive clients, CONNECT +
TLS, POST /v1/chat/completions; allowed = tag `global`, blocked = tag `eu` -> 451), audit
on. With N > 1 the workers share the listen port with SO_REUSEPORT, so the kernel spreads
the K client connections over them. Prints requests/s per N and the speed-up over N = 1.
If this `residency-gate` has no --workers option, says so and exits 0.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    RESIDENCY_GATE,
    TAG_HEADER,
    FakeServer,
    ProxyProc,
    Result,
    header,
    load,
    row,
    start_rg,
    through,
    workdir_base,
)


def workers_available() -> bool:
    out = subprocess.run([RESIDENCY_GATE, "run", "--help"], capture_output=True, text=True,
                         timeout=60)
    return "--workers" in out.stdout


def wait_workers(p: ProxyProc, n: int, timeout: float = 30.0) -> int:
    """Wait until n workers logged that they listen; return how many did."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = p.log.read_text(errors="replace").count("listening on")
        if seen >= n:
            return seen
        time.sleep(0.1)
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~15 s instead of ~45 s")
    ap.add_argument("--clients", type=int, default=32, help="concurrent keep-alive clients")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--seconds", type=float, default=None, help="measurement window per case")
    args = ap.parse_args()
    T = args.seconds or (1.5 if args.quick else 4.0)
    W = 0.5 if args.quick else 1.0
    counts = [int(x) for x in args.workers.split(",")]

    if not workers_available():
        print("workers feature not available: `residency-gate run --help` has no --workers "
              "option in this build; nothing measured.")
        return 0

    base = workdir_base()
    fake = None
    results: dict[tuple[int, str], Result] = {}
    try:
        fake = FakeServer(base / "fake")
        print(f"{K_line(args.clients, T)}")
        print(header())
        for n in counts:
            p = start_rg(base / f"rg-w{n}", fake, args=("--workers", str(n)),
                         name=f"residency-gate --workers {n}")
            try:
                got = wait_workers(p, n)
                if got < n:
                    print(f"  WARNING: only {got} of {n} workers logged 'listening' in time")
                for what, tag in (("allowed", "global"), ("blocked", "eu")):
                    r = load(f"--workers {n}: {what}", through(p, fake, headers={TAG_HEADER: tag}),
                             clients=args.clients, warmup=W, seconds=T,
                             pids={"proxy": p.pid, "fake": fake.pid})
                    results[n, what] = r
                    print(row(r), flush=True)
            finally:
                p.stop()
        print()
        one = counts[0]
        for what in ("allowed", "blocked"):
            parts = [f"{n} workers {results[n, what].rps:.0f} req/s "
                     f"(x{results[n, what].rps / results[one, what].rps:.2f})" for n in counts]
            print(f"  {what}: " + ", ".join(parts))
        print(f"  (this machine: {cpu_count()} CPUs, shared by the workers, the fake provider "
              "and the load generator; see the CPU column)")
        return 0
    finally:
        if fake is not None:
            fake.close()
        shutil.rmtree(base, ignore_errors=True)


def K_line(k: int, t: float) -> str:
    return f"== throughput by worker count: {k} keep-alive clients, {t:.1f} s per case, audit on"


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
