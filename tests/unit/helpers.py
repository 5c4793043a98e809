"""Build policies from inline config for unit tests (no files outside tmp)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import yaml

from residency_gate.catalog import load_catalog
from residency_gate.config import load_config
from residency_gate.engine import RequestInfo, decide
from residency_gate.policy import build_policy


@cache
def shipped_catalog():
    return load_catalog()


def policy_from(tmp_path: Path, config: dict | None = None, catalog=None):
    path = tmp_path / "residency-gate.yaml"
    path.write_text(yaml.safe_dump(config or {}))
    return build_policy(load_config(path), catalog or shipped_catalog())


def request(url: str, *, method: str = "POST", body=None, tags=(), client=None, user=None,
            raw_body: bytes | None = None) -> RequestInfo:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = raw_body if raw_body is not None else (
        json.dumps(body).encode() if body is not None else None)
    return RequestInfo(method=method, scheme=parts.scheme, host=parts.hostname,
                       port=parts.port or 443, path=path or "/", tag_values=tuple(tags),
                       body=data, client_ip=client, user=user)


def decide_url(policy, url: str, **kw):
    return decide(policy, request(url, **kw))
