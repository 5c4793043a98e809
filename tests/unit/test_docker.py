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


def build_args() -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM."""
    out = {}
    for word, args in dockerfile_instructions():
        if word == "FROM":
            break
        if word == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            out[name.strip()] = value.strip()
    return out


def base_images() -> list[str]:
    args = build_args()
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0])
            for f in instr("FROM")]


def test_dockerfile_base_image_is_python_312_slim_pinned_by_digest():
    images = base_images()
    assert len(images) == 2, "a build stage and the runtime stage"
    for image in images:
        # a full version tag (3.12.N, not a moving 3.12) and the digest: the same bytes
        # on every build
        assert re.fullmatch(r"python:3\.12\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), image
    assert len(set(images)) == 1, "both stages on the same base (the venv is copied across)"


def test_dockerfile_needs_no_frontend_image():
    # a `# syntax=` directive makes BuildKit pull a frontend image before building
    first = (DOCKER / "Dockerfile").read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), first
    assert not re.search(r"--mount=|<<\w", (DOCKER / "Dockerfile").read_text()), \
        "BuildKit-only syntax"


def test_dockerfile_installs_hashed_dependencies_and_the_package_not_editable():
    runs = " ".join(instr("RUN"))
    assert "--require-hashes --requirement /src/docker/requirements.txt" in runs
    assert "--editable" not in runs and " -e " not in runs
    # residency-gate itself: from the copied source, nothing downloaded
    assert re.search(r"pip install --no-deps --no-build-isolation --no-index /src\b", runs)
    assert "pip uninstall --yes setuptools" in runs
    copies = instr("COPY")
    assert any(c.startswith("--from=build /opt/venv") for c in copies)


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


def test_dockerfile_copy_sources_exist():
    missing = []
    for args in instr("COPY"):
        if args.startswith("--from="):
            continue  # from the build stage
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


# --------------------------------------------------------------------------- requirements

TEST_ONLY = {"pytest", "openai", "anthropic", "boto3", "google-genai", "trustme", "ruff",
             "websockets", "pluggy", "iniconfig"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> dict[str, tuple[str, list[str]]]:
    """docker/requirements.txt: name -> (version, hashes)."""
    text = (DOCKER / "requirements.txt").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, sep, version = spec.partition("==")
        assert sep, f"not pinned: {line}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        pins[_norm(name)] = (version, hashes)
    return pins


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs}


def test_requirements_are_hashed_and_hold_no_test_tools():
    pins = requirements()
    for name, (_version, hashes) in pins.items():
        assert hashes, f"{name} has no hash"
    assert not TEST_ONLY & set(pins), TEST_ONLY & set(pins)


def test_requirements_follow_pyproject():
    """requirements.in is pyproject's runtime dependencies plus the build backend, and the
    generated requirements.txt pins each of them."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = list(pyproject["project"]["dependencies"]) + pyproject["build-system"]["requires"]
    lines = [ln.strip() for ln in (DOCKER / "requirements.in").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert sorted(lines) == sorted(wanted)
    assert _requirement_names(wanted) <= set(requirements())


def test_requirements_match_the_tested_venv():
    from importlib.metadata import PackageNotFoundError, version

    drift = {}
    for name, (pinned, _) in requirements().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        if installed != pinned:
            drift[name] = (pinned, installed)
    assert not drift, f"regenerate docker/requirements.txt (see requirements.in): {drift}"


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories
    decides; `!` re-includes; `*` and `?` stay within one path segment, `**` spans any."""

    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.removeprefix("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerignore_keeps_secrets_venv_and_build_output_out_of_the_context():
    patterns = dockerignore()
    for path in (".venv/lib/python3.12/site-packages/mitmproxy/__init__.py",
                 "certs/mitmproxy-ca.pem", "certs/audit-signing-key.pem",
                 "var/audit/gw1-8080-000001.jsonl", "residency-gate.yaml", ".git/config",
                 "build/lib/residency_gate/__init__.py", "residency_gate.egg-info/PKG-INFO",
                 "addons/residency_gate.egg-info/PKG-INFO",
                 "addons/residency_gate/__pycache__/addon.cpython-312.pyc",
                 "catalog/__pycache__/__init__.cpython-312.pyc", "tests/unit/test_docker.py",
                 ".pytest_cache/v/cache/lastfailed"):
        assert dockerignore_excludes(path, patterns), f"{path} would be in the build context"


def test_dockerignore_lets_through_everything_the_dockerfile_copies():
    patterns = dockerignore()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    for args in instr("COPY"):
        if args.startswith("--from="):
            continue
        for src in [p for p in shlex.split(args) if not p.startswith("--")][:-1]:
            files = [f for f in tracked if f == src or f.startswith(src + "/")]
            assert files, src
            for f in files:
                assert not dockerignore_excludes(f, patterns), f"{f} is needed by COPY {src}"


def test_build_context_of_this_checkout_is_small():
    """What `docker build .` would send from this very checkout (with its .venv, certs...)."""
    patterns = dockerignore()
    total, sent = 0, []
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not dockerignore_excludes(rel_root + d, patterns)
                   or any(p.startswith("!" + rel_root + d) for p in patterns)]
        for f in files:
            rel = rel_root + f
            if not dockerignore_excludes(rel, patterns):
                sent.append(rel)
                total += os.path.getsize(os.path.join(root, f))
    assert total < 5 << 20, f"{total} bytes in the build context"
    assert not [f for f in sent if f.startswith(("certs/", ".venv/", "var/", ".git/"))]
    assert not [f for f in sent if "__pycache__" in f or ".egg-info" in f]


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
    (stub / "argv").unlink(missing_ok=True)
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
    proc, err, argv = run_entrypoint(stub, HOSTNAME="gw1")
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
        "access": {"clients": ["172.16.0.0/12", "192.168.0.0/16"]},  # Docker's bridges
        "audit": {"dir": f"{data}/audit", "origin": None},  # the host name: gw1-8080
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
    assert [str(n) for n in config.access.clients] == ["172.16.0.0/12", "192.168.0.0/16"]
    assert config.access.connect_ports == {443}


def default_origin(stub: Path, **env: str) -> tuple[str | None, str]:
    proc, err, argv = run_entrypoint(stub, **env)
    assert proc.returncode == 0, err
    return yaml.safe_load(Path(argv[2]).read_text())["audit"]["origin"], err


def test_entrypoint_audit_origin_survives_recreating_the_container(stub):
    """`docker run` names the container's host after its ID, new with every re-creation:
    the origin (and so the audit chain) must not follow it."""
    first, err = default_origin(stub, HOSTNAME="3f2a9c01d4e5")
    again, _ = default_origin(stub, HOSTNAME="77b0c1d2e3f4")
    assert first == again == "residency-gate"
    assert "container ID" in err and "RG_ORIGIN" in err
    assert default_origin(stub, HOSTNAME="3f2a9c01d4e5", RG_ORIGIN="gw1")[0] == "gw1"
    assert default_origin(stub, HOSTNAME="rg-edge")[0] is None  # a chosen name: kept
    proc, err, argv = run_entrypoint(stub, RG_ORIGIN="a b")
    assert proc.returncode == 2 and argv is None and "RG_ORIGIN" in err


def test_entrypoint_client_networks_from_environment(stub):
    proc, err, argv = run_entrypoint(stub, RG_CLIENTS="10.20.0.0/16,fd00::/8")
    assert proc.returncode == 0, err
    cfg = yaml.safe_load(Path(argv[2]).read_text())
    assert cfg["access"] == {"clients": ["10.20.0.0/16", "fd00::/8"]}
    proc, err, argv = run_entrypoint(stub, RG_CLIENTS='10.0.0.0/8"]\nproxy_auth: x')
    assert proc.returncode == 2 and argv is None and "RG_CLIENTS" in err
    # none at all on 0.0.0.0: the proxy itself refuses to be an open relay
    proc, err, argv = run_entrypoint(stub, RG_CLIENTS="")
    from residency_gate.catalog.config import load_config
    from residency_gate.catalog.source import InvalidSource

    with pytest.raises(InvalidSource, match=r"access\.clients"):
        load_config(Path(argv[2]))


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


def load_mounted(text: str, tmp_path: Path, mounts: dict[str, Path]):
    """load_config on a container config, its container paths mapped to host paths."""
    from residency_gate.catalog.config import load_config

    for inside, outside in sorted(mounts.items(), key=lambda m: -len(m[0])):
        text = text.replace(inside, str(outside))
    path = tmp_path / "residency-gate.yaml"
    path.write_text(text)
    return load_config(path)


def compose_service() -> tuple[dict, dict]:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return doc, doc["services"]["residency-gate"]


def compose_mounts() -> dict[str, str]:
    _doc, svc = compose_service()
    return {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}


def test_container_config_is_valid(tmp_path):
    path = DOCKER / "config" / "residency-gate.yaml"
    _schema_check(path.read_text(), str(path))
    mounts = compose_mounts()
    catalog = (DOCKER / mounts["/etc/residency-gate-catalog"]).resolve()
    config = load_mounted(path.read_text(), tmp_path, {
        "/etc/residency-gate-catalog": catalog, "/data": tmp_path / "data"})
    assert config.admin == ("0.0.0.0", 9464)
    assert config.listen == ("0.0.0.0", 8080)
    assert config.catalog == (catalog,)
    # not an open relay: only Docker's bridge networks (the published port, neighbours)
    assert [str(n) for n in config.access.clients] == ["172.16.0.0/12", "192.168.0.0/16"]
    assert config.access.connect_ports == {443}


def test_compose_file():
    doc, svc = compose_service()
    assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    targets = compose_mounts()
    assert targets["/etc/residency-gate"] == "./config"
    assert (DOCKER / "config" / "residency-gate.yaml").is_file()
    assert (DOCKER / targets["/etc/residency-gate-catalog"]).resolve() == REPO / "catalog"
    assert targets["/data/certs"] in doc["volumes"]
    assert targets["/data/audit"] in doc["volumes"]
    ports = [str(p) for p in svc["ports"]]
    # both on host loopback: serving the LAN is a decision (docs/deploy.md)
    assert ports == ["127.0.0.1:8080:8080", "127.0.0.1:9464:9464"]
    assert svc.get("init") is True


def test_compose_audit_origin_is_the_same_after_every_recreation(stub, tmp_path):
    """What compose runs: the entrypoint with the service's environment and host name, the
    mounted config; the origin the proxy would use must not depend on the container."""
    _doc, svc = compose_service()
    assert svc["hostname"] == "residency-gate"
    mounted = DOCKER / compose_mounts()["/etc/residency-gate"] / "residency-gate.yaml"
    origins = set()
    for container_id in ("3f2a9c01d4e5", "77b0c1d2e3f4"):
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        proc, err, argv = run_entrypoint(stub, RG_CONFIG=str(mounted), HOSTNAME=container_id,
                                         **env)
        assert proc.returncode == 0, err
        assert argv == ["run", "-c", str(mounted)]
        config = load_mounted(mounted.read_text(), tmp_path, {
            "/etc/residency-gate-catalog": REPO / "catalog", "/data": tmp_path / "data"})
        origins.add(config.audit.origin)
    assert origins == {"residency-gate"}


def deploy_line(needle: str) -> str:
    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    (line,) = [ln.strip() for ln in text.splitlines() if needle in ln]
    return line


def docker_run(line: str) -> tuple[list[tuple[str, str]], list[str]]:
    """`docker run [OPTIONS] IMAGE [ARGS]` -> (volume mounts, args)."""
    words = shlex.split(line.split("#", 1)[0])
    assert words[:2] == ["docker", "run"], line
    mounts, i = [], 2
    while words[i].startswith("-"):
        if words[i] in ("-v", "--volume"):
            src, dst = words[i + 1].split(":")[:2]
            mounts.append((src, dst))
        if words[i] in ("-v", "--volume", "-p", "-e", "--name", "--hostname", "-u"):
            i += 1
        i += 1
    return mounts, words[i + 1:]


def run_in_emulated_container(line: str, volumes: dict[str, Path], root: Path):
    """The documented `docker run` with the real entrypoint and the real residency-gate:
    the image's empty /data dirs, named volumes where the line mounts them, cwd /data."""
    mounts, args = docker_run(line)
    shutil.rmtree(root, ignore_errors=True)
    for d in ("data/certs", "data/audit", "etc/residency-gate", "tmp"):
        (root / d).mkdir(parents=True)
    for src, dst in mounts:
        target = root / dst.lstrip("/")
        shutil.rmtree(target)
        shutil.copytree(volumes[src], target)
    args = [str(root) + a if a.startswith("/") else a for a in args]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(root),
           "RG_CONFIG": str(root / "etc/residency-gate/residency-gate.yaml"),
           "RG_DATA": str(root / "data"), "TMPDIR": str(root / "tmp")}
    return subprocess.run([SHELL, str(ENTRYPOINT), *args], cwd=root / "data", env=env,
                          capture_output=True, text=True, timeout=60)


