"""The same addon inside a plain `mitmdump -s` (for people who already run mitmproxy)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import yaml

from .conftest import TAG_HEADER, base_config
from .fakeprovider import FakeProvider, free_port
from .test_proxy_sdks import MSG, _lower, assert_nothing_received, refusal

pytestmark = pytest.mark.e2e

ADDON = Path(__file__).resolve().parents[2] / "addons" / "mitmdump_addon.py"


@pytest.fixture
def mitmdump(tmp_path: Path, fake: FakeProvider):
    config = base_config(tmp_path, fake)
    cfg = tmp_path / "residency-gate.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    certs = Path(config["certs_dir"])
    log = (tmp_path / "mitmdump.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mitmdump"), "-q", "-s", str(ADDON),
         "--listen-host", "127.0.0.1", "-p", str(port),
         "--set", f"residency_config={cfg}", "--set", "connection_strategy=lazy",
         "--set", f"confdir={certs}",
         "--set", f"ssl_verify_upstream_trusted_ca={fake.ca_pem}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (tmp_path / "mitmdump.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            if (certs / "mitmproxy-ca-cert.pem").exists():
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "mitmdump.log").read_text()
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", ca_pem=certs / "mitmproxy-ca-cert.pem",
                          audit_dir=Path(config["audit"]["dir"]))
    proc.terminate()
    proc.wait(15)


def test_mitmdump_script_enforces_and_audits(mitmdump: Any, fake: FakeProvider,
                                             openai_client: Any) -> None:
    client = openai_client(mitmdump, default_headers={TAG_HEADER: "eu"})
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert refusal(ei.value).status == 451
    assert_nothing_received(fake)

    client = openai_client(mitmdump)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert _lower(raw.headers)["x-residency-decision"] == "allow"
    assert [r.host for r in fake.requests] == ["api.openai.com"]
    records = "".join(p.read_text() for p in mitmdump.audit_dir.glob("*.jsonl"))
    assert '"decision":"block"' in records and '"decision":"allow"' in records
