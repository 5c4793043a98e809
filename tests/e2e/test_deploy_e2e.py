"""What a new admin trips over, against the real proxy process (issue 12): the first
provider file in an empty catalog directory, the open-relay rules (who may connect,
where CONNECT may go), a port already taken, the CA's name, the README's curl line.

Clients from another address than loopback come from a network namespace this test
makes (a veth pair with its own addresses), as in test_transparent_e2e.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import RESIDENCY_GATE, TAG_HEADER, Proxy
from .fakeprovider import PLAIN_HOST, PLAIN_PAGE, FakeProvider, free_port
from .netns import missing, sh, veth_namespace
from .opshelpers import CHAT, KeepAlive, metrics, wait_reloads
from .rawhttp import connect_tunnel, tunnel_request

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MISTRAL = REPO / "catalog" / "providers" / "mistral.yaml"
MISTRAL_BODY = {"model": "mistral-large-latest", "messages": []}


def admin_port(proxy: Proxy) -> int:
    return int(str(proxy.config["admin"]).rpartition(":")[2])


def rewrite_config(proxy: Proxy, config: dict[str, Any]) -> None:
    proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    proxy.config = config


# ---------------------------------------------------------------------------
# hot reload: an extra catalog directory that starts empty (the Kubernetes ConfigMap)


def configmap_update(mount: Path, files: dict[str, str]) -> None:
    """Update a mounted ConfigMap the way the kubelet does: the keys are written to a new
    timestamped directory, `..data` is swapped to it atomically, and each key is a
    symlink `name -> ..data/name` in the mount directory."""
    stamp = mount / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    (mount / "..data_tmp").symlink_to(stamp.name)
    os.rename(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    for entry in mount.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    if old:
        shutil.rmtree(mount / old)


def test_first_provider_file_in_an_empty_catalog_configmap_reloads(
    start_proxy: Any, fake: FakeProvider, tmp_path: Path
) -> None:
    mount = tmp_path / "residency-gate-catalog"  # the ConfigMap as shipped: no keys
    mount.mkdir()
    configmap_update(mount, {})
    proxy = start_proxy({
        "admin": f"127.0.0.1:{free_port()}",
        "catalog": [str(mount)],
        "residency": {"clients": [{"cidr": "127.0.0.0/8", "require": "us"}]},
    })
    port = admin_port(proxy)
    shipped = SHIPPED_MISTRAL.read_text()
    assert "    places: [global]\n" in shipped
    in_us = shipped.replace("    places: [global]\n", "    places: [us]\n", 1)
    client = KeepAlive(proxy, "api.mistral.ai")
    try:
        r = client.post(body=MISTRAL_BODY)
        assert (r.status, r.decision) == (451, "block"), r  # shipped: api.mistral.ai is global

        # the first key arrives: same provider id, so it replaces the shipped file; it
        # says this host stays in the US
        configmap_update(mount, {"mistral.yaml": in_us})
        wait_reloads(port, "ok", 1)
        r = client.post(body=MISTRAL_BODY)
        assert (r.status, r.decision) == (200, "allow"), r

        # a later edit of that key only swaps ..data: seen as well
        configmap_update(mount, {"mistral.yaml": shipped + "# edited\n"})
        wait_reloads(port, "ok", 2)
        assert client.post(body=MISTRAL_BODY).status == 451

        # and a plain file dropped into a plain directory counts the same
        configmap_update(mount, {})
        wait_reloads(port, "ok", 3)
        (mount / "mistral-us.yaml").write_text(in_us)
        wait_reloads(port, "ok", 4)
        r = client.post(body=MISTRAL_BODY)
        assert (r.status, r.decision) == (200, "allow"), r
    finally:
        client.close()
    assert len(fake.received(host="api.mistral.ai")) == 2
    assert metrics(port).value("residency_gate_config_reloads_total", result="error") == 0


# ---------------------------------------------------------------------------
# not an open relay: CONNECT ports


def raw_connect(proxy: Proxy, target: str) -> tuple[str, bytes]:
    """CONNECT target through the proxy: (status line, body of a refusal)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        while length and len(body) < int(length.group(1)):
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
    return head.split(b"\r\n", 1)[0].decode(), body


