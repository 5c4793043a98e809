"""A client with an address of its own: a network namespace joined to this host by a veth
pair with the test's own /30 (nothing else is ever addressed). Needs root and `ip`."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def missing(*tools: str) -> str | None:
    """Why a namespace test cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", *tools):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@contextmanager
def veth_namespace(ns: str, veth_host: str, veth_client: str, host_ip: str,
                   client_ip: str) -> Iterator[None]:
    """Namespace `ns` with `client_ip` on its end of a veth pair; `host_ip` on ours."""
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_client)
        sh("ip", "link", "set", veth_client, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", veth_host)
        sh("ip", "link", "set", veth_host, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{client_ip}/30", "dev", veth_client)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", veth_client, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield
    finally:
        sh("ip", "link", "del", veth_host, check=False)
        sh("ip", "netns", "del", ns, check=False)
