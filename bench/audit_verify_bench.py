"""The audit tools on a big log: records/s and peak memory of verify (default and --thorough),
show and report, each run as the real command line.

    .venv/bin/python bench/audit_verify_bench.py [--records 1000000] [--dir var/bench-audit]
        [--regen] [--compress zstd|gzip|none] [--skip-serial-thorough] [--quick]

The log is written by the real writer: ``AuditWriter.append_batch`` driven directly in this
process (what the writer process does with the batches the proxy sends; no proxy, no IPC),
64 MiB segments, checkpoint every 1,000 records, group fsync, rotated segments compressed by
the writer's own housekeeping thread. Decision records are built by the real engine and the
real record builder (`audit.record.decision_fields`) from a mix of requests (providers,
tags, clients, users); each request writes a decision and an outcome record, as the proxy
does. The log is kept in --dir and reused (--regen writes it again).

Each command runs in its own process; the figures are wall time, records per second of wall
time, records per CPU-second (user + system of the command and its worker processes: the
per-core rate, steadier than wall time when other work shares the machine) and the
command's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from residency_gate.audit.chain import line_hash
from residency_gate.audit.keys import load_or_create_signing_key
from residency_gate.audit.record import (
    BodyDigest,
    config_fields,
    decision_fields,
    outcome_fields,
)
from residency_gate.audit.writer import AuditWriter
from residency_gate.catalog.bundle import load_bundle
from residency_gate.core.request import Request

ORIGIN = "bench-gw"
CLI = [str(Path(sys.executable).parent / "residency-gate")]

REQUESTS = [  # host, path, model, tags
    ("api.openai.com", "/v1/chat/completions", "gpt-4o", ()),
    ("api.openai.com", "/v1/chat/completions", "gpt-4o", ("eu",)),
    ("eu.api.openai.com", "/v1/chat/completions", "gpt-4o", ("eu",)),
    ("api.anthropic.com", "/v1/messages", "claude-sonnet-4", ("eu",)),
    ("api.anthropic.com", "/v1/messages", "claude-sonnet-4", ()),
    ("api.mistral.ai", "/v1/chat/completions", "mistral-large-latest", ("eu",)),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.0-flash:generateContent",
     None, ("us",)),
    ("api.openai.com", "/v1/embeddings", "text-embedding-3-small", ("de",)),
    ("api.openai.com", "/v1/chat/completions", "gpt-4o", ("atlantis",)),
]


def field_pool(n_clients: int = 64) -> list[dict]:
    """Decision fields built by the real engine for a mix of requests and clients."""
    bundle = load_bundle(None)
    rng = random.Random(7)
    pool = []
    for i in range(n_clients):
        client = f"10.{20 + i % 4}.{i // 4}.{rng.randrange(2, 250)}"
        user = f"svc-{i % 9}" if i % 3 == 0 else None
        for host, path, model, tags in REQUESTS:
            body = json.dumps({"model": model, "messages": []}).encode() if model else b"{}"
            req = Request(method="POST", scheme="https", host=host, port=443, path=path,
                          tag_values=tags, body=body, client_ip=client, user=user)
            decision = bundle.decide(req)
            pool.append(decision_fields(decision, req, bundle.regions, bundle.revisions,
                                        BodyDigest(line_hash(body), len(body))))
    return pool, bundle


def generate(d: Path, records: int, compress: str) -> float:
    key = load_or_create_signing_key(d / "certs")
    pool, bundle = field_pool()
    rng = random.Random(11)
    w = AuditWriter(d / "audit", key, ORIGIN, compress=compress, checkpoint_every=1000)
    w.open()
    t0 = time.perf_counter()
    w.append_batch([("config", config_fields(bundle.revisions, None, [], "start"))])
    written = 0
    seq_hint = w.next_seq
    while written < records:
        batch = []
        for _ in range(128):
            f = dict(rng.choice(pool))
            f["body_sha256"] = f"{rng.getrandbits(256):064x}"
            batch.append(("decision", f))
        recs = w.append_batch(batch)
        outs = [("outcome", outcome_fields(r["id"], r["status"] or 200, 900, 2400,
                                           rng.randrange(50, 4000), None)) for r in recs]
        w.append_batch(outs)
        written = w.next_seq - seq_hint
        if written % 100_000 < 256:
            print(f"  ... {written:,} records, {time.perf_counter() - t0:.0f} s", flush=True)
    w.keeper.wait_idle(600)
    w.close_sync()
    return time.perf_counter() - t0


# A process inherits, as its peak RSS, the memory of the process it was forked from (Linux
# keeps the high-water mark across exec). So commands are started by a small launcher
# that reports its child's rusage: the figures are the command's own.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_pid, status, ru = os.wait4(pid, 0)
sys.stderr.write("\\nRUSAGE " + json.dumps([ru.ru_utime + ru.ru_stime, ru.ru_maxrss,
                                            os.waitstatus_to_exitcode(status)]) + "\\n")
"""