def tunnelled_page(proxy: Proxy, fake: FakeProvider, port: int) -> bytes:
    """CONNECT plain host:port, TLS trusting only the fake's CA (not intercepted), GET /."""
    ctx = ssl.create_default_context(cafile=str(fake.ca_pem))
    return tunnel_request(proxy.host, proxy.port, connect_host=PLAIN_HOST, connect_port=port,
                          ssl_context=ctx, method="GET").body


def test_connect_only_to_allowed_ports(start_proxy: Any, fake: FakeProvider) -> None:
    proxy = start_proxy({
        "admin": f"127.0.0.1:{free_port()}",
        # the fake answers for any port: `resolve` sends these there
        "resolve": {f"{PLAIN_HOST}:8443": fake.addr, f"{PLAIN_HOST}:22": fake.addr,
                    "api.openai.com:8443": fake.addr},
    })
    port = admin_port(proxy)
    # 443: tunnelled as always
    assert PLAIN_PAGE in tunnelled_page(proxy, fake, 443)
    # anything else: 403 saying what is allowed, nothing reaches the other side
    for target in (f"{PLAIN_HOST}:22", f"{PLAIN_HOST}:8443", "api.openai.com:8443"):
        status, body = raw_connect(proxy, target)
        assert status.startswith("HTTP/1.1 403"), (target, status)
        assert f"CONNECT to {target}" in body.decode() and "access.connect_ports" in body.decode()
    assert len(fake.received()) == 1
    m = metrics(port)
    assert m.value("residency_gate_refused_connections_total", reason="connect_port") == 3
    assert "refused CONNECT plain.example.test:22" in proxy.log_text()

    # a port the operator adds (a reload, no restart)
    rewrite_config(proxy, {**proxy.config, "access": {"connect_ports": [443, 8443]}})
    wait_reloads(port, "ok", 1)
    assert PLAIN_PAGE in tunnelled_page(proxy, fake, 8443)
    assert raw_connect(proxy, f"{PLAIN_HOST}:22")[0].startswith("HTTP/1.1 403")


def test_proxy_auth_answers_before_the_port_rule(start_proxy: Any, tmp_path: Path) -> None:
    """Without credentials a client learns nothing about the allowed ports."""
    proxy = start_proxy({"proxy_auth": "alice:s3cret"})
    assert raw_connect(proxy, f"{PLAIN_HOST}:22")[0].startswith("HTTP/1.1 407")


# ---------------------------------------------------------------------------
# not an open relay: listening beyond loopback


def check(config: dict[str, Any], tmp_path: Path, command: str = "check"
          ) -> subprocess.CompletedProcess:
    path = tmp_path / "residency-gate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([str(RESIDENCY_GATE), command, "-c", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_listening_beyond_loopback_needs_auth_or_client_networks(tmp_path: Path) -> None:
    base = {"listen": f"0.0.0.0:{free_port()}", "admin": None,
            "certs_dir": str(tmp_path / "certs"), "audit": {"dir": str(tmp_path / "audit")}}
    for command in ("check", "run"):
        r = check(base, tmp_path, command)
        assert r.returncode == 1, r.stdout + r.stderr
        assert re.search(r"residency-gate\.yaml:1: listen 0\.0\.0\.0:\d+ takes connections "
                         r"from other machines", r.stderr), r.stderr
        assert "access.clients" in r.stderr and "proxy_auth" in r.stderr
    assert not (tmp_path / "certs").exists(), "run refused before creating anything"
    assert check({**base, "access": {"clients": ["10.20.0.0/16"]}}, tmp_path).returncode == 0
    assert check({**base, "proxy_auth": "alice:s3cret"}, tmp_path).returncode == 0
    assert check({**base, "listen": "127.0.0.1:8080"}, tmp_path).returncode == 0
    assert check({**base, "mode": "reverse:https://example.com"}, tmp_path).returncode == 0


NS = f"rg-a{os.getpid() % 100000}"
VETH_HOST, VETH_CLIENT = f"rgah{os.getpid() % 100000}", f"rgac{os.getpid() % 100000}"
HOST_IP, CLIENT_IP = "10.213.8.1", "10.213.8.2"  # this test's own veth pair, nothing else


@pytest.fixture
def client_netns() -> Iterator[None]:
    if (why := missing("curl")) is not None:
        pytest.skip(why)
    with veth_namespace(NS, VETH_HOST, VETH_CLIENT, HOST_IP, CLIENT_IP):
        yield


