"""Shared plumbing for the proxy benchmarks (not a benchmark itself).

- FakeServer: tests/e2e/fakeprovider.py in its own process (own GIL), recording off.
- Mitmdump / ResidencyGate: the two proxies as subprocesses, same TLS work.
- load(): an asyncio load generator, K keep-alive clients through an HTTP proxy
  (CONNECT + TLS) or straight to the fake server; requests/s, latency percentiles,
  errors, and the CPU each process burned, to see who the bottleneck is.

Everything listens on 127.0.0.1 and every process is killed on exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MITMDUMP = str(VENV_BIN / "mitmdump")
RESIDENCY_GATE = str(VENV_BIN / "residency-gate")
E2E = ROOT / "tests" / "e2e"
TAG_HEADER = "X-Data-Residency"
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")

_children: list[subprocess.Popen] = []


def _kill_children() -> None:
    for p in _children:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(5)


atexit.register(_kill_children)


def _on_signal(signum: int, _frame: object) -> None:
    _kill_children()
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


def spawn(cmd: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, **kw)
    _children.append(p)
    return p


def stop(p: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0,
                   also: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                if also is None or also.exists():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s")


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (workers, the audit writer), Linux /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def own_cpu_seconds(pid: int) -> float:
    """utime+stime of one process (0 once it is gone)."""
    st = _stat(pid)
    return (int(st[11]) + int(st[12])) / CLK_TCK if st is not None else 0.0


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and of its live descendants."""
    return sum(own_cpu_seconds(p) for p in process_tree(pid))


def workdir_base() -> Path:
    """Audit logs must hit the real disk (fsync cost), so not a tmpfs /tmp: ./var."""
    base = ROOT / "var"
    base.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="bench-", dir=base))


# --------------------------------------------------------------------------- fake provider

_FAKE_MAIN = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import fakeprovider
from fakeprovider import FakeProvider
from pathlib import Path
# The e2e server writes headers and body in separate TLS records; without
# TCP_NODELAY, Nagle + delayed ACK adds ~40 ms to every response.
fakeprovider._Handler.disable_nagle_algorithm = True
fake = FakeProvider(Path(sys.argv[2]))
fake.add = lambda rec: None          # no recording: a benchmark runs for minutes
fake.start()
print(fake.port, flush=True)
sys.stdin.read()                     # until the parent closes our stdin (or dies)
fake.stop()
"""


class FakeServer:
    """The e2e fake provider, in a separate process so it does not share our GIL."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([sys.executable, "-c", _FAKE_MAIN, str(E2E), str(workdir)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("fake provider did not start")
        self.port = int(line)
        self.ca_pem = workdir / "fake-ca.pem"
        sys.path.insert(0, str(E2E))
        from fakeprovider import HOSTS

        self.hosts = HOSTS

    @property
    def pid(self) -> int:
        return self.proc.pid

    def trust_bundle(self) -> Path:
        """certifi + the fake CA: what residency-gate builds from `upstream_ca`."""
        import certifi

        bundle = self.workdir / "upstream-trust.pem"
        bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + self.ca_pem.read_bytes())
        return bundle

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------------- proxies

ANSWER_451 = '''
from mitmproxy import http

def request(flow):
    flow.response = http.Response.make(
        451, b'{"error": {"message": "blocked", "type": "residency"}}',
        {"Content-Type": "application/json"})
'''


# What a pass-through gate costs in bare mitmdump: a script addon in the hooks the gate uses,
# streaming responses as the gate does (so SSE and large bodies compare like for like).
PASS_THROUGH = '''
def request(flow):
    pass

def responseheaders(flow):
    flow.response.stream = True
'''


