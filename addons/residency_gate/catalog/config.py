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

from ..core.endpoints import normalise_host
from ..core.strict_json import JSON_DEPTH
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
    "ip_literals": "inspect",
    "residency": {"header": "X-Data-Residency", "zones": {}, "default": None, "clients": [],
                  "on_violation": "block"},
    "block_page": {"contact": None, "instead": None},
    "azure": {"resources": {}},
    "reroute": {"credentials": {}},
    "private_endpoints": [],
    "audit": {"dir": "var/audit", "fsync": "group", "origin": None, "rotate_bytes": 64 << 20,
              "rotate_seconds": 86400, "checkpoint_every": 1000, "checkpoint_seconds": 60,
              "anchor": None, "inventory_seconds": 60, "writer_restarts": 5,
              "fail_healthz": True, "compress": "zstd",
              "retention": {"max_age_days": None, "max_bytes": None, "archive_dir": None}},
    "limits": {
        "request_body_bytes": 32 << 20, "request_body_decoded_bytes": 32 << 20,
        "request_body_ratio": 100, "decision_timeout_seconds": 10.0,
        "client_header_seconds": 10.0, "client_handshake_seconds": 10.0,
        "client_idle_seconds": 60.0, "client_body_seconds": 30.0, "client_body_min_rate": 1024,
        "max_connections": 4096, "max_connections_per_client": 512,
        "max_header_bytes": 64 << 10, "max_header_count": 100,
        "upstream_connect_seconds": 10.0, "upstream_tls_seconds": 10.0,
        "upstream_first_byte_seconds": 600.0, "upstream_idle_seconds": 300.0,
        "tunnel_idle_seconds": 600.0, "json_depth": JSON_DEPTH,
    },
    "log": {"format": "text", "level": "info"},
    # who may use the proxy, and where CONNECT may go (docs/deploy.md, "Who may use the proxy")
    "access": {"clients": [], "connect_ports": [443]},
    # the subject of a CA the proxy creates (an existing CA keeps its own)
    "ca": {"organization": "residency-gate", "common_name": "residency-gate interception CA"},
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
    mode: str | None = None  # enforce | report; None: on_violation decides

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
class Limits:
    """`limits.*`: every size, time and count the proxy enforces on what outsiders send
    (clients) or fail to send (providers). Names are the config keys; docs/deploy.md
    lists each with its default and the metric that shows it firing."""

    request_body_bytes: int  # as received (compressed or not)
    request_body_decoded_bytes: int  # after Content-Encoding
    request_body_ratio: int  # decoded / received, checked once decoding passes RATIO_FLOOR
    decision_timeout_seconds: float
    client_header_seconds: float  # a request head (a CONNECT too) arrives whole within this
    client_handshake_seconds: float  # the client's TLS handshake, from CONNECT or ClientHello
    client_idle_seconds: float  # keep-alive: the next request starts within this
    client_body_seconds: float  # a request body arrives within this ...
    client_body_min_rate: int  # ... plus one second per this many bytes received
    max_connections: int | None  # client connections open at once (None: no limit)
    max_connections_per_client: int | None  # ... from one client address
    max_header_bytes: int  # one request head (HTTP/1)
    max_header_count: int  # header fields in one request
    upstream_connect_seconds: float  # TCP connect to the provider
    upstream_tls_seconds: float  # TLS handshake with the provider
    upstream_first_byte_seconds: float  # request forwarded -> response head complete
    upstream_idle_seconds: float  # between two reads of a response (SSE keeps it alive)
    tunnel_idle_seconds: float  # any connection with no traffic at all (mitmproxy tcp_timeout)
    json_depth: int  # JSON bodies nested deeper cannot be classified (400)

    RATIO_FLOOR = 1 << 20  # small bodies compress well legitimately: ratio checked above this


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
    inventory_seconds: int = 60  # AI-app connections are counted, then recorded this often
    writer_restarts: int = 5  # a writer process that dies is restarted this often in a row
    fail_healthz: bool = True  # /healthz 503 once the audit writer failed for good
    compress: str = "zstd"
    retention: AuditRetentionConfig | None = None  # None: keep every segment


@dataclass(frozen=True)
class AuditRetentionConfig:
    max_age_days: int | None
    max_bytes: int | None
    archive_dir: Path | None


@dataclass(frozen=True)
class AccessConfig:
    """Who may use the proxy (client networks; loopback always may) and which ports
    CONNECT may reach (Squid's SSL_ports)."""

    clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    connect_ports: frozenset[int] = frozenset({443})


