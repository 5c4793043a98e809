"""`residency-gate run --workers N` / `workers: N`: N proxy processes on one listen
port (SO_REUSEPORT), each with its own audit origin and admin port, under a
supervisor that forwards SIGHUP/SIGTERM and restarts a crashed worker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import RESIDENCY_GATE, Proxy, base_config
from .fakeprovider import FakeProvider, free_port
from .opshelpers import KeepAlive, admin_get, audit_records, free_port_pair, metrics, wait_for

pytestmark = pytest.mark.e2e

ORIGIN = "gw"


def worker_pids(proxy: Proxy) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the supervisor's log."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"worker (\d+) \(pid (\d+)\) listening", proxy.log_text()):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by the supervisor) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def one_request(proxy: Proxy, host: str) -> int:
    """A request on a fresh connection (the kernel picks a worker per connection)."""
    client = KeepAlive(proxy, host)
    try:
        return client.post().status
    finally:
        client.close()


def same_size_change(proxy: Proxy, config: dict[str, Any]) -> None:
    """Rewrite the config with the old size and mtime: only SIGHUP can notice."""
    st = proxy.config_path.stat()
    text = yaml.safe_dump(config, sort_keys=False)
    assert len(text.encode()) == st.st_size
    proxy.config_path.write_text(text)
    os.utime(proxy.config_path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_workers_share_the_port_reload_restart_and_stop(
    start_proxy: Any, fake: FakeProvider
) -> None:
    admin = free_port_pair()
    proxy = start_proxy({
        "workers": 2,
        "admin": f"127.0.0.1:{admin}",
        "audit": {"origin": ORIGIN},
        "residency": {"clients": [{"cidr": "127.0.0.0/8", "require": "eu"}]},
    })
    wait_for(lambda: "all 2 workers listening" in proxy.log_text(), 20,
             what="both workers listening")
    pids = worker_pids(proxy)
    assert sorted(pids) == [0, 1] and pids[0] != pids[1] != proxy.pid
    for i in (0, 1):  # each worker's admin port answers
        assert admin_get(admin + i, "/healthz")[:1] == (200,)
        assert admin_get(admin + i, "/readyz")[0] == 200

    # 1. one listen port, both workers serve it: each has its own audit origin
    n = 16
    assert [one_request(proxy, "us.api.openai.com") for _ in range(n)] == [451] * n
    decisions = [r for r in audit_records(proxy.audit_dir) if r["kind"] == "decision"]
    by_origin = {o: sum(r["origin"] == o for r in decisions) for o in (f"{ORIGIN}-w0", f"{ORIGIN}-w1")}
    assert len(decisions) == n and sum(by_origin.values()) == n, by_origin
    assert by_origin[f"{ORIGIN}-w0"] > 0 and by_origin[f"{ORIGIN}-w1"] > 0, by_origin
    files = {p.name for p in proxy.audit_dir.glob("*.jsonl")}
    assert any(f.startswith(f"{ORIGIN}-w0-") for f in files), files
    assert any(f.startswith(f"{ORIGIN}-w1-") for f in files), files
    # admin port + i is worker i: its metrics count exactly its own decisions
    for i in (0, 1):
        counted = sum(v for _, v in metrics(admin + i).samples("residency_gate_decisions_total"))
        assert counted == by_origin[f"{ORIGIN}-w{i}"], (i, counted, by_origin)
    assert fake.received() == []

    # 2. SIGHUP to the supervisor reloads every worker (a change the file watcher cannot see)
    cfg = dict(proxy.config)
    cfg["residency"] = {"clients": [{"cidr": "127.0.0.0/8", "require": "us"}]}
    same_size_change(proxy, cfg)
    time.sleep(1.2)
    assert [metrics(admin + i).value("residency_gate_config_reloads_total", result="ok")
            for i in (0, 1)] == [0, 0]
    proxy.proc.send_signal(signal.SIGHUP)
    for i in (0, 1):
        wait_for(lambda i=i: metrics(admin + i).value(
            "residency_gate_config_reloads_total", result="ok") == 1, 10,
            what=f"worker {i} reloaded")
    assert [one_request(proxy, "us.api.openai.com") for _ in range(8)] == [200] * 8
    assert len(fake.received()) == 8

    # 3. a worker that dies is restarted; the other one keeps serving meanwhile
    os.kill(pids[1], signal.SIGKILL)
    wait_for(lambda: not alive(pids[1]), 5, what="worker 1 gone")
    # Connections the kernel had already queued on the dying (or just restarted) worker's
    # socket are reset: SO_REUSEPORT semantics, documented. At most one such reset, retried.
    resets = 0
    statuses = []
    for _ in range(4):
        try:
            statuses.append(one_request(proxy, "us.api.openai.com"))
        except ConnectionResetError:
            resets += 1
            statuses.append(one_request(proxy, "us.api.openai.com"))
    assert statuses == [200] * 4 and resets <= 1, (statuses, resets)
    wait_for(lambda: worker_pids(proxy).get(1) not in (None, pids[1]), 20,
             what="worker 1 restarted")
    assert re.search(rf"worker 1 \(pid {pids[1]}\) died unexpectedly.*killed by SIGKILL; "
                     "restarting", proxy.log_text())
    new1 = worker_pids(proxy)[1]
    wait_for(lambda: admin_get(admin + 1, "/healthz")[0] == 200, 10, what="worker 1 admin")
    # the restarted worker has a fresh process: its reload counter starts at 0
    assert metrics(admin + 1).value("residency_gate_config_reloads_total", result="ok") == 0

    # 4. SIGTERM stops every worker cleanly: exit 0, no child left, audit chains intact
    assert proxy.stop(timeout=25) == 0
    assert not alive(pids[0]) and not alive(new1)
    log = proxy.log_text()
    assert "all workers stopped" in log and "not all cleanly" not in log
    with socket.socket() as s:  # nobody listens on the shared port any more
        assert s.connect_ex((proxy.host, proxy.port)) != 0
    verify = subprocess.run(
        [str(RESIDENCY_GATE), "audit", "verify", str(proxy.audit_dir),
         "--pubkey", str(proxy.certs_dir / "audit-signing-key.pub.pem")],
        capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    origins = {r["origin"] for r in audit_records(proxy.audit_dir)}
    assert origins == {f"{ORIGIN}-w0", f"{ORIGIN}-w1"}


def test_workers_refuse_a_port_already_in_use(tmp_path: Path, fake: FakeProvider) -> None:
    """`run --workers 2` on a port held by another process: exit 1 at once, nothing started."""
    cfg = base_config(tmp_path, fake)
    cfg["admin"] = f"127.0.0.1:{free_port()}"
    config_path = tmp_path / "residency-gate.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    port = int(cfg["listen"].rpartition(":")[2])
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        t0 = time.monotonic()
        out = subprocess.run(
            [str(RESIDENCY_GATE), "run", "-c", str(config_path), "--workers", "2"],
            capture_output=True, text=True, timeout=30, cwd=tmp_path)
        took = time.monotonic() - t0
    assert out.returncode == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "starting 2 workers" not in out.stderr
    assert took < 10
