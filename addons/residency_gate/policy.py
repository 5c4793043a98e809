"""Policy: config + catalog compiled into what a decision needs.

Everything here is built once per (re)load: zones and client rules expanded to
place sets, Azure resources typed, and for every endpoint the list of
compliant alternatives (`Option`s) that block messages and reroutes use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import AzureResource, Catalog, Endpoint, load_catalog
from .config import Config, find_config, load_config
from .regions import Places
from .sourcefile import InvalidSource, Problem


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


@dataclass(frozen=True)
class Option:
    """A way to send the same request somewhere compliant."""

    endpoint: Endpoint
    kind: str  # host | model_prefix | location | body | azure | private
    value: str | None
    host: str | None
    places: Places
    advice: str  # imperative, for the application developer


@dataclass
class Policy:
    config: Config
    catalog: Catalog
    names: dict[str, Places] = field(default_factory=dict)
    client_rules: list[tuple] = field(default_factory=list)
    default: RequirementPart | None = None
    azure: dict[str, AzureResource] = field(default_factory=dict)
    options: dict[str, list[Option]] = field(default_factory=dict)  # by endpoint key
    _advice_cache: dict = field(default_factory=dict)

    @property
    def regions(self):
        return self.catalog.regions

    def expand(self, name: str) -> Places:
        try:
            return self.names[name]
        except KeyError:
            raise UnknownTag(name) from None

    def requirement(
        self, tag_values: Sequence[str], client_ip: str | None, user: str | None
    ) -> Requirement:
        """Tags, matching client rules and the default, intersected."""
        parts: list[RequirementPart] = []
        rules_matched = False
        if self.client_rules:
            address = None
            if client_ip:
                try:
                    address = ipaddress.ip_address(client_ip.split("%")[0])
                    if address.version == 6 and address.ipv4_mapped:
                        address = address.ipv4_mapped
                except ValueError:
                    address = None
            for rule, part in self.client_rules:
                if (rule.network is not None and address is not None
                        and address.version == rule.network.version
                        and address in rule.network) or (
                        rule.user is not None and rule.user == user):
                    parts.append(part)
                    rules_matched = True
        if not rules_matched and self.default is not None:
            parts.append(self.default)
        header = self.config.header
        for raw in tag_values:
            names = tuple(t.strip().lower() for t in raw.split(",") if t.strip())
            if not names:
                continue
            # `eu, de` is the same header repeated (RFC 9110 5.3): each one narrows.
            places = self.expand(names[0])
            for name in names[1:]:
                places = places & self.expand(name)
            parts.append(RequirementPart("tag", f"header {header}: {raw.strip()}", names,
                                         places))
        if not parts:
            return Requirement()
        places = parts[0].places
        for part in parts[1:]:
            places = places & part.places
        return Requirement(tuple(parts), places)

    def compliant_options(self, endpoint: Endpoint, requirement: Places) -> list[Option]:
        """Alternatives for this provider that satisfy the requirement, best first."""
        key = (endpoint.key, requirement)
        cached = self._advice_cache.get(key)
        if cached is None:
            keys = [endpoint.key, *(f"{endpoint.provider.id}/{t}" for t in endpoint.reroute.to)]
            cached = [o for k in keys for o in self.options.get(k, ()) if o.places <= requirement]
            # The broadest compliant place first: fewest constraints for the application.
            cached.sort(key=lambda o: (o.endpoint is not endpoint, -len(o.places), o.value or ""))
            if len(self._advice_cache) > 4096:
                self._advice_cache.clear()
            self._advice_cache[key] = cached
        return cached


# --------------------------------------------------------------------------- building


def _options_for(endpoint: Endpoint, policy: Policy) -> list[Option]:
    loc = endpoint.locator
    regions = policy.regions
    out: list[Option] = []

    def host_with(capture: str, value: str) -> str | None:
        for pattern in endpoint.hosts:
            if f"{{{capture}}}" in pattern:
                host = pattern.replace(f"{{{capture}}}", value)
                if "{" not in host:
                    return host
        return None

    def exact_host() -> str | None:
        return next((h for h in endpoint.hosts if "{" not in h), None)

    if loc.kind == "constant":
        host = exact_host()
        if host:
            out.append(Option(endpoint, "host", None, host, loc.constant.processing
                              | loc.constant.storage, f"send it to https://{host} ({endpoint.name})"))
    elif loc.kind in ("host", "path"):
        table = {k: v.processing | v.storage for k, v in loc.values.items()}
        for region_id, places in loc.cloud_regions.items():
            if f"{loc.cloud}:{region_id}" not in regions.multi_regions:
                table.setdefault(region_id, places)
        capture = loc.capture if loc.kind == "host" else loc.host_capture
        if loc.kind == "path" and capture is None:
            table = {}  # a location belongs in the host as well: see the regional endpoints
        for value, places in table.items():
            host = host_with(capture, value) if capture else exact_host()
            if host is None:
                continue
            if loc.kind == "host":
                advice = f"send it to https://{host} ({endpoint.name})"
                out.append(Option(endpoint, "host", value, host, places, advice))
            else:
                advice = f"use location {value!r} (https://{host}, path locations/{value})"
                out.append(Option(endpoint, "location", value, host, places, advice))
    elif loc.kind == "model_prefix":
        for prefix, spec in loc.values.items():
            out.append(Option(endpoint, "model_prefix", prefix, None, spec.processing | spec.storage,
                              f"use a model ID with the {prefix!r} prefix "
                              "(cross-region inference profile)"))
        if loc.host_capture:
            for region_id, places in loc.cloud_regions.items():
                if f"{loc.cloud}:{region_id}" in regions.multi_regions:
                    continue
                host = host_with(loc.host_capture, region_id)
                if host:
                    out.append(Option(endpoint, "host", region_id, host, places,
                                      f"call region {region_id} (https://{host}) with a model ID "
                                      "that has no geography prefix"))
    elif loc.kind == "body":
        for value, spec in loc.values.items():
            out.append(Option(endpoint, "body", value, None, spec.processing | spec.storage,
                              f'set "{".".join(loc.body_field)}": "{value}" in the request body'))
    elif loc.kind == "azure":
        for name, resource in policy.azure.items():
            region = regions.azure.get(resource.region.lower())
            if region is None:
                continue
            for deployment, dtype in resource.deployments.items():
                if dtype.startswith("Global") or dtype == "DeveloperTier":
                    places = regions.everywhere
                elif dtype.startswith("DataZone"):
                    if region.data_zone is None:
                        continue
                    places = region.data_zone | region.geography
                else:
                    places = region.geography
                host = host_with(loc.capture, name)
                out.append(Option(endpoint, "azure", f"{name}/{deployment}", host, places,
                                  f"use deployment {deployment!r} on Azure resource {name!r} "
                                  f"({dtype} in {resource.region})"))
    return out


def build_policy(config: Config, catalog: Catalog) -> Policy:
    """Check the config against the catalog's regions and compile it."""
    doc = config.doc
    problems: list[Problem] = []
    policy = Policy(config=config, catalog=catalog)
    regions = catalog.regions
    policy.names = dict(regions.names)

    def expand(names: tuple[str, ...], path: tuple) -> Places:
        out: set[str] = set()
        for name in names:
            if name in policy.names:
                out |= policy.names[name]
            else:
                problems.append(doc.problem(path, f"unknown region or zone {name!r}"))
        return frozenset(out)

    for zone, members in config.zones.items():
        path = ("residency", "zones", zone)
        if regions.knows(zone):
            problems.append(doc.problem(path, f"zone {zone!r} shadows a region of the same name"))
            continue
        policy.names[zone] = expand(members, path)
    for rule in config.clients:
        places = expand(rule.require, ("residency", "clients", rule.index, "require"))
        source = "client" if rule.network else "user"
        policy.client_rules.append(
            (rule, RequirementPart(source, rule.label, rule.require, places))
        )
    if config.default:
        places = expand(config.default, ("residency", "default"))
        policy.default = RequirementPart("default", "residency.default", config.default, places)
    for name, raw in config.azure_resources.items():
        if raw["region"].lower() not in regions.azure:
            problems.append(doc.problem(("azure", "resources", name, "region"),
                                        f"unknown Azure region {raw['region']!r}"))
        policy.azure[name] = AzureResource(name, raw["region"], dict(raw.get("deployments") or {}))
    for i, endpoint in enumerate(config.private_endpoints):
        expand(endpoint.region, ("private_endpoints", i, "region"))
    if problems:
        raise InvalidSource(problems)
    for endpoint in catalog.endpoints:
        policy.options[endpoint.key] = _options_for(endpoint, policy)
    return policy


def load_policy(config_path: str | Path | None) -> Policy:
    """Config file (or defaults) plus the catalogs it names; raise InvalidSource."""
    config = load_config(find_config(config_path))
    catalog = load_catalog(config.catalog)
    return build_policy(config, catalog)