def curl_from_client(proxy: Proxy, url: str) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", NS, "curl", "-sS", "--max-time", "15",
              "--proxy", f"http://{HOST_IP}:{proxy.port}", "--cacert", str(proxy.ca_pem),
              "-o", "-", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
              "-d", '{"model":"gpt-4o","messages":[]}', url, check=False)


def test_only_listed_client_networks_may_use_the_proxy(
    client_netns: None, start_proxy: Any, fake: FakeProvider
) -> None:
    proxy = start_proxy({
        "listen": f"{HOST_IP}:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "access": {"clients": [f"{CLIENT_IP}/32"]},
    })
    port = admin_port(proxy)
    url = f"https://api.openai.com{CHAT}"
    ok = curl_from_client(proxy, url)
    assert ok.returncode == 0 and ok.stdout.endswith("\n200"), ok.stdout + ok.stderr
    assert len(fake.received(path_prefix=CHAT)) == 1

    # the client's network is no longer listed: its connections are closed unanswered
    rewrite_config(proxy, {**proxy.config, "access": {"clients": ["10.99.0.0/16"]}})
    wait_reloads(port, "ok", 1)
    refused = curl_from_client(proxy, url)
    assert refused.returncode != 0, refused.stdout
    assert len(fake.received(path_prefix=CHAT)) == 1
    assert metrics(port).value("residency_gate_refused_connections_total", reason="client") >= 1
    assert f"client {CLIENT_IP} is not in access.clients" in proxy.log_text()


# ---------------------------------------------------------------------------
# a port already taken


def test_port_in_use_says_which_config_line_to_change(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "residency-gate.yaml"
        config.write_text(f"# gateway\nlisten: 127.0.0.1:{port}\nadmin: null\n"
                          f"certs_dir: {tmp_path / 'certs'}\n")
        r = subprocess.run([str(RESIDENCY_GATE), "run", "-c", str(config)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert (f"cannot listen on 127.0.0.1:{port}: the port is already in use" in r.stderr), r.stderr
    assert f"change `listen:` in {config}:2" in r.stderr
    assert "--mode" not in r.stderr  # mitmproxy's flag; residency-gate has none
    assert not (tmp_path / "certs").exists()


# ---------------------------------------------------------------------------
# the CA's name


def test_interception_ca_carries_the_configured_names(start_proxy: Any, fake: FakeProvider
                                                      ) -> None:
    proxy = start_proxy({"ca": {"organization": "ACME Corp",
                                "common_name": "ACME LLM egress inspection CA"}})
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(proxy.ca_pem.read_bytes())
    assert ca.subject.rfc4514_string() == "O=ACME Corp,CN=ACME LLM egress inspection CA"
    # and it is the CA that signs what clients see for an intercepted host
    sock = connect_tunnel(proxy.host, proxy.port, "api.openai.com")
    with proxy.ssl_context().wrap_socket(sock, server_hostname="api.openai.com") as tls:
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert leaf.issuer == ca.subject
    assert "CN=ACME LLM egress inspection CA" in (proxy.stderr_path.read_text())


# ---------------------------------------------------------------------------
# the README's first request


def test_readme_curl_line_gets_the_refusal(start_proxy: Any, fake: FakeProvider) -> None:
    if shutil.which("curl") is None:
        pytest.skip("needs curl")
    proxy = start_proxy()
    block = re.search(r"```sh\n(export HTTPS_PROXY.*?)```", (REPO / "README.md").read_text(),
                      re.S).group(1)
    # the README's lines, on this test's proxy port instead of 8080
    script = block.replace("127.0.0.1:8080", f"{proxy.host}:{proxy.port}")
    curl = next(ln for ln in script.splitlines() if ln.startswith("curl "))
    script = script.replace(curl, curl.split("#", 1)[0] + " -sS -o body -w '%{http_code}'")
    env = {"PATH": os.environ["PATH"], "HOME": str(proxy.workdir)}
    r = subprocess.run(["bash", "-c", script], cwd=proxy.workdir, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "451", r.stdout + r.stderr
    assert f"-H '{TAG_HEADER}: eu'" in curl
    message = json.loads((proxy.workdir / "body").read_text())["error"]["message"]
    assert "requirement eu" in message
    assert fake.received(host="api.openai.com") == []
