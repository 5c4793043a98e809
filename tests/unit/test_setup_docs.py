"""The README's set-up, as a new admin follows it: the `export` lines run in a real shell,
and the `./residency-gate` wrapper installs the test tools only for `test` and `lint`.

The wrapper runs against a stand-in venv (a `python` that records how pip was called),
so nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
WRAPPER = REPO / "residency-gate"


def readme_block_with(needle: str) -> list[str]:
    """The lines of the README's first ```sh block containing `needle`."""
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        if needle in block:
            return block.splitlines()
    raise AssertionError(f"no sh block with {needle!r} in README.md")


def export_lines() -> list[str]:
    return [ln for ln in readme_block_with("export HTTPS_PROXY") if ln.startswith("export ")]


SHOW = 'printf "%s\\n" "$HTTPS_PROXY" "$SSL_CERT_FILE" "$AWS_CA_BUNDLE" "$REQUESTS_CA_BUNDLE"'


@pytest.mark.parametrize("shell", ["bash", "sh", "dash"])
def test_readme_export_lines_set_every_variable(shell: str, tmp_path: Path) -> None:
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"no {shell} on this machine")
    script = "\n".join([*export_lines(), SHOW])
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = subprocess.run([exe, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=20, check=True).stdout.splitlines()
    ca = f"{tmp_path}/certs/mitmproxy-ca-cert.pem"
    assert out == ["http://127.0.0.1:8080", ca, ca, ca]


def _boto3_client_in(script: str, cwd: Path) -> subprocess.CompletedProcess:
    make = ("import boto3; boto3.session.Session(aws_access_key_id='a', "
            "aws_secret_access_key='b').client('bedrock-runtime', region_name='eu-central-1')")
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run(["bash", "-c", f"{script}\nexec {sys.executable} -c \"{make}\""],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_boto3_accepts_what_the_readme_exports(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    from residency_gate.ops.ca import load_or_create_ca

    load_or_create_ca(tmp_path / "certs", quiet=True)
    ok = _boto3_client_in("\n".join(export_lines()), tmp_path)
    assert ok.returncode == 0, ok.stderr
    # the old one-line export left AWS_CA_BUNDLE empty, and boto3 refused every client
    old = ("export HTTPS_PROXY=http://127.0.0.1:8080 "
           "SSL_CERT_FILE=$PWD/certs/mitmproxy-ca-cert.pem AWS_CA_BUNDLE=$SSL_CERT_FILE")
    broken = _boto3_client_in(old, tmp_path)
    assert broken.returncode != 0


def test_readme_curl_line_names_the_ca() -> None:
    (curl,) = [ln for ln in readme_block_with("export HTTPS_PROXY") if ln.startswith("curl ")]
    # curl prefers CURL_CA_BUNDLE (and its own built-in bundle) over SSL_CERT_FILE
    assert "--cacert certs/mitmproxy-ca-cert.pem" in curl


# --------------------------------------------------------------------------- the wrapper

FAKE_PYTHON = """#!/bin/sh
printf '%s\\n' "$*" >> "$(dirname "$0")/../calls"
exit 0
"""


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "residency-gate"):
        exe = venv / "bin" / name
        exe.write_text(FAKE_PYTHON.replace("$*", f"{name} $*"))
        exe.chmod(0o755)
    return venv


def wrapper(venv: Path, *args: str) -> list[str]:
    calls = venv / "calls"
    calls.unlink(missing_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(venv.parent), "RESIDENCY_GATE_VENV": str(venv)}
    r = subprocess.run(["bash", str(WRAPPER), *args], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def test_wrapper_installs_test_extras_only_for_test_and_lint(fake_venv: Path) -> None:
    calls = wrapper(fake_venv, "run", "-c", "x.yaml")
    installs = [c for c in calls if "pip install" in c and "--upgrade pip" not in c]
    assert installs == [f"python -m pip install -q --disable-pip-version-check -e {REPO}"]
    assert calls[-1] == "residency-gate run -c x.yaml"
    # installed once: the next command goes straight to it
    assert wrapper(fake_venv, "check") == ["residency-gate check"]

    calls = wrapper(fake_venv, "lint")
    assert f"python -m pip install -q --disable-pip-version-check -e {REPO}[test]" in calls
    assert calls[-1].startswith("python -m ruff check")
    # a venv with the test extras serves every command without another install
    (fake_venv / ".installed-runtime").unlink()
    assert wrapper(fake_venv, "check") == ["residency-gate check"]
    assert wrapper(fake_venv, "test", "-q")[-1] == "python -m pytest -q"


def test_wrapper_reinstalls_after_pyproject_changes(fake_venv: Path) -> None:
    wrapper(fake_venv, "check")
    stamp = fake_venv / ".installed-runtime"
    old = (REPO / "pyproject.toml").stat().st_mtime - 10
    os.utime(stamp, (old, old))
    assert any("pip install" in c for c in wrapper(fake_venv, "check"))
