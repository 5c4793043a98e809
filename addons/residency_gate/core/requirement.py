"""Requirements: the set of places a request may go, and where each part came from.

Everything that applies intersects: the tag header (comma-separated or
repeated), matching client rules (CIDR or proxy user), and the default when no
client rule matches. A tag can narrow a requirement, never widen it.

Each name a part uses is enforced or only reported (`mode: report` on a client
rule or zone, or `on_violation: report`), so enforcement can be phased in: a
destination outside the requirement is refused only when it lies outside what the
enforcing names require; otherwise the violation is reported and forwarded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .places import Places

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ENFORCE, REPORT = "enforce", "report"


class UnknownTag(ValueError):
    """A requirement names a region nobody defined: refused with 400."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        super().__init__(tag)


@dataclass(frozen=True)
class RequirementPart:
    """One contribution to a requirement, and where it came from."""

    source: str  # tag | client | user | default
    detail: str  # e.g. "header X-Data-Residency: eu", "client 10.0.0.0/8"
    names: tuple[str, ...]
    places: Places
    enforced: Places | None  # what its enforcing names require; None: report mode only

    @property
    def mode(self) -> str:
        return REPORT if self.enforced is None else ENFORCE


@dataclass(frozen=True)
class Requirement:
    parts: tuple[RequirementPart, ...] = ()
    places: Places | None = None  # None: no requirement applies

    @property
    def names(self) -> tuple[str, ...]:
        out: list[str] = []
        for part in self.parts:
            out.extend(n for n in part.names if n not in out)
        return tuple(out)

    def describe(self) -> str:
        if not self.parts:
            return "none"
        return " and ".join(p.detail for p in self.parts)

    def enforces(self, places: Places | None) -> bool:
        """Would a destination at `places` violate an enforcing part? (False: the violation,
        if any, is only against parts in report mode.)"""
        enforced = [p.enforced for p in self.parts if p.enforced is not None]
        if not enforced:
            return False
        if places is None:
            return True
        return not all(places <= e for e in enforced)


@dataclass(frozen=True)
class ClientRule:
    """A compiled `residency.clients` entry: who it matches, what it requires."""

    network: Network | None
    user: str | None
    part: RequirementPart

    def matches(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                user: str | None) -> bool:
        if self.network is not None and address is not None \
                and address.version == self.network.version and address in self.network:
            return True
        return self.user is not None and self.user == user


def client_address(client_ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as rules compare it (IPv4-mapped IPv6 as IPv4, no zone)."""
    if not client_ip:
        return None
    try:
        address = ipaddress.ip_address(client_ip.split("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Requirements:
    """Resolves a request's requirement: names (regions, groups, zones), rules, default."""

    names: Mapping[str, Places]
    header: str
    rules: tuple[ClientRule, ...] = ()
    default: RequirementPart | None = None
    zones: tuple[str, ...] = field(default=())
    modes: Mapping[str, str] = field(default_factory=dict)  # zone -> its own `mode`
    mode: str = ENFORCE  # tags and the default without a mode of their own

    def part(self, source: str, detail: str, names: tuple[str, ...], places: Places,
             mode: str | None = None) -> RequirementPart:
        """A part whose names are enforced or reported: the rule's own mode, else the
        zone's, else the global one (`on_violation: report`)."""
        enforced: Places | None = None
        for name in names:
            if (mode or self.modes.get(name) or self.mode) == ENFORCE:
                here = self.names.get(name, frozenset())
                enforced = here if enforced is None else enforced & here
        return RequirementPart(source, detail, names, places, enforced)

    def expand(self, name: str) -> Places:
        try:
            return self.names[name]
        except KeyError:
            raise UnknownTag(name) from None

    def resolve(self, tag_values: Sequence[str], client_ip: str | None,
                user: str | None) -> Requirement:
        """Tags, matching client rules and the default, intersected; raises UnknownTag."""
        parts: list[RequirementPart] = []
        if self.rules:
            address = client_address(client_ip)
            parts.extend(rule.part for rule in self.rules if rule.matches(address, user))
        if not parts and self.default is not None:
            parts.append(self.default)
        for raw in tag_values:
            names = tuple(t.strip().lower() for t in raw.split(",") if t.strip())
            if not names:
                continue
            # `eu, de` is the same header repeated (RFC 9110 5.3): each one narrows.
            places = self.expand(names[0])
            for name in names[1:]:
                places = places & self.expand(name)
            parts.append(self.part("tag", f"header {self.header}: {raw.strip()}", names,
                                   places))
        if not parts:
            return Requirement()
        places = parts[0].places
        for part in parts[1:]:
            places = places & part.places
        return Requirement(tuple(parts), places)