def run(cmd: list[str]) -> dict:
    """Run a command: wall time, CPU (it and the processes it waited for), peak RSS. The
    --thorough workers are children of multiprocessing's fork server, which nobody waits
    for: verify --json reports their CPU itself (worker_cpu_seconds)."""
    json_out = "--json" in cmd and "verify" in cmd
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdin=subprocess.DEVNULL,
                       stdout=out if json_out else subprocess.DEVNULL, stderr=err,
                       check=False)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read().decode(errors="replace")
    cpu, maxrss_kb, rc = json.loads(stderr.rsplit("RUSAGE ", 1)[1])
    if json_out:
        cpu += json.loads(stdout).get("worker_cpu_seconds", 0.0)
    return {"wall": wall, "cpu": cpu, "rss_mb": maxrss_kb / 1024, "rc": rc, "err": stderr}


def count_records(d: Path) -> int:
    from residency_gate.audit.segments import Source, collect_files, iter_lines

    logs, _ = collect_files([d / "audit"])
    return sum(1 for p in logs for _ in iter_lines(Source.of(p)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("var/bench-audit"))
    ap.add_argument("--regen", action="store_true")
    ap.add_argument("--compress", default="zstd", choices=["zstd", "gzip", "none"])
    ap.add_argument("--skip-serial-thorough", action="store_true",
                    help="skip --thorough --jobs 1 (the per-core figure; the longest run)")
    ap.add_argument("--quick", action="store_true", help="100,000 records")
    args = ap.parse_args()
    n = 100_000 if args.quick else args.records
    d = args.dir / f"{n}-{args.compress}"
    if args.regen and d.exists():
        shutil.rmtree(d)
    if not (d / "audit").exists():
        print(f"writing {n:,} records to {d} with the real writer (append_batch) ...")
        d.mkdir(parents=True, exist_ok=True)
        secs = generate(d, n, args.compress)
        print(f"  written in {secs:.0f} s ({n / secs:,.0f} records/s)")
    total = count_records(d)
    files = sorted((d / "audit").iterdir())
    size = sum(f.stat().st_size for f in files)
    segs = [f for f in files if f.name.startswith(ORIGIN)]
    print(f"log: {total:,} records in {len(segs)} segments "
          f"({sum(1 for f in segs if f.name.endswith(('.zst', '.gz')))} compressed), "
          f"{size / 1e6:,.0f} MB on disk; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores")
    pub = str(d / "certs" / "audit-signing-key.pub.pem")
    audit = str(d / "audit")
    html = d / "report.html"
    cases = [
        ("verify (default)", [*CLI, "audit", "verify", audit, "--pubkey", pub, "--json"]),
        ("verify --thorough --jobs 1", [*CLI, "audit", "verify", audit, "--pubkey", pub,
                                        "--thorough", "--jobs", "1", "--json"]),
        (f"verify --thorough ({os.cpu_count()} jobs)",
         [*CLI, "audit", "verify", audit, "--pubkey", pub, "--thorough", "--json"]),
        ("show --decision block --json", [*CLI, "audit", "show", audit, "--decision", "block",
                                          "--json"]),
        ("report --html", [*CLI, "audit", "report", audit, "--pubkey", pub, "--html",
                           str(html)]),
    ]
    if args.skip_serial_thorough:
        cases.pop(1)
    print(f"\n{'command':34} {'wall s':>8} {'records/s':>10} {'rec/CPU-s':>10} "
          f"{'peak RSS MB':>12}  exit")
    for name, cmd in cases:
        r = run(cmd)
        extra = f"  HTML {html.stat().st_size / 1e3:,.0f} kB" if name.startswith("report") else ""
        print(f"{name:34} {r['wall']:8.1f} {total / r['wall']:10,.0f} "
              f"{total / max(r['cpu'], 1e-9):10,.0f} {r['rss_mb']:12.0f}  {r['rc']}{extra}",
              flush=True)
        if r["rc"] not in (0,):
            print(r["err"][-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
