"""The operator's config file: defaults (in one place), validation, paths relative to the file.

Semantic checks that need the region tree (unknown region names in zones and
rules) happen in `bundle.py`, which still has this file's line map.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .schema import schema_problems
from .source import InvalidSource, Problem, SourceDoc, load_yaml

DEFAULT_CONFIG_NAME = "residency-gate.yaml"

# Every default, once: what a config file that says nothing means.
DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "mode": "regular",
    "workers": 1,
    "admin": "127.0.0.1:9464",
    "proxy_auth": None,
    "certs_dir": "certs",
    "catalog": None,
    "catalog_max_age": 180,
    "upstream_ca": None,
    "resolve": {},
    "residency": {"header": "X-Data-Residency", "zones": {}, "default": None, "clients": [],
                  "on_violation": "block"},
    "azure": {"resources": {}},
    "reroute": {"credentials": {}},
    "private_endpoints": [],
    "audit": {"dir": "var/audit", "fsync": "group", "origin": None, "rotate_bytes": 64 << 20,
              "rotate_seconds": 86400, "checkpoint_every": 1000, "checkpoint_seconds": 60,
              "anchor": None, "compress": "zstd",
              "retention": {"max_age_days": None, "max_bytes": None, "archive_dir": None}},
    "limits": {"request_body_bytes": 32 << 20, "decision_timeout_seconds": 10.0},
    "log": {"format": "text", "level": "info"},
}


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The config as written, every absent (or null-where-null-means-default) key filled."""
    out = copy.deepcopy(DEFAULTS)
    for key, value in data.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key].update({k: v for k, v in value.items()})
        elif value is not None or key in ("admin", "proxy_auth", "catalog", "upstream_ca"):
            out[key] = value
    return out


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def names_list(value: str | list[str] | None) -> tuple[str, ...]:
    """`eu`, `eu, de` and `[eu, de]` all name a list of regions."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    return tuple(s.strip().lower() for s in items if s.strip())


@dataclass(frozen=True)
class ClientRuleConfig:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    user: str | None
    require: tuple[str, ...]
    index: int

    @property
    def label(self) -> str:
        return f"client {self.network}" if self.network else f"proxy user {self.user!r}"


@dataclass(frozen=True)
class PrivateEndpointConfig:
    name: str
    url: str
    api: str
    region: tuple[str, ...]
    models: dict[str, str]
    api_key_env: str | None


@dataclass(frozen=True)
class AuditConfig:
    dir: Path
    fsync: str
    origin: str
    rotate_bytes: int
    rotate_seconds: int
    checkpoint_every: int
    checkpoint_seconds: int
    anchor: Path | None
    compress: str = "zstd"
    retention: AuditRetentionConfig | None = None  # None: keep every segment


@dataclass(frozen=True)
class AuditRetentionConfig:
    max_age_days: int | None
    max_bytes: int | None
    archive_dir: Path | None


@dataclass(frozen=True)
class Config:
    """Everything the operator said, defaults filled in, paths made absolute."""

    path: Path | None
    listen: tuple[str, int]
    mode: str
    admin: tuple[str, int] | None
    proxy_auth: str | None
    certs_dir: Path
    catalog: tuple[Path, ...]
    upstream_ca: Path | None
    resolve: dict[str, tuple[str, int]]
    header: str
    zones: dict[str, tuple[str, ...]]
    default: tuple[str, ...]
    clients: tuple[ClientRuleConfig, ...]
    on_violation: str
    azure_resources: dict[str, dict[str, Any]]
    reroute_credentials: dict[str, str]  # reroute target host -> env var with its key
    catalog_max_age: int  # days: older `reviewed` dates are warnings in `check`
    private_endpoints: tuple[PrivateEndpointConfig, ...]
    audit: AuditConfig
    request_body_bytes: int
    decision_timeout: float
    log_format: str
    log_level: str
    workers: int
    revision: str = ""  # hash of the file's bytes ("defaults" without a file)
    doc: SourceDoc | None = field(default=None, compare=False, repr=False)


def find_config(explicit: str | Path | None) -> Path | None:
    """`-c FILE`, else ./residency-gate.yaml if present, else built-in defaults."""
    if explicit:
        return Path(explicit)
    candidate = Path.cwd() / DEFAULT_CONFIG_NAME
    return candidate if candidate.exists() else None


def load_config(path: Path | None) -> Config:
    """Read and validate a config file (or the defaults); raise InvalidSource."""
    if path is None:
        doc = SourceDoc(file="<defaults>", data={})
        base = Path.cwd()
    else:
        if not path.exists():
            raise InvalidSource([Problem(str(path), 1, "config file does not exist")])
        doc = load_yaml(path)
        base = path.resolve().parent
    if doc.data is None:
        doc.data = {}
    problems = schema_problems(doc, "config")
    if problems:
        raise InvalidSource(problems)
    d = with_defaults(doc.data)

    def rel(value: str | None) -> Path | None:
        return None if value is None else (base / value).resolve()

    def hostport(key: str, value: str) -> tuple[str, int]:
        host, port = split_hostport(value)
        if not 0 <= port <= 65535:
            problems.append(doc.problem((key,), f"port {port} out of range"))
        return host, port

    residency = d["residency"]
    clients = []
    for i, rule in enumerate(residency["clients"] or []):
        network = None
        if "cidr" in rule:
            try:
                network = ipaddress.ip_network(rule["cidr"], strict=False)
            except ValueError as e:
                problems.append(doc.problem(("residency", "clients", i, "cidr"), str(e)))
                continue
        clients.append(ClientRuleConfig(network, rule.get("user"), names_list(rule["require"]),
                                        i))
    private = []
    for i, p in enumerate(d["private_endpoints"] or []):
        url = urlsplit(p["url"])
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(doc.problem(("private_endpoints", i, "url"),
                                        f"not an http(s) URL: {p['url']!r}"))
        private.append(PrivateEndpointConfig(
            name=p["name"], url=p["url"].rstrip("/"), api=p.get("api", "openai"),
            region=names_list(p["region"]), models=dict(p["models"]),
            api_key_env=p.get("api_key_env")))
    audit = d["audit"]
    retention = {**DEFAULTS["audit"]["retention"], **(audit.get("retention") or {})}
    listen = hostport("listen", d["listen"])
    config = Config(
        path=path,
        listen=listen,
        mode=d["mode"],
        admin=None if d["admin"] is None else hostport("admin", d["admin"]),
        proxy_auth=d["proxy_auth"],
        certs_dir=rel(d["certs_dir"]),
        catalog=tuple(rel(p) for p in d["catalog"] or ()),
        upstream_ca=rel(d["upstream_ca"]),
        resolve={h.lower().rstrip("."): hostport("resolve", t)
                 for h, t in (d["resolve"] or {}).items()},
        header=residency["header"],
        zones={k.lower(): names_list(v) for k, v in (residency["zones"] or {}).items()},
        default=names_list(residency["default"]),
        clients=tuple(clients),
        on_violation=residency["on_violation"],
        azure_resources={k.lower(): v for k, v in (d["azure"]["resources"] or {}).items()},
        reroute_credentials={h.lower().rstrip("."): v["api_key_env"]
                             for h, v in (d["reroute"]["credentials"] or {}).items()},
        catalog_max_age=d["catalog_max_age"],
        private_endpoints=tuple(private),
        audit=AuditConfig(
            dir=rel(audit["dir"]), fsync=audit["fsync"],
            origin=audit["origin"] or f"{socket.gethostname()}-{listen[1]}",
            rotate_bytes=audit["rotate_bytes"], rotate_seconds=audit["rotate_seconds"],
            checkpoint_every=audit["checkpoint_every"],
            checkpoint_seconds=audit["checkpoint_seconds"], anchor=rel(audit["anchor"]),
            compress=audit["compress"],
            retention=None if retention["max_age_days"] is None and retention["max_bytes"] is None
            else AuditRetentionConfig(retention["max_age_days"], retention["max_bytes"],
                                      rel(retention["archive_dir"]))),
        request_body_bytes=d["limits"]["request_body_bytes"],
        decision_timeout=float(d["limits"]["decision_timeout_seconds"]),
        log_format=d["log"]["format"],
        log_level=d["log"]["level"],
        workers=d["workers"],
        revision=hashlib.sha256(doc.raw).hexdigest()[:16] if path is not None else "defaults",
        doc=doc,
    )
    if config.upstream_ca is not None and not config.upstream_ca.is_file():
        problems.append(doc.problem(("upstream_ca",), f"{config.upstream_ca} does not exist"))
    for i, p in enumerate(config.catalog):
        if not p.exists():
            problems.append(doc.problem(("catalog", i), f"{p} does not exist"))
    if problems:
        raise InvalidSource(problems)
    return config
