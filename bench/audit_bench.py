"""Audit writer throughput: records/s with fsync=group vs fsync=always.

    .venv/bin/python bench/audit_bench.py [--seconds 2] [--concurrency 64] [--dir DIR]

Each mode runs `concurrency` tasks that append decision records back to back (as the
proxy's concurrent flows do) for a bounded time, in a fresh directory on the same
filesystem as --dir (default: a temp dir under ./var, i.e. the disk the log lives on).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from residency_gate.audit import AuditWriter, SigningKey

FIELDS = {
    "client": "10.20.0.7", "user": None, "method": "POST",
    "url": "https://api.openai.com/v1/chat/completions", "host": "api.openai.com",
    "provider": "openai", "endpoint": "chat.completions", "model": "gpt-4o",
    "requirement": ["eu"], "requirement_sources": ["header"], "places": ["us"],
    "decision": "block", "reason": "gpt-4o on api.openai.com is processed in us",
    "status": 451, "body_sha256": "ab" * 32,
}


async def run(mode: str, directory: Path, seconds: float, concurrency: int) -> dict:
    w = AuditWriter(directory, SigningKey.generate(), "bench", fsync=mode)
    w.open()
    stop = time.perf_counter() + seconds
    count = 0
    latencies: list[float] = []

    async def worker():
        nonlocal count
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await w.append("decision", FIELDS)
            latencies.append(time.perf_counter() - t)
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await w.close()
    latencies.sort()
    return {
        "mode": mode, "records": count, "rps": count / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "batches": w.stats.batches, "fsyncs": w.stats.fsyncs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=Path("var"))
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir))
    try:
        print(f"{'mode':8} {'records/s':>10} {'records':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'fsyncs':>7}")
        for mode in ("group", "always"):
            r = asyncio.run(run(mode, base / mode, args.seconds, args.concurrency))
            print(f"{r['mode']:8} {r['rps']:10.0f} {r['records']:8d} {r['p50_ms']:7.2f} "
                  f"{r['p99_ms']:7.2f} {r['fsyncs']:7d}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
