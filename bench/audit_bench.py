"""Audit writer throughput and CPU: records/s and CPU per record, thread vs process writer,
fsync=group vs fsync=always; first, µs per canonical serialisation of a decision record.

    .venv/bin/python bench/audit_bench.py [--seconds 2] [--concurrency 64] [--dir DIR]
        [--writer thread,process] [--fsync group,always] [--no-outcomes]

Each case runs `concurrency` tasks that do what the proxy does per request, back to back,
for a bounded time: append a decision record and wait until it is durable, then write an
`outcome` record without waiting (`append_nowait` where the writer has it, else a task per
outcome, as the proxy did before); with --no-outcomes, decisions only. In a fresh directory
on the same filesystem as --dir (default: a temp dir under ./var, i.e. the disk the log
lives on). Records count both kinds.

`proxy µs/rec` is the CPU this (the proxy's) process spent per record, all its threads
included: for the thread writer that is everything, for the process writer only the
marshalling and the IPC. `writer µs/rec` is the writer process's CPU per record (Linux /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import timeit
from pathlib import Path

import rfc8785

from residency_gate.audit import AuditWriter, SigningKey
from residency_gate.audit.canonical import canonical, dumps_plain
from residency_gate.audit.writer_process import ProcessAuditWriter

# a decision record as the proxy writes it (audit.record.decision_fields), and its outcome
FIELDS = {
    "advice": [], "body_bytes": 68, "body_sha256": "ab" * 32, "client": "10.20.0.7",
    "code": "outside_requirement", "decision": "block", "endpoint": "global", "enforced": True,
    "host": "api.openai.com",
    "inputs": {"path": "/v1/chat/completions", "reads": {"body": "object",
                                                         "body:model": "gpt-4o"},
               "signed": False},
    "located_by": "fixed for this endpoint", "method": "POST", "model": "gpt-4o",
    "places": ["global"], "processing": ["global"], "provider": "openai",
    "reason": "Blocked by residency policy: requirement eu (from header X-Data-Residency: "
              "eu), but api.openai.com (OpenAI, OpenAI API (global)) may process this "
              "request in anywhere (fixed for this endpoint), which includes 223 places "
              "outside it.",
    "requirement": ["eu"], "requirement_places": ["eu"],
    "requirement_sources": [{"detail": "header X-Data-Residency: eu", "mode": "enforce",
                             "names": ["eu"], "source": "tag"}],
    "revisions": {"catalog": "c8fcedc736487dc0", "config": "defaults"}, "status": 451,
    "storage": ["global"], "tags": ["eu"], "url": "https://api.openai.com/v1/chat/completions",
    "user": None,
}
OUTCOME = {"decision_id": "bench:1", "status": 451, "bytes_in": 68, "bytes_out": None,
           "duration_ms": 3, "error": None, "error_kind": None}
WRITERS = {"thread": AuditWriter, "process": ProcessAuditWriter}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def canonical_cost() -> None:
    """The writer serialises every record twice (to sign it, then with its signature)."""
    rec = {"v": 1, "origin": "bench", "seq": 12345, "ts": "2026-11-28T07:24:10.123456Z",
           "kind": "decision", "prev": "ab" * 32, "key_id": "ed25519:0123456789abcdef",
           **FIELDS, "id": "bench:12345"}
    assert canonical(rec) == dumps_plain(rec) == rfc8785.dumps(rec)
    print("canonical JSON of a decision record (µs, best of 5):")
    for name, fn in (("canonical() (checks + json fast path)", canonical),
                     ("dumps_plain (writer hot path)", dumps_plain),
                     ("rfc8785.dumps", rfc8785.dumps)):
        n = 5000
        best = min(timeit.repeat(lambda fn=fn: fn(rec), number=n, repeat=5)) / n
        print(f"  {name:40} {best * 1e6:7.1f}")
    print()


def proc_cpu(pid: int | None) -> float:
    """utime + stime of ``pid`` in seconds (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def run(writer: str, mode: str, directory: Path, seconds: float,
              concurrency: int, outcomes: bool = True) -> dict:
    w = WRITERS[writer](directory, SigningKey.generate(), "bench", fsync=mode)
    w.open()
    child = w.pid if isinstance(w, ProcessAuditWriter) else None  # AuditWriter.pid: ours
    stop = time.perf_counter() + seconds
    count = 0
    latencies: list[float] = []
    background: set[asyncio.Task] = set()
    nowait = getattr(w, "append_nowait", None)

    async def outcome() -> None:  # the proxy's _write_outcome before append_nowait
        await w.append("outcome", OUTCOME)

    async def worker():
        nonlocal count
        loop = asyncio.get_running_loop()
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await w.append("decision", FIELDS)
            latencies.append(time.perf_counter() - t)
            count += 1
            if outcomes:
                if nowait is not None:
                    nowait("outcome", OUTCOME)
                else:
                    task = loop.create_task(outcome())
                    background.add(task)
                    task.add_done_callback(background.discard)
                count += 1

    t0, cpu0, child0 = time.perf_counter(), time.process_time(), proc_cpu(child)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    while background:
        await asyncio.gather(*background)
    elapsed = time.perf_counter() - t0
    cpu, child_cpu = time.process_time() - cpu0, proc_cpu(child) - child0
    await w.close()
    latencies.sort()
    return {
        "writer": writer, "mode": mode, "records": count, "rps": count / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "fsyncs": w.stats.fsyncs, "proxy_us": 1e6 * cpu / count,
        "writer_us": 1e6 * child_cpu / count if child else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=Path("var"))
    ap.add_argument("--writer", default="thread,process", help="comma-separated: thread,process")
    ap.add_argument("--fsync", default="group,always", help="comma-separated: group,always")
    ap.add_argument("--no-outcomes", action="store_true", help="decision records only")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir))
    try:
        canonical_cost()
        print(f"{'writer':8} {'fsync':7} {'records/s':>10} {'records':>8} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'fsyncs':>7} {'proxy µs/rec':>13} {'writer µs/rec':>14}")
        for mode in args.fsync.split(","):
            for writer in args.writer.split(","):
                r = asyncio.run(run(writer, mode, base / f"{writer}-{mode}", args.seconds,
                                    args.concurrency, not args.no_outcomes))
                wus = "" if r["writer_us"] is None else f"{r['writer_us']:14.1f}"
                print(f"{r['writer']:8} {r['mode']:7} {r['rps']:10.0f} {r['records']:8d} "
                      f"{r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['fsyncs']:7d} "
                      f"{r['proxy_us']:13.1f} {wus}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