def test_documented_verify_one_liner_verifies_the_volumes(tmp_path):
    import asyncio

    from residency_gate.audit.keys import load_or_create_signing_key
    from residency_gate.audit.writer import AuditWriter

    volumes = {"rg-certs": tmp_path / "vol-certs", "rg-audit": tmp_path / "vol-audit"}
    key = load_or_create_signing_key(volumes["rg-certs"])

    async def write() -> None:
        w = AuditWriter(volumes["rg-audit"], key, "residency-gate")
        w.open()
        await w.append("decision", {
            "client": "172.18.0.1", "user": None, "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions", "host": "api.openai.com",
            "provider": "openai", "model": "gpt-4o", "requirement": ["eu"], "places": ["us"],
            "decision": "block", "reason": "r", "body_sha256": "00" * 32})
        await w.close()

    asyncio.run(write())
    line = deploy_line("audit verify /data/audit")
    r = run_in_emulated_container(line, volumes, tmp_path / "root")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified: intact" in r.stdout and "origin residency-gate: " in r.stdout
    # the line as it was, without the certs volume: no key to verify with
    old = "docker run --rm -v rg-audit:/data/audit residency-gate:0.1.0 audit verify /data/audit"
    r = run_in_emulated_container(old, volumes, tmp_path / "root")
    assert r.returncode != 0 and "no audit public key" in r.stderr


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
    assert cfg["access"]["clients"], "0.0.0.0 without proxy_auth needs the client networks"


