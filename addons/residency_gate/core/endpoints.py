"""The compiled catalog: providers, their endpoints, and host lookup.

Built once per load by `catalog.compile`; a lookup is an exact-host dict hit or
a few regexes indexed by the host's last two labels, never a scan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .apis import FALLBACK, Api
from .extract import Extractor
from .locate import Locator
from .places import RegionTree


def normalise_host(host: str) -> str:
    """Hosts compare lower-case without a trailing dot (`API.OpenAI.com.` is api.openai.com)."""
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class Provider:
    id: str
    name: str
    api: Api
    source: str
    reviewed: str
    file: str
    # api: a provider of the catalog; app (people's AI apps) or unplaced_api: an inventory
    # service (catalog inventory.yaml), tunnelled and counted unless a requirement applies
    category: str = "api"

    @property
    def inventoried(self) -> bool:
        return self.category != "api"


@dataclass(frozen=True)
class RerouteSpec:
    """How a request to an endpoint may be rewritten to a compliant one (catalog `reroute`)."""

    strategy: str  # host | vertex_location | body_field | azure_deployment | never
    to: tuple[str, ...] = ()
    reason: str = ""
    availability: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    credentials: str = "carry"  # carry | own | conditional: does the client's key work there?
    credentials_note: str = ""

    def offers(self, value: str | None, model: str | None) -> bool:
        """Is `model` offered where `value` (region, location, geo) points?

        No availability data: the provider offers the same models everywhere. Once a
        provider's availability is declared, an unlisted place offers nothing we can prove.
        """
        if not self.availability or model is None:
            return True
        patterns = self.availability.get((value or "").lower())
        if patterns is None:
            return False
        return any(fnmatchcase(model.lower(), p.lower()) for p in patterns)


NO_REROUTE = RerouteSpec("never")


@dataclass(frozen=True)
class Endpoint:
    provider: Provider
    id: str
    name: str
    hosts: tuple[str, ...]
    model: tuple[Extractor, ...]
    locator: Locator
    note: str
    source: str
    reviewed: str
    reroute: RerouteSpec = NO_REROUTE

    @property
    def key(self) -> str:
        return f"{self.provider.id}/{self.id}"

    @property
    def api(self) -> Api:
        return self.provider.api


@dataclass(frozen=True)
class HostPattern:
    pattern: str
    regex: re.Pattern[str]
    labels: tuple[str, ...]
    endpoint: Endpoint


type Match = tuple[Endpoint, dict[str, str]]


@dataclass(frozen=True)
class Review:
    """When an entry was last checked against its source (`reviewed:`), and where it says so."""

    provider: str
    what: str  # the provider, or provider/endpoint
    reviewed: str  # ISO date
    file: str
    line: int


@dataclass
class Services:
    """AI services the catalog does not place (catalog `inventory.yaml`): each one an
    Endpoint of unknown place. Hosts are exact or `*.domain` (every subdomain)."""

    endpoints: list[Endpoint] = field(default_factory=list)
    exact: dict[str, Endpoint] = field(default_factory=dict)
    domains: dict[str, Endpoint] = field(default_factory=dict)  # "*.x.com" -> under x.com
    alternatives: dict[str, str] = field(default_factory=dict)  # endpoint key -> provider id
    reviews: list[Review] = field(default_factory=list)
    _tails: frozenset[str] | None = field(default=None, repr=False)

    def match(self, host: str) -> Endpoint | None:
        found = self.exact.get(host)
        if found is not None or not self.domains:
            return found
        labels = host.split(".")
        if ".".join(labels[-2:]) not in self.tails:  # most hosts: one dict miss
            return None
        for i in range(1, len(labels) - 1):
            found = self.domains.get(".".join(labels[i:]))
            if found is not None:
                return found
        return None

    @property
    def tails(self) -> frozenset[str]:
        """The last two labels of every `*.domain`: a host ending otherwise matches none."""
        if self._tails is None:
            self._tails = frozenset(".".join(d.split(".")[-2:]) for d in self.domains)
        return self._tails


@dataclass
class Catalog:
    """Compiled catalog: regions, wire formats, providers, and fast host lookup."""

    regions: RegionTree
    apis: dict[str, Api]
    providers: dict[str, Provider]
    endpoints: list[Endpoint]
    exact: dict[str, Endpoint]
    patterns: dict[str, list[HostPattern]]  # keyed by the host's last two labels
    revision: str  # hash of every file's name and bytes
    files: list[str]
    dirs: list[str] = field(default_factory=list)  # watched for new files (hot reload)
    reviews: list[Review] = field(default_factory=list)
    services: Services = field(default_factory=lambda: Services())

    def match(self, host: str) -> Match | None:
        """The endpoint a host belongs to, with its captures; None for non-AI hosts. Provider
        endpoints first, then the AI services of the inventory (their place is unknown)."""
        host = normalise_host(host)
        endpoint = self.exact.get(host)
        if endpoint is not None:
            return endpoint, {}
        labels = host.split(".")
        for candidate in self.patterns.get(".".join(labels[-2:]), ()):
            if len(candidate.labels) == len(labels):
                m = candidate.regex.fullmatch(host)
                if m:
                    return candidate.endpoint, m.groupdict()
        service = self.services.match(host)
        return (service, {}) if service is not None else None

    def service(self, host: str) -> Endpoint | None:
        """The inventory service (an AI app or unplaced API) a host belongs to; None for
        other hosts, and for hosts of provider endpoints, which take precedence."""
        found = self.match(host) if host else None
        return found[0] if found is not None and found[0].provider.inventoried else None

    def is_llm(self, host: str) -> bool:
        return bool(host) and self.match(host) is not None

    def api_of(self, host: str) -> Api:
        """The wire format refusals to `host` use (OpenAI-compatible when unknown)."""
        matched = self.match(host) if host else None
        if matched is not None:
            return matched[0].api
        return self.apis.get("openai", FALLBACK)

    def host_patterns(self) -> list[str]:
        """Every host the proxy must see (PAC files): provider endpoints and inventory
        services (`*.domain` as one `{sub}` label)."""
        services = {h.replace("*.", "{sub}.", 1) for e in self.services.endpoints
                    for h in e.hosts}
        return sorted({h for e in self.endpoints for h in e.hosts} | services)
