"""The container files: Dockerfile lint, entrypoint behaviour, compose/k8s/HAProxy configs.

No container engine is needed: the Dockerfile is parsed and checked, the
entrypoint runs under a POSIX shell with a stub `residency-gate` on PATH, and
the health check command runs against a real admin listener.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SHELL = shutil.which("dash") or shutil.which("sh")


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def test_dockerfile_base_image_is_pinned_python_312_slim():
    froms = instr("FROM")
    assert len(froms) >= 1
    for image in froms:
        image = image.split()[0]
        assert ":" in image, f"unpinned base image {image}"
        assert "latest" not in image
    final = froms[-1].split()[0]
    # a full version tag (3.12.N), not a moving one like 3.12 or 3.12-slim
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", final), final


def test_dockerfile_runs_as_non_root():
    users = instr("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # USER comes after the last RUN (nothing runs as root afterwards by accident)
    words = [w for w, _ in dockerfile_instructions()]
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")


def test_dockerfile_healthcheck_ports_volumes_entrypoint():
    hc = instr("HEALTHCHECK")
    assert len(hc) == 1 and "/healthz" in hc[0] and "CMD" in hc[0]
    exposed = " ".join(instr("EXPOSE")).split()
    assert "8080" in exposed and "9464" in exposed
    volumes = " ".join(instr("VOLUME"))
    assert "/data/certs" in volumes and "/data/audit" in volumes
    entry = json.loads(instr("ENTRYPOINT")[-1])
    assert entry == ["/usr/local/bin/residency-gate-entrypoint"]
    assert any("docker/entrypoint.sh" in c and entry[0] in c for c in instr("COPY"))
    # dependencies come from the constraints file
    runs = " ".join(instr("RUN"))
    assert "docker/constraints.txt" in runs


def test_dockerfile_copy_sources_exist():
    missing = []
    for args in instr("COPY"):
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            if not (REPO / src).exists():
                missing.append(src)
    if missing == ["README.md"]:
        pytest.skip("README.md not written yet (pyproject.toml needs it too)")
    assert not missing, missing


def healthcheck_command() -> list[str]:
    hc = instr("HEALTHCHECK")[0]
    return json.loads(hc[hc.index("CMD") + 3 :].strip())


def test_healthcheck_command_against_a_real_admin_listener():
    from prometheus_client import CollectorRegistry

    from residency_gate.ops.admin import AdminServer

    cmd = healthcheck_command()
    assert cmd[0] == "python"
    cmd[0] = sys.executable
    loop = asyncio.new_event_loop()
    srv = AdminServer("127.0.0.1", 0, CollectorRegistry(), lambda: {"ok": True})
    loop.run_until_complete(srv.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    env = {
        **os.environ,
        "RG_ADMIN": f"0.0.0.0:{srv.port}",
        # must not be used for the loopback health check
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    try:
        ok = subprocess.run(cmd, env=env, capture_output=True, timeout=20)
        assert ok.returncode == 0, ok.stderr
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
    down = subprocess.run(cmd, env=env, capture_output=True, timeout=20)
    assert down.returncode != 0


# --------------------------------------------------------------------------- constraints

TEST_ONLY = {"pytest", "openai", "anthropic", "boto3", "google-genai", "trustme", "ruff",
             "websockets", "pluggy", "iniconfig"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned: {line}"
            pins[_norm(name)] = version
    return pins


def test_constraints_pin_every_runtime_dependency_and_no_test_tools():
    pins = constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        assert _norm(name) in pins, f"{name} is not pinned in docker/constraints.txt"
    assert not TEST_ONLY & set(pins), TEST_ONLY & set(pins)


def test_constraints_match_the_tested_venv():
    from importlib.metadata import PackageNotFoundError, version

    drift = {}
    for name, pinned in constraints().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if installed != pinned:
            drift[name] = (pinned, installed)
    assert not drift, f"regenerate docker/constraints.txt: {drift}"


# --------------------------------------------------------------------------- entrypoint

STUB = """#!/bin/sh
# records how it was called, then exits
printf '%s\\n' "$$" > "$STUB_DIR/pid"
: > "$STUB_DIR/argv"
for a in "$@"; do printf '%s\\n' "$a" >> "$STUB_DIR/argv"; done
exit 0
"""


@pytest.fixture
def stub(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "residency-gate"
    exe.write_text(STUB)
    exe.chmod(0o755)
    return tmp_path


def run_entrypoint(stub: Path, *args: str, **env: str):
    base = {
        "PATH": f"{stub / 'bin'}:/usr/bin:/bin",
        "STUB_DIR": str(stub),
        "RG_CONFIG": str(stub / "etc" / "residency-gate.yaml"),
        "RG_DATA": str(stub / "data"),
        "TMPDIR": str(stub / "tmp"),
    }
    base.update(env)
    proc = subprocess.Popen(
        [SHELL, str(ENTRYPOINT), *args], env=base, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    _out, err = proc.communicate(timeout=20)
    argv = None
    if (stub / "argv").exists():
        argv = (stub / "argv").read_text().splitlines()
    return proc, err, argv


def test_entrypoint_is_valid_posix_sh():
    for shell in {shutil.which("sh"), shutil.which("dash")} - {None}:
        r = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK)
    assert "TODO" not in ENTRYPOINT.read_text()


def test_entrypoint_without_config_writes_a_valid_default_and_execs_run(stub):
    proc, err, argv = run_entrypoint(stub)
    assert proc.returncode == 0, err
    default = stub / "tmp" / "residency-gate.yaml"
    assert argv == ["run", "-c", str(default)]
    # exec: the stub replaced the shell, same process id
    assert int((stub / "pid").read_text()) == proc.pid
    cfg = yaml.safe_load(default.read_text())
    data = stub / "data"
    assert cfg == {
        "listen": "0.0.0.0:8080",
        "mode": "regular",
        "admin": "0.0.0.0:9464",
        "certs_dir": f"{data}/certs",
        "audit": {"dir": f"{data}/audit"},
    }
    assert (data / "certs").is_dir() and (data / "audit").is_dir()
    assert "no config at" in err
    # and the product's own config loader accepts it
    from residency_gate.catalog.config import load_config

    config = load_config(default)
    assert config.listen == ("0.0.0.0", 8080)
    assert config.admin == ("0.0.0.0", 9464)
    assert config.certs_dir == data / "certs"
    assert config.audit.dir == data / "audit"


def test_entrypoint_listen_and_admin_from_environment(stub):
    proc, err, argv = run_entrypoint(stub, RG_LISTEN="127.0.0.1:3128", RG_ADMIN="127.0.0.1:9999")
    assert proc.returncode == 0, err
    cfg = yaml.safe_load(Path(argv[2]).read_text())
    assert cfg["listen"] == "127.0.0.1:3128" and cfg["admin"] == "127.0.0.1:9999"


def test_entrypoint_uses_a_mounted_config_untouched(stub):
    etc = stub / "etc"
    etc.mkdir()
    mounted = etc / "residency-gate.yaml"
    mounted.write_text("listen: 0.0.0.0:8080\n")
    proc, err, argv = run_entrypoint(stub, "run", "--extra")
    assert proc.returncode == 0, err
    assert argv == ["run", "-c", str(mounted), "--extra"]
    assert mounted.read_text() == "listen: 0.0.0.0:8080\n"
    assert not (stub / "tmp" / "residency-gate.yaml").exists()


def test_entrypoint_passes_other_commands_and_explicit_config_through(stub):
    proc, err, argv = run_entrypoint(stub, "audit", "verify", "/data/audit", "--json")
    assert proc.returncode == 0, err
    assert argv == ["audit", "verify", "/data/audit", "--json"]
    proc, err, argv = run_entrypoint(stub, "run", "-c", "/x/y.yaml")
    assert argv == ["run", "-c", "/x/y.yaml"]
    proc, err, argv = run_entrypoint(stub, "check", "-c", "/x/y.yaml")
    assert argv == ["check", "-c", "/x/y.yaml"]


def test_entrypoint_refuses_values_that_would_break_the_yaml(stub):
    proc, err, argv = run_entrypoint(stub, RG_LISTEN='0.0.0.0:80"\nmode: x')
    assert proc.returncode == 2
    assert argv is None
    assert "RG_LISTEN" in err


# --------------------------------------------------------------------------- compose, k8s


def _schema_check(text: str, file: str) -> None:
    from residency_gate.catalog.schema import schema_problems
    from residency_gate.catalog.source import parse_yaml

    problems = schema_problems(parse_yaml(text, file), "config")
    assert not problems, [str(p) for p in problems]


def test_container_config_is_valid():
    path = DOCKER / "config" / "residency-gate.yaml"
    _schema_check(path.read_text(), str(path))
    from residency_gate.catalog.config import load_config

    config = load_config(path)
    assert config.admin == ("0.0.0.0", 9464)
    assert config.listen == ("0.0.0.0", 8080)


def test_compose_file():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = doc["services"]["residency-gate"]
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    targets = {}
    for v in svc["volumes"]:
        src, dst = v.split(":")[:2]
        targets[dst] = src
    assert targets["/etc/residency-gate"] == "./config"
    assert (DOCKER / "config" / "residency-gate.yaml").is_file()
    assert (DOCKER / targets["/app/catalog"]).resolve() == REPO / "catalog"
    assert targets["/data/certs"] in doc["volumes"]
    assert targets["/data/audit"] in doc["volumes"]
    ports = [str(p) for p in svc["ports"]]
    assert "8080:8080" in ports
    assert "127.0.0.1:9464:9464" in ports  # admin stays on host loopback
    assert svc.get("init") is True


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((DOCKER / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def test_k8s_manifests_parse_and_fit_together():
    docs = k8s_docs()
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    kust = by_kind["Kustomization"][0]
    for res in kust["resources"]:
        assert (DOCKER / "k8s" / res).is_file(), res

    (sts,) = by_kind["StatefulSet"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # one audit volume per replica
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert "audit" in claims and mounts["audit"] == "/data/audit"
    # probes on the admin port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"proxy": 8080, "admin": 9464}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # non-root, read-only
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # every volume a mount uses exists, every ConfigMap it names exists
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in mounts:
        assert name in volumes or name in claims, name
    configmaps = {c["metadata"]["name"]: c for c in by_kind["ConfigMap"]}
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in configmaps
    # services select the pods
    for svc in by_kind["Service"]:
        assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in by_kind["Service"]}

    # the embedded config is valid and points at the mounts
    text = configmaps["residency-gate-config"]["data"]["residency-gate.yaml"]
    _schema_check(text, "configmap:residency-gate.yaml")
    cfg = yaml.safe_load(text)
    assert mounts["config"] == "/etc/residency-gate"
    assert container["args"] == ["run", "-c", "/etc/residency-gate/residency-gate.yaml"]
    assert cfg["audit"]["dir"] == mounts["audit"]
    assert cfg["certs_dir"] == mounts["certs"]
    assert cfg["catalog"] == [mounts["catalog"]]
    assert cfg["admin"].endswith(":9464") and cfg["listen"].endswith(":8080")


def test_haproxy_balances_tcp_over_consecutive_worker_ports():
    text = (DOCKER / "haproxy.cfg").read_text()
    assert re.search(r"^\s*mode tcp\s*$", text, re.M)
    assert re.search(r"^\s*bind :8080\s*$", text, re.M)
    servers = re.findall(r"^\s*server (\S+) 127\.0\.0\.1:(\d+) check port (\d+)", text, re.M)
    assert len(servers) >= 2
    ports = [int(p) for _, p, _ in servers]
    assert ports == list(range(8081, 8081 + len(ports)))
    admin = [int(p) for _, _, p in servers]
    assert admin == list(range(9465, 9465 + len(admin)))
    assert "/readyz" in text
    haproxy = shutil.which("haproxy")
    if haproxy:
        r = subprocess.run([haproxy, "-c", "-f", str(DOCKER / "haproxy.cfg")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
