"""Build bundles from inline config for unit tests (no files outside tmp)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import yaml

from residency_gate.catalog.bundle import build_bundle
from residency_gate.catalog.compile import load_catalog
from residency_gate.catalog.config import load_config
from residency_gate.core.request import Request


@cache
def shipped_catalog():
    return load_catalog()


def policy_from(tmp_path: Path, config: dict | None = None, catalog=None):
    """A bundle (config + catalog, compiled) from an inline config dict."""
    path = tmp_path / "residency-gate.yaml"
    path.write_text(yaml.safe_dump(config or {}))
    return build_bundle(load_config(path), catalog or shipped_catalog())


bundle_from = policy_from


def request(url: str, *, method: str = "POST", body=None, tags=(), client=None, user=None,
            raw_body: bytes | None = None, signed: bool = False) -> Request:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = raw_body if raw_body is not None else (
        json.dumps(body).encode() if body is not None else None)
    return Request(method=method, scheme=parts.scheme, host=parts.hostname,
                   port=parts.port or 443, path=path or "/", tag_values=tuple(tags),
                   body=data, client_ip=client, user=user, signed=signed)


def decide_url(bundle, url: str, **kw):
    return bundle.decide(request(url, **kw))