def test_k8s_config_loads_with_the_catalog_configmap_still_empty(tmp_path):
    """The catalog ConfigMap ships empty: the config must load (and reload, see
    tests/e2e/test_deploy_e2e.py) with an empty catalog directory."""
    configmaps = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "ConfigMap"}
    assert configmaps["residency-gate-catalog"]["data"] == {}
    empty = tmp_path / "catalog"
    empty.mkdir()
    config = load_mounted(configmaps["residency-gate-config"]["data"]["residency-gate.yaml"],
                          tmp_path, {"/etc/residency-gate-catalog": empty,
                                     "/data": tmp_path / "data"})
    assert config.catalog == (empty,)


def test_k8s_image_comes_from_a_registry_named_in_the_kustomization():
    """kubectl apply -k renders the StatefulSet's image through `images:`; a bare local
    name would never be pulled by a real cluster."""
    docs = k8s_docs()
    (kust,) = [d for d in docs if d["kind"] == "Kustomization"]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    name = container["image"].rsplit(":", 1)[0]
    (rule,) = [i for i in kust["images"] if i["name"] == name]
    registry = rule["newName"].split("/", 1)[0]
    assert "." in registry or ":" in registry, f"no registry host in {rule['newName']}"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert rule["newTag"] == version
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert rule["newName"] in deploy and "docker push" in deploy
    assert "kustomize edit set image" in deploy


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
