"""The operator's config file: defaults, validation, paths relative to the file.

Semantic checks that need the region tree (unknown region names in zones and
rules) happen in `policy.py`, which still has this file's line map.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schemas import schema_problems
from .sourcefile import InvalidSource, Problem, SourceDoc, load_yaml

DEFAULT_CONFIG_NAME = "residency-gate.yaml"
DEFAULT_HEADER = "X-Data-Residency"


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
class ClientRule:
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
    fsync: str = "group"
    origin: str = ""
    rotate_bytes: int = 64 << 20
    rotate_seconds: int = 86400
    checkpoint_every: int = 1000
    checkpoint_seconds: int = 60
    anchor: Path | None = None


@dataclass(frozen=True)
class Config:
    """Everything the operator said, with defaults filled in and paths made absolute."""

    path: Path | None
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    mode: str = "regular"
    admin: tuple[str, int] | None = ("127.0.0.1", 9464)
    proxy_auth: str | None = None
    certs_dir: Path = Path("certs")
    catalog: tuple[Path, ...] = ()
    upstream_ca: Path | None = None
    resolve: dict[str, tuple[str, int]] = field(default_factory=dict)
    header: str = DEFAULT_HEADER
    zones: dict[str, tuple[str, ...]] = field(default_factory=dict)
    default: tuple[str, ...] = ()
    clients: tuple[ClientRule, ...] = ()
    on_violation: str = "block"
    azure_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    private_endpoints: tuple[PrivateEndpointConfig, ...] = ()
    audit: AuditConfig = field(default_factory=lambda: AuditConfig(Path("var/audit")))
    request_body_bytes: int = 32 << 20
    decision_timeout: float = 10.0
    log_format: str = "text"
    log_level: str = "info"
    workers: int = 1
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
    d: dict[str, Any] = doc.data

    def rel(value: str | None) -> Path | None:
        return None if value is None else (base / value).resolve()

    def hostport(key: str, value: str) -> tuple[str, int]:
        host, port = split_hostport(value)
        if not 0 <= port <= 65535:
            problems.append(doc.problem((key,), f"port {port} out of range"))
        return host, port

    residency = d.get("residency") or {}
    clients = []
    for i, rule in enumerate(residency.get("clients") or []):
        network = None
        if "cidr" in rule:
            try:
                network = ipaddress.ip_network(rule["cidr"], strict=False)
            except ValueError as e:
                problems.append(doc.problem(("residency", "clients", i, "cidr"), str(e)))
                continue
        clients.append(ClientRule(network, rule.get("user"), names_list(rule["require"]), i))

    audit = d.get("audit") or {}
    listen = hostport("listen", d.get("listen", "127.0.0.1:8080"))
    admin_raw = d.get("admin", "127.0.0.1:9464")
    resolve = {}
    for host, target in (d.get("resolve") or {}).items():
        resolve[host.lower().rstrip(".")] = hostport("resolve", target)
    private = tuple(
        PrivateEndpointConfig(
            name=p["name"], url=p["url"].rstrip("/"), api=p.get("api", "openai"),
            region=names_list(p["region"]), models=dict(p["models"]),
            api_key_env=p.get("api_key_env"),
        )
        for p in d.get("private_endpoints") or []
    )
    limits = d.get("limits") or {}
    log = d.get("log") or {}
    config = Config(
        path=path,
        listen=listen,
        mode=d.get("mode", "regular"),
        admin=None if admin_raw is None else hostport("admin", admin_raw),
        proxy_auth=d.get("proxy_auth"),
        certs_dir=rel(d.get("certs_dir", "certs")),
        catalog=tuple(rel(p) for p in d.get("catalog") or ()),
        upstream_ca=rel(d.get("upstream_ca")),
        resolve=resolve,
        header=residency.get("header", DEFAULT_HEADER),
        zones={k.lower(): names_list(v) for k, v in (residency.get("zones") or {}).items()},
        default=names_list(residency.get("default")),
        clients=tuple(clients),
        on_violation=residency.get("on_violation", "block"),
        azure_resources={
            k.lower(): v for k, v in ((d.get("azure") or {}).get("resources") or {}).items()
        },
        private_endpoints=private,
        audit=AuditConfig(
            dir=rel(audit.get("dir", "var/audit")),
            fsync=audit.get("fsync", "group"),
            origin=audit.get("origin") or f"{socket.gethostname()}-{listen[1]}",
            rotate_bytes=audit.get("rotate_bytes", 64 << 20),
            rotate_seconds=audit.get("rotate_seconds", 86400),
            checkpoint_every=audit.get("checkpoint_every", 1000),
            checkpoint_seconds=audit.get("checkpoint_seconds", 60),
            anchor=rel(audit.get("anchor")),
        ),
        request_body_bytes=limits.get("request_body_bytes", 32 << 20),
        decision_timeout=float(limits.get("decision_timeout_seconds", 10.0)),
        log_format=log.get("format", "text"),
        log_level=log.get("level", "info"),
        workers=d.get("workers", 1),
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