@dataclass(frozen=True)
class CaConfig:
    """Subject of the interception CA when the proxy creates one."""

    organization: str = "residency-gate"
    common_name: str = "residency-gate interception CA"


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
    ip_literals: str  # inspect | refuse | tunnel: TLS to an IP-literal CONNECT target
    header: str
    zones: dict[str, tuple[str, ...]]
    default: tuple[str, ...]
    clients: tuple[ClientRuleConfig, ...]
    on_violation: str  # block | reroute | report
    zone_modes: dict[str, str]  # zone -> enforce | report, where the zone says
    block_page_contact: str | None  # who a person asks, on the HTML block page
    block_page_instead: str | None  # what a person should use instead (e.g. an internal chat)
    azure_resources: dict[str, dict[str, Any]]
    reroute_credentials: dict[str, str]  # reroute target host -> env var with its key
    catalog_max_age: int  # days: older `reviewed` dates are warnings in `check`
    private_endpoints: tuple[PrivateEndpointConfig, ...]
    audit: AuditConfig
    request_body_bytes: int
    decision_timeout: float
    limits: Limits
    log_format: str
    log_level: str
    workers: int
    revision: str = ""  # hash of the file's bytes ("defaults" without a file)
    doc: SourceDoc | None = field(default=None, compare=False, repr=False)
    access: AccessConfig = AccessConfig()
    ca: CaConfig = CaConfig()


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
                                        i, rule.get("mode")))
    zones, zone_modes = {}, {}
    for name, zone in (residency["zones"] or {}).items():  # [places] or {places, mode}
        places = zone.get("places") if isinstance(zone, dict) else zone
        zones[name.lower()] = names_list(places)
        if isinstance(zone, dict) and zone.get("mode"):
            zone_modes[name.lower()] = zone["mode"]
    private = []
    for i, p in enumerate(d["private_endpoints"] or []):
        url = urlsplit(p["url"])
        try:
            url.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            problems.append(doc.problem(("private_endpoints", i, "url"), f"{e}"))
            continue
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
    access = _access(doc, d, listen, problems)
    config = Config(
        path=path,
        listen=listen,
        mode=d["mode"],
        admin=None if d["admin"] is None else hostport("admin", d["admin"]),
        proxy_auth=d["proxy_auth"],
        certs_dir=rel(d["certs_dir"]),
        catalog=tuple(rel(p) for p in d["catalog"] or ()),
        upstream_ca=rel(d["upstream_ca"]),
        resolve={normalise_host(h): hostport("resolve", t)
                 for h, t in (d["resolve"] or {}).items()},
        ip_literals=d["ip_literals"],
        header=residency["header"],
        zones=zones,
        default=names_list(residency["default"]),
        clients=tuple(clients),
        on_violation=residency["on_violation"],
        zone_modes=zone_modes,
        block_page_contact=d["block_page"]["contact"],
        block_page_instead=d["block_page"]["instead"],
        azure_resources={k.lower(): v for k, v in (d["azure"]["resources"] or {}).items()},
        reroute_credentials={normalise_host(h): v["api_key_env"]
                             for h, v in (d["reroute"]["credentials"] or {}).items()},
        catalog_max_age=d["catalog_max_age"],
        private_endpoints=tuple(private),
        audit=AuditConfig(
            dir=rel(audit["dir"]), fsync=audit["fsync"],
            origin=audit["origin"] or f"{socket.gethostname()}-{listen[1]}",
            rotate_bytes=audit["rotate_bytes"], rotate_seconds=audit["rotate_seconds"],
            checkpoint_every=audit["checkpoint_every"],
            checkpoint_seconds=audit["checkpoint_seconds"], anchor=rel(audit["anchor"]),
            inventory_seconds=audit["inventory_seconds"],
            writer_restarts=audit["writer_restarts"], fail_healthz=audit["fail_healthz"],
            compress=audit["compress"],
            retention=None if retention["max_age_days"] is None and retention["max_bytes"] is None
            else AuditRetentionConfig(retention["max_age_days"], retention["max_bytes"],
                                      rel(retention["archive_dir"]))),
        request_body_bytes=d["limits"]["request_body_bytes"],
        decision_timeout=float(d["limits"]["decision_timeout_seconds"]),
        limits=Limits(**d["limits"]),
        log_format=d["log"]["format"],
        log_level=d["log"]["level"],
        workers=d["workers"],
        revision=hashlib.sha256(doc.raw).hexdigest()[:16] if path is not None else "defaults",
        doc=doc,
        access=access,
        ca=CaConfig(organization=d["ca"]["organization"], common_name=d["ca"]["common_name"]),
    )
    if config.upstream_ca is not None and not config.upstream_ca.is_file():
        problems.append(doc.problem(("upstream_ca",), f"{config.upstream_ca} does not exist"))
    for i, p in enumerate(config.catalog):
        if not p.exists():
            problems.append(doc.problem(("catalog", i), f"{p} does not exist"))
    if problems:
        raise InvalidSource(problems)
    return config


# Modes whose clients do not come to `listen` as to an open proxy: WireGuard peers hold a
# key, `local` has no listener, `reverse` forwards to one fixed server only.
_NOT_A_RELAY = ("wireguard", "local", "reverse")


def is_loopback(host: str) -> bool:
    """True when a listen host takes connections from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "", 0.0.0.0, ::, or a name: reachable from elsewhere


def _access(doc: SourceDoc, d: dict[str, Any], listen: tuple[str, int],
            problems: list[Problem]) -> AccessConfig:
    """`access`, and the rule that keeps the proxy from being an open relay: listening
    beyond loopback needs proxy_auth or an explicit list of client networks."""
    clients = []
    for i, cidr in enumerate(d["access"]["clients"] or []):
        try:
            clients.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            problems.append(doc.problem(("access", "clients", i), str(e)))
    access = AccessConfig(clients=tuple(clients),
                          connect_ports=frozenset(d["access"]["connect_ports"]))
    mode = str(d["mode"]).split(":", 1)[0].split("@", 1)[0]
    if (not is_loopback(listen[0]) and mode not in _NOT_A_RELAY and not d["proxy_auth"]
            and not d["access"]["clients"]):
        problems.append(doc.problem(("listen",), (
            f"listen {d['listen']} takes connections from other machines, and nothing limits "
            "who may use the proxy (an open relay): set proxy_auth, or access.clients to the "
            "client networks allowed (e.g. [10.20.0.0/16]; [0.0.0.0/0, ::/0] allows anyone "
            "who can reach it); or listen on 127.0.0.1")))
    return access
