"""Large request bodies: classified off the event loop; over the limit refused (413)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from .conftest import TAG_HEADER, Proxy
from .fakeprovider import FakeProvider
from .test_proxy_sdks import _lower, assert_nothing_received, refusal

pytestmark = pytest.mark.e2e

BIG = "x" * (1 << 20)  # a 1 MiB prompt: above the inline threshold, below the limit


@pytest.fixture(scope="module")
def gate(start_module_proxy: Callable[..., Proxy]) -> Proxy:
    return start_module_proxy({"limits": {"request_body_bytes": 2 << 20}})


def test_large_body_allowed_and_forwarded_intact(gate: Proxy, fake: FakeProvider,
                                                 openai_client: Any) -> None:
    client = openai_client(gate, base_url="https://us.api.openai.com/v1",
                           default_headers={TAG_HEADER: "us"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": BIG}])
    assert _lower(raw.headers)["x-residency-decision"] == "allow"
    (rec,) = fake.requests
    assert json.loads(rec.decoded_body)["messages"][0]["content"] == BIG


def test_large_body_blocked(gate: Proxy, fake: FakeProvider, openai_client: Any) -> None:
    client = openai_client(gate, default_headers={TAG_HEADER: "us"})
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": BIG}])
    assert refusal(ei.value).status == 451
    assert_nothing_received(fake)
    assert BIG[:1000] not in gate.audit_text()  # digests, never prompts


def test_body_over_limit_refused_413(gate: Proxy, fake: FakeProvider, openai_client: Any) -> None:
    client = openai_client(gate, base_url="https://us.api.openai.com/v1")
    with pytest.raises(openai.APIStatusError) as ei:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": BIG * 3}])
    r = refusal(ei.value)
    assert r.status == 413 and "larger than" in r.message
    assert_nothing_received(fake)


def test_many_requests_on_one_keepalive_connection(gate: Proxy, fake: FakeProvider,
                                                   openai_client: Any) -> None:
    """`resolve` must not defeat upstream connection reuse (mitmproxy caps 5 per address)."""
    client = openai_client(gate, base_url="https://us.api.openai.com/v1", timeout=10.0)
    for i in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"n{i}"}])
        assert _lower(raw.headers)["x-residency-decision"] == "allow"
    got = fake.requests
    assert len(got) == 12
    assert len({r.client for r in got}) < 12, "every request opened a new upstream connection"