def rss_kb(pid: int) -> int:
    """Resident set size of a process tree in KiB (Linux /proc), for memory-flatness checks."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class ProxyProc:
    name: str
    port: int
    ca_pem: Path
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_mitmdump(workdir: Path, fake: FakeServer, *, strategy: str = "lazy",
                   answer_451: bool = False, pass_through: bool = False,
                   name: str = "mitmdump") -> ProxyProc:
    """Bare mitmdump with the options residency-gate sets (see `through` for the traffic)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [MITMDUMP, "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
           "--set", f"confdir={workdir / 'conf'}",
           "--set", f"connection_strategy={strategy}",
           "--set", f"ssl_verify_upstream_trusted_ca={fake.trust_bundle()}"]
    if answer_451 or pass_through:
        script = workdir / "addon.py"
        script.write_text(ANSWER_451 if answer_451 else PASS_THROUGH)
        cmd += ["-s", str(script)]
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        proc = spawn(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ca = workdir / "conf" / "mitmproxy-ca-cert.pem"
    p = ProxyProc(name, port, ca, proc, log)
    try:
        wait_listening(port, proc, name, also=ca)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{p.log_tail()}") from None
    return p


def rg_config(workdir: Path, fake: FakeServer, port: int, extra: dict | None = None,
              drop: tuple[str, ...] = ()) -> Path:
    import yaml

    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": None,
        "certs_dir": str(workdir / "certs"),
        "upstream_ca": str(fake.ca_pem),
        "resolve": {h: f"127.0.0.1:{fake.port}" for h in fake.hosts},
        "audit": {"dir": str(workdir / "audit")},
        # the clients CONNECT to the fake's port, which CONNECT may only reach when allowed
        "access": {"connect_ports": [443, fake.port]},
    }
    cfg.update(extra or {})
    for key in drop:  # keys an older checkout does not know (bench/profile_bench.py --tree)
        cfg.pop(key, None)
    path = workdir / "residency-gate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_rg(workdir: Path, fake: FakeServer, *, audit: bool = True, extra: dict | None = None,
             args: tuple[str, ...] = (), name: str = "residency-gate",
             cmd: list[str] | None = None, drop: tuple[str, ...] = ()) -> ProxyProc:
    """`residency-gate run -c cfg` (or `cmd`), audit on unless audit=False (benchmark-only env)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = rg_config(workdir, fake, port, extra, drop)
    env = dict(os.environ)
    env.pop("RESIDENCY_GATE_BENCH_NO_AUDIT", None)
    if not audit:
        env["RESIDENCY_GATE_BENCH_NO_AUDIT"] = "1"
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        proc = spawn(cmd or [RESIDENCY_GATE, "run", "-c", str(cfg), *args], stdout=out,
                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    ca = workdir / "certs" / "mitmproxy-ca-cert.pem"
    p = ProxyProc(name, port, ca, proc, log)
    try:
        wait_listening(port, proc, name, also=ca, timeout=60)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{p.log_tail()}") from None
    return p


def through(proxy: ProxyProc, fake: FakeServer, *, via_resolve: bool = False, **kw) -> Spec:
    """Identical client traffic for every proxy: CONNECT 127.0.0.1:<fake port>, TLS SNI and
    Host api.openai.com. Both proxies then do the same work: mint a certificate for
    api.openai.com, connect to 127.0.0.1:<fake port> with SNI api.openai.com and verify
    the fake's certificate for that name against the same trust bundle. residency-gate
    accepts the IP target because its `resolve` maps api.openai.com to exactly that address.

    via_resolve=True: CONNECT api.openai.com:443 instead, which residency-gate redirects in
    its server_connect hook (`resolve`), the way the e2e tests drive it.
    """
    if via_resolve:
        return Spec(host="api.openai.com", port=443, proxy_port=proxy.port, ca_pem=proxy.ca_pem,
                    **kw)
    return Spec(host="api.openai.com", port=fake.port, connect_host="127.0.0.1",
                proxy_port=proxy.port, ca_pem=proxy.ca_pem, **kw)


def direct(fake: FakeServer, **kw) -> Spec:
    return Spec(host="api.openai.com", port=fake.port, ca_pem=fake.ca_pem, **kw)


# --------------------------------------------------------------------------- load generator


@dataclass
class Spec:
    """What each client sends."""

    host: str  # TLS server name (SNI) and Host header
    port: int  # CONNECT port (or direct port)
    connect_host: str | None = None  # CONNECT target host; None: same as `host`
    path: str = CHAT_PATH
    body: bytes = CHAT_BODY
    headers: dict[str, str] = field(default_factory=dict)
    proxy_port: int | None = None  # None: straight to 127.0.0.1:port
    ca_pem: Path | None = None
    new_connection_per_request: bool = False

    def request_bytes(self) -> bytes:
        host = self.host if self.port == 443 or self.connect_host else f"{self.host}:{self.port}"
        head = [f"POST {self.path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                f"Content-Length: {len(self.body)}", "User-Agent: rg-bench/1",
                "Accept: */*"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


@dataclass
class Result:
    label: str
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    statuses: dict[int, int]
    cpu: dict[str, float]  # process -> CPU utilisation (1.0 = one core) during the window
    connect_latencies: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float, data: list[float] | None = None) -> float:
        data = sorted(self.latencies if data is None else data)
        if not data:
            return float("nan")
        return 1000 * data[min(len(data) - 1, int(q * len(data)))]

    @property
    def p50(self) -> float:
        return self.pct(0.50)

    @property
    def p99(self) -> float:
        return self.pct(0.99)

    @property
    def max_ms(self) -> float:
        return 1000 * max(self.latencies) if self.latencies else float("nan")


class ProtocolError(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; return (status, server wants close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = close = False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
        elif k == b"connection" and b"close" in v.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()  # until close
        close = True
    return status, close


async def open_tunnel(spec: Spec, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if spec.proxy_port is None:
        return await asyncio.open_connection("127.0.0.1", spec.port, ssl=ctx,
                                             server_hostname=spec.host)
    reader, writer = await asyncio.open_connection("127.0.0.1", spec.proxy_port)
    target = f"{spec.connect_host or spec.host}:{spec.port}"
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200" not in head.split(b"\r\n", 1)[0]:
        raise ProtocolError(f"CONNECT refused: {head[:80]!r}")
    await writer.start_tls(ctx, server_hostname=spec.host)
    return reader, writer


def client_context(ca_pem: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_pem))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _load(spec: Spec, clients: int, warmup: float, seconds: float,
                pids: dict[str, int], timeout: float) -> Result:
    ctx = client_context(spec.ca_pem)
    raw = spec.request_bytes()
    latencies: list[float] = []
    connects: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    kinds: dict[str, int] = {}
    done = 0
    measuring = False
    stop_at = float("inf")

    async def one_client(i: int) -> None:
        nonlocal errors, done
        conn = None
        while time.perf_counter() < stop_at:
            try:
                t0 = time.perf_counter()
                if conn is None:
                    conn = await asyncio.wait_for(open_tunnel(spec, ctx), timeout)
                    if measuring:
                        connects.append(time.perf_counter() - t0)
                reader, writer = conn
                writer.write(raw)
                status, close = await asyncio.wait_for(_read_response(reader), timeout)
                t1 = time.perf_counter()
                if measuring and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    statuses[status] = statuses.get(status, 0) + 1
                    done += 1
                if close or spec.new_connection_per_request:
                    writer.close()
                    conn = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ssl.SSLError, ProtocolError, ValueError, IndexError) as e:
                if os.environ.get("BENCH_DEBUG"):
                    print("client error:", repr(e), file=sys.stderr)
                if measuring:
                    errors += 1
                    kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                if conn is not None:
                    conn[1].close()
                    conn = None
                await asyncio.sleep(0.01)
        if conn is not None:
            conn[1].close()

    me = os.getpid()
    tasks = [asyncio.create_task(one_client(i)) for i in range(clients)]
    await asyncio.sleep(warmup)
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    cpu0["client"] = time.process_time()
    measuring = True
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    await asyncio.sleep(seconds)
    elapsed = time.perf_counter() - t_start
    cpu = {k: (cpu_seconds(v) - cpu0[k]) / elapsed for k, v in pids.items()}
    cpu["client"] = (time.process_time() - cpu0["client"]) / elapsed
    _ = me
    await asyncio.wait(tasks, timeout=timeout + 1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return Result("", done, elapsed, latencies, errors, statuses, cpu, connects, kinds)


def load(label: str, spec: Spec, *, clients: int, warmup: float, seconds: float,
         pids: dict[str, int], timeout: float = 10.0) -> Result:
    r = asyncio.run(_load(spec, clients, warmup, seconds, pids, timeout))
    r.label = label
    return r


async def _sse_once(spec: Spec) -> tuple[float, float, int]:
    """One streamed GET; (ms to the first body byte, ms to the end, body bytes)."""
    ctx = client_context(spec.ca_pem)
    reader, writer = await open_tunnel(spec, ctx)
    host = spec.host if spec.port == 443 or spec.connect_host else f"{spec.host}:{spec.port}"
    t0 = time.perf_counter()
    writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
                 f"Connection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    first = None
    total = 0
    if head.split(b" ", 2)[1] != b"200":
        raise ProtocolError(f"SSE request failed: {head[:100]!r}")
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        total += len(chunk)
    end = time.perf_counter()
    writer.close()
    return 1000 * ((first or end) - t0), 1000 * (end - t0), total


def sse_once(spec: Spec) -> tuple[float, float, int]:
    return asyncio.run(_sse_once(spec))


async def _drain_get(spec: Spec) -> int:
    """GET spec.path through the proxy and read the whole body, discarding it."""
    ctx = client_context(spec.ca_pem)
    reader, writer = await open_tunnel(spec, ctx)
    host = spec.host if spec.port == 443 or spec.connect_host else f"{spec.host}:{spec.port}"
    writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                 .encode())
    total = 0
    while chunk := await reader.read(1 << 16):
        total += len(chunk)
    writer.close()
    return total


def stream_memory(spec: Spec, pid: int) -> tuple[int, int, int]:
    """(idle RSS KiB, peak RSS KiB while streaming, bytes read) of a proxy process tree."""
    import threading

    idle = rss_kb(pid)
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            done.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        n = asyncio.run(_drain_get(spec))
    finally:
        done.set()
        t.join()
    return idle, peak[0], n


# --------------------------------------------------------------------------- printing


def fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{k}={100 * v:.0f}%" for k, v in cpu.items())


def header() -> str:
    return (f"{'case':44} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
            f"  status  CPU (100% = one core)")


def row(r: Result) -> str:
    st = ",".join(f"{k}" for k in sorted(r.statuses)) or "-"
    return (f"{r.label:44} {r.rps:8.0f} {r.p50:7.1f} {r.p99:7.1f} {r.max_ms:7.1f} {r.errors:6d}"
            f"  {st:6}  {fmt_cpu(r.cpu)}")
