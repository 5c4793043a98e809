"""Where a request's CPU goes: py-spy samples of `residency-gate run` (and its audit writer
child) under the proxy benchmark's load, folded into the top functions by own time.

    .venv/bin/python bench/profile_bench.py [--case allowed|blocked] [--seconds S]
        [--tree PATH] [--top N] [--py-spy PATH]

py-spy is not a dependency: install it anywhere (`pipx install py-spy`) and put it on PATH
or pass --py-spy. Samples are taken without pausing the proxy (--nonblocking) and idle
frames (waiting in epoll) are not counted, so the shares are shares of CPU.

--tree runs another checkout's `residency_gate` (e.g. a `git worktree` of an older
commit) under the same load, to put a before and an after side by side; a tree whose
config knows no `access.connect_ports` (before issue 12) gets a config without it.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    ROOT,
    TAG_HEADER,
    FakeServer,
    ProxyProc,
    load,
    own_cpu_seconds,
    process_tree,
    start_rg,
    stop,
    through,
    workdir_base,
)

CASES = {"allowed": "global", "blocked": "eu"}
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")
# A thread blocked in fsync is not idle to py-spy (D state), but mostly waits for the disk:
# those samples are counted apart; what fsync costs in CPU shows in the /proc figures.
WAIT = re.compile(r"(^|\.)_?(f?sync|fdatasync)$")


def short(path: str) -> str:
    """Site-packages and checkout prefixes dropped: `mitmproxy/proxy/layer.py`."""
    for marker in ("site-packages/", "addons/", "lib/python3.12/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def own_cpu(pid: int) -> dict[int, float]:
    """utime+stime of a process and of each descendant, apart."""
    return {p: own_cpu_seconds(p) for p in process_tree(pid)}


@dataclass
class Profile:
    """Samples folded: own time per function (per process), per package, per process, and
    the inclusive time of residency_gate's own functions (what each hook costs)."""

    own: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    package: collections.Counter = field(default_factory=collections.Counter)
    process: collections.Counter = field(default_factory=collections.Counter)
    ours: collections.Counter = field(default_factory=collections.Counter)
    total: int = 0
    waits: int = 0


def fold(raw: Path) -> Profile:
    """py-spy's raw (collapsed) stacks -> a Profile (fsync waits apart)."""
    p = Profile()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        proc = [f for f in frames if f.startswith("process ")][-1:] or ["?"]
        leaf = frames[-1]
        m = FRAME.match(leaf)
        func, file = (m["func"], short(m["file"])) if m else ("(no Python frame)", "?")
        if WAIT.search(func):
            p.waits += n
            continue
        # the audit writer process: audit.writer_child (audit.worker before issue 9)
        where = "writer child" if "residency_gate.audit." in proc[0] else "proxy"
        p.own[where][f"{func} ({file})"] += n
        p.package[file.split("/", 1)[0] if "/" in file else file.removesuffix(".py")] += n
        p.process[where] += n
        if where == "proxy":
            seen = set()
            for frame in frames:
                fm = FRAME.match(frame)
                if fm and "residency_gate/" in fm["file"]:
                    name = f"{fm['func']} ({short(fm['file'])})"
                    if name not in seen:
                        seen.add(name)
                        p.ours[name] += n
        p.total += n
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="allowed")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose residency_gate runs")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--keep", action="store_true", help="keep the work dir and raw samples")
    a = ap.parse_args()
    if not shutil.which(a.py_spy):
        print("py-spy not found: install it (pipx install py-spy) or pass --py-spy",
              file=sys.stderr)
        return 2
    base = workdir_base()
    fake = FakeServer(base / "fake")
    proxy: ProxyProc | None = None
    try:
        tree = a.tree.resolve()
        cmd = None
        drop: tuple[str, ...] = ()
        if tree != ROOT:
            cmd = [sys.executable, "-c",
                   f"import sys; sys.path.insert(0, {str(tree / 'addons')!r}); "
                   "from residency_gate.cli import main; sys.exit(main())"]
            if subprocess.run(["grep", "-rqs", "connect_ports", str(tree / "addons")]).returncode:
                drop = ("access",)
        proxy = start_rg(base / "rg", fake, drop=drop, cmd=cmd and [
            *cmd, "run", "-c", str(base / "rg" / "residency-gate.yaml")])
        spec = through(proxy, fake, headers={TAG_HEADER: CASES[a.case]})
        load("warm-up", spec, clients=a.clients, warmup=1.0, seconds=2.0, pids={})
        raw = base / "samples.txt"
        spy = subprocess.Popen([a.py_spy, "record", "--pid", str(proxy.pid), "--subprocesses",
                                "--nonblocking", "--rate", "250", "--format", "raw",
                                "--duration", str(int(a.seconds)), "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result: dict = {}
        before = own_cpu(proxy.pid)
        t = threading.Thread(target=lambda: result.update(r=load(
            a.case, spec, clients=a.clients, warmup=0.5, seconds=a.seconds - 1,
            pids={"proxy": proxy.pid})))
        t.start()
        t.join()
        _, err = spy.communicate(timeout=a.seconds + 60)
        if not raw.exists():
            print(f"py-spy failed: {err.decode(errors='replace')}", file=sys.stderr)
            return 1
        after = own_cpu(proxy.pid)
        r = result["r"]
        prof = fold(raw)
        total = prof.total
        # the sampler ran a little longer than the load: /proc deltas cover both
        per = {pid: 1000 * (after[pid] - before.get(pid, 0.0)) / r.requests for pid in after}
        print(f"== {a.case}: {tree}, {r.requests} requests, {r.rps:.0f} req/s; CPU/request "
              f"(/proc, while sampled): proxy {per.pop(proxy.pid):.2f} ms"
              + "".join(f", child {pid} {ms:.2f} ms" for pid, ms in per.items()))
        print(f"samples: {total} on CPU, {prof.waits} in fsync (not counted below)")
        print("by process: " + ", ".join(f"{k} {100 * v / total:.0f}%"
                                           for k, v in prof.process.most_common()))
        print("by package: " + ", ".join(f"{k} {100 * v / total:.0f}%"
                                           for k, v in prof.package.most_common(8)))
        for where, own in prof.own.items():
            print(f"top {a.top} functions by own CPU, {where} (% of all samples):")
            for name, n in own.most_common(a.top):
                print(f"  {100 * n / total:5.1f}%  {name}")
        print(f"top {a.top} residency_gate functions in the proxy, inclusive:")
        for name, n in prof.ours.most_common(a.top):
            print(f"  {100 * n / total:5.1f}%  {name}")
    finally:
        if proxy is not None:
            stop(proxy.proc)
        fake.close()
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
