"""Other ways in: SOCKS5 mode, and plain-HTTP requests through the HTTP proxy."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from .conftest import TAG_HEADER, Proxy
from .fakeprovider import FakeProvider

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")]

BODY = '{"model":"gpt-4o","messages":[]}'


def curl(*args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}",
                          "-H", "Content-Type: application/json", "-d", BODY, *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_socks5_mode_decides_like_the_http_proxy(start_proxy: Callable[..., Proxy],
                                                 fake: FakeProvider) -> None:
    proxy = start_proxy({"mode": "socks5"})
    socks = ["--socks5-hostname", f"{proxy.host}:{proxy.port}", "--cacert", str(proxy.ca_pem)]
    code, body = curl(*socks, "-H", f"{TAG_HEADER}: us",
                      "https://us.api.openai.com/v1/chat/completions")
    assert code == 200 and "hello from us.api.openai.com" in body
    assert [r.host for r in fake.requests] == ["us.api.openai.com"]
    fake.reset()
    code, body = curl(*socks, "-H", f"{TAG_HEADER}: us", "https://api.openai.com/v1/chat/completions")
    assert code == 451 and "requirement us" in body
    assert fake.requests == []


def test_plain_http_request_to_an_llm_host_is_decided(start_proxy: Callable[..., Proxy],
                                                      fake: FakeProvider) -> None:
    proxy = start_proxy()
    code, body = curl("-x", proxy.url, "-H", f"{TAG_HEADER}: eu",
                      "http://api.openai.com/v1/chat/completions")
    assert code == 451 and "requirement eu" in body
    assert fake.requests == []
