"""The AI usage inventory: who uses which AI service, how much, where it is processed, and
what the configured requirements would do to it. Built from the audit trail alone.

Two kinds of record feed it: `decision` (and `outcome`) records of LLM API requests the
gate decided (allowed, rerouted, blocked, reported), and `inventory` records: tunnelled
connections to consumer AI apps, counted per client, user and host per minute. Nothing
else is recorded, so traffic to anything else cannot appear here.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .chain import parse_ts

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network
type Advisor = Callable[[str, str | None, list[str] | None, str | None], list[str]]


def client_network(client: str | None, networks: Sequence[Network] = ()) -> str:
    """The configured client network an address is in, else its /24 (IPv4) or /64."""
    if not client:
        return "-"
    try:
        address = ipaddress.ip_address(client.split("%")[0])
    except ValueError:
        return client
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    for net in networks:
        if address.version == net.version and address in net:
            return str(net)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass
class Usage:
    """One row: a provider endpoint (or AI app) used from one client network by one user."""

    provider: str
    endpoint: str
    network: str
    user: str
    kind: str = "api"  # api: decided requests | app: tunnelled AI-app connections
    hosts: set[str] = field(default_factory=set)
    requests: int = 0
    connections: int = 0
    allowed: int = 0
    rerouted: int = 0
    blocked: int = 0  # refused
    reported: int = 0  # violations forwarded in report mode
    would_block: int = 0  # blocked, or would be under enforcement
    bytes_up: int = 0
    bytes_down: int = 0
    places: set[str] = field(default_factory=set)
    unknown_place: bool = False
    models: Counter = field(default_factory=Counter)
    advice: Counter = field(default_factory=Counter)
    requirements: Counter = field(default_factory=Counter)

    @property
    def where(self) -> str:
        known = ", ".join(sorted(self.places))
        if self.unknown_place:
            return f"{known} + unknown" if known else "unknown"
        return known or "-"

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "endpoint": self.endpoint, "network": self.network,
                "user": self.user, "kind": self.kind, "hosts": sorted(self.hosts),
                "requests": self.requests, "connections": self.connections,
                "allowed": self.allowed, "rerouted": self.rerouted, "blocked": self.blocked,
                "reported": self.reported, "would_block": self.would_block,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "processed_in": self.where, "models": dict(self.models.most_common(5)),
                "requirements": dict(self.requirements),
                "instead": [a for a, _ in self.advice.most_common(3)]}


@dataclass
class Inventory:
    rows: dict[tuple[str, str, str, str], Usage] = field(default_factory=dict)
    first: str | None = None
    last: str | None = None

    def row(self, rec: dict[str, Any], networks: Sequence[Network]) -> Usage:
        key = (str(rec.get("provider")), str(rec.get("endpoint") or "-"),
               client_network(rec.get("client"), networks), rec.get("user") or "-")
        usage = self.rows.get(key)
        if usage is None:
            usage = self.rows[key] = Usage(*key)
        ts = rec.get("ts")
        if isinstance(ts, str):
            self.first = min(self.first or ts, ts)
            self.last = max(self.last or ts, ts)
        return usage

    def sorted_rows(self) -> list[Usage]:
        return sorted(self.rows.values(), key=lambda u: (-(u.requests + u.connections),
                                                         u.provider, u.network, u.user))

    def totals(self) -> dict[str, int]:
        rows = self.rows.values()
        return {"providers": len({u.provider for u in rows}),
                "clients": len({(u.network, u.user) for u in rows}),
                "requests": sum(u.requests for u in rows),
                "connections": sum(u.connections for u in rows),
                "would_block": sum(u.would_block for u in rows),
                "blocked": sum(u.blocked for u in rows),
                "reported": sum(u.reported for u in rows)}

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.first, "to": self.last, "totals": self.totals(),
                "rows": [u.to_dict() for u in self.sorted_rows()]}


def build_inventory(records: Iterable[tuple[str, int, dict[str, Any]]], *,
                    since: datetime | None = None, networks: Sequence[Network] = (),
                    advise: Advisor | None = None) -> Inventory:
    """Stream the records once: decisions of AI providers, their outcomes, inventory."""
    inv = Inventory()
    open_decisions: dict[str, Usage] = {}  # decision id -> row, until its outcome
    for _file, _line, rec in records:
        kind = rec.get("kind")
        if since is not None and kind in ("decision", "inventory") and not _after(rec, since):
            continue
        if kind == "decision" and rec.get("provider"):
            usage = inv.row(rec, networks)
            _add_decision(usage, rec)
            if isinstance(rec.get("id"), str):
                open_decisions[rec["id"]] = usage
        elif kind == "outcome":
            usage = open_decisions.pop(str(rec.get("decision_id")), None)
            if usage is not None and isinstance(rec.get("bytes_out"), int):
                usage.bytes_down += rec["bytes_out"]
        elif kind == "inventory" and rec.get("provider"):
            usage = inv.row(rec, networks)
            _add_connections(usage, rec, advise)
    return inv


def _after(rec: dict[str, Any], since: datetime) -> bool:
    try:
        return parse_ts(rec["ts"]) >= since
    except (KeyError, TypeError, ValueError):
        return False


def _add_decision(usage: Usage, rec: dict[str, Any]) -> None:
    usage.requests += 1
    usage.hosts.add(str(rec.get("host")))
    decision, enforced = rec.get("decision"), rec.get("enforced") is not False
    if decision == "block" and enforced:
        usage.blocked += 1
    elif not enforced:
        usage.reported += 1
    elif decision == "reroute":
        usage.rerouted += 1
    else:
        usage.allowed += 1
    if decision == "block":
        usage.would_block += 1
        usage.advice.update(a for a in rec.get("advice") or () if not a.startswith("..."))
    if isinstance(rec.get("body_bytes"), int):
        usage.bytes_up += rec["body_bytes"]
    places = rec.get("places")
    if places is None:
        usage.unknown_place = usage.unknown_place or bool(rec.get("endpoint"))
    else:
        usage.places.update(places)
    if rec.get("model"):
        usage.models[rec["model"]] += 1
    if rec.get("requirement"):
        usage.requirements["+".join(rec["requirement"])] += 1


def _add_connections(usage: Usage, rec: dict[str, Any], advise: Advisor | None) -> None:
    usage.kind = "app"
    n = int(rec.get("connections") or 0)
    usage.connections += n
    usage.hosts.add(str(rec.get("host")))
    usage.bytes_up += int(rec.get("bytes_up") or 0)
    usage.bytes_down += int(rec.get("bytes_down") or 0)
    usage.unknown_place = True  # an AI app's place is not in the catalog
    would = int(rec.get("would_block") or 0)
    usage.would_block += would
    usage.reported += would
    if rec.get("requirement"):
        usage.requirements["+".join(rec["requirement"])] += n
    if would and advise is not None:
        for advice in advise(usage.provider, rec.get("endpoint"),
                             rec.get("requirement_places"), None):
            usage.advice[advice] += would


def render_html(inv: Inventory, sources: list[str]) -> str:
    """The "document your current state" page: AI services by use, then each row."""
    from .html import esc, kpis, page, table

    totals = inv.totals()
    span = f"{inv.first} to {inv.last}" if inv.first else "no records"
    body = [f'<div class="card verdict warn"><h1>AI usage inventory</h1>'
            f"<p>{totals['providers']} AI services used by {totals['clients']} client "
            f"network/user pairs: {totals['requests']} API requests decided and "
            f"{totals['connections']} AI-app connections; <b>{totals['would_block']} would be "
            f"blocked</b> under the configured requirements ({totals['blocked']} refused, "
            f"{totals['reported']} reported).</p><p class=\"muted small\">{esc(span)}; from "
            f"{esc(', '.join(sources))}.</p></div>",
            kpis([("services", totals["providers"]), ("API requests", totals["requests"]),
                  ("app connections", totals["connections"]),
                  ("would be blocked", totals["would_block"])])]
    per_provider: dict[str, list[Usage]] = {}
    for u in inv.sorted_rows():
        per_provider.setdefault(u.provider, []).append(u)
    rows = [[p, ", ".join(sorted({h for u in us for h in u.hosts})),
             sum(u.requests for u in us), sum(u.connections for u in us),
             sum(u.would_block for u in us), _bytes(sum(u.bytes_up + u.bytes_down for u in us)),
             ", ".join(sorted({u.where for u in us}))] for p, us in per_provider.items()]
    body.append("<h2>By service</h2>" + table(
        ["service", "hosts", "requests", "connections", "would block", "bytes", "processed in"],
        rows, numeric=(2, 3, 4, 5), wrap=(1, 6)))
    rows = [[u.provider, u.endpoint, u.network, u.user, u.requests, u.connections, u.allowed,
             u.rerouted, u.blocked, u.reported, u.would_block, _bytes(u.bytes_up),
             _bytes(u.bytes_down), u.where, ", ".join(u.requirements) or "none",
             "; ".join(a for a, _ in u.advice.most_common(3)) or "-"]
            for u in inv.sorted_rows()]
    body.append("<h2>By service, client network and user</h2>" + table(
        ["service", "endpoint", "network", "user", "requests", "connections", "allowed",
         "rerouted", "blocked", "reported", "would block", "bytes up", "bytes down",
         "processed in", "requirement", "compliant instead"],
        rows, numeric=range(4, 13), wrap=(13, 15)))
    return page(f"AI usage inventory: {totals['providers']} services, "
                f"{totals['would_block']} would be blocked", "".join(body))


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
