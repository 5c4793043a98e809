"""The bundle: one config and one catalog, compiled together, with their revisions.

A running proxy holds exactly one bundle at a time and swaps it whole on
reload, so a request is decided under one revision pair, which its audit
record names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from ..core.decision import Decision, decide
from ..core.endpoints import Catalog
from ..core.locate import OptionContext
from ..core.places import Places
from ..core.policy import Policy, PrivateEndpoint
from ..core.request import AzureResource, Request
from ..core.requirement import ENFORCE, REPORT, ClientRule, Requirements
from .compile import azure_deployment_types, load_catalog
from .config import Config, find_config, load_config
from .source import InvalidSource, Problem


@dataclass(frozen=True)
class Bundle:
    config: Config
    catalog: Catalog
    policy: Policy

    @property
    def regions(self):
        return self.catalog.regions

    @property
    def revisions(self) -> dict[str, str]:
        """What decided: every record carries these."""
        return {"catalog": self.catalog.revision, "config": self.config.revision}

    def decide(self, req: Request) -> Decision:
        return decide(self.catalog, self.policy, req)


def build_policy(config: Config, catalog: Catalog) -> Policy:
    """Check the config against the catalog's regions and compile it; raise InvalidSource."""
    doc = config.doc
    problems: list[Problem] = []
    regions = catalog.regions
    names: dict[str, Places] = dict(regions.names)

    def expand(wanted: tuple[str, ...], path: tuple) -> Places:
        out: set[str] = set()
        for name in wanted:
            if name in names:
                out |= names[name]
            else:
                problems.append(doc.problem(path, f"unknown region or zone {name!r}"))
        return frozenset(out)

    for zone, members in config.zones.items():
        path = ("residency", "zones", zone)
        if regions.knows(zone):
            problems.append(doc.problem(path, f"zone {zone!r} shadows a region of the same name"))
            continue
        names[zone] = expand(members, path)
    # Parts are built by the same `Requirements.part` that builds tag parts at request time,
    # so a rule's, a zone's and the global mode combine the same way everywhere.
    modes = Requirements(names, config.header, modes=dict(config.zone_modes),
                         mode=REPORT if config.on_violation == "report" else ENFORCE)
    rules = []
    for rule in config.clients:
        places = expand(rule.require, ("residency", "clients", rule.index, "require"))
        part = modes.part("client" if rule.network else "user", rule.label, rule.require,
                          places, rule.mode)
        rules.append(ClientRule(rule.network, rule.user, part))
    default = None
    if config.default:
        default = modes.part("default", "residency.default", config.default,
                             expand(config.default, ("residency", "default")))
    known_types = azure_deployment_types(catalog)
    azure: dict[str, AzureResource] = {}
    azure_keys: dict[str, str] = {}
    for name, raw in config.azure_resources.items():
        if raw["region"].lower() not in regions.azure:
            problems.append(doc.problem(("azure", "resources", name, "region"),
                                        f"unknown Azure region {raw['region']!r}"))
        for deployment, dtype in (raw.get("deployments") or {}).items():
            if dtype not in known_types:
                problems.append(doc.problem(
                    ("azure", "resources", name, "deployments", deployment),
                    f"unknown deployment type {dtype!r} (the catalog knows "
                    f"{', '.join(sorted(known_types))})"))
        azure[name] = AzureResource(name, raw["region"], dict(raw.get("deployments") or {}))
        if raw.get("api_key_env"):
            azure_keys[name] = raw["api_key_env"]
    private = []
    for i, p in enumerate(config.private_endpoints):
        url = urlsplit(p.url)
        if p.api not in catalog.apis:
            problems.append(doc.problem(("private_endpoints", i, "api"),
                                        f"unknown api {p.api!r}"))
        private.append(PrivateEndpoint(
            name=p.name, scheme=url.scheme, host=url.hostname or "",
            port=url.port or (443 if url.scheme == "https" else 80),
            path=url.path.rstrip("/"), api=p.api,
            places=expand(p.region, ("private_endpoints", i, "region")), models=p.models,
            api_key_env=p.api_key_env))
    if problems:
        raise InvalidSource(problems)
    key_envs = {*azure_keys.values(), *config.reroute_credentials.values(),
                *(p.api_key_env for p in private if p.api_key_env)}
    policy = Policy(
        requirements=replace(modes, rules=tuple(rules), default=default,
                             zones=tuple(sorted(config.zones))),
        on_violation=config.on_violation, azure=azure, azure_keys=azure_keys,
        reroute_keys=dict(config.reroute_credentials),
        private=tuple(private),
        env_present=frozenset(k for k in key_envs if os.environ.get(k)),
        json_depth=config.limits.json_depth)
    ctx = OptionContext(regions, azure)
    for endpoint in catalog.endpoints:
        policy.options[endpoint.key] = endpoint.locator.options(endpoint, ctx)
    # An AI service is not placed; what serves its users instead is its alternative
    # provider's placed endpoints (ChatGPT -> OpenAI's regional API, ...).
    for service in catalog.services.endpoints:
        alternative = catalog.services.alternatives.get(service.key)
        policy.options[service.key] = [o for e in catalog.endpoints
                                       if e.provider.id == alternative
                                       for o in policy.options.get(e.key, ())]
    return policy


def build_bundle(config: Config, catalog: Catalog) -> Bundle:
    return Bundle(config, catalog, build_policy(config, catalog))


def load_bundle(config_path: str | Path | None) -> Bundle:
    """Config file (or defaults) plus the catalogs it names; raise InvalidSource."""
    config = load_config(find_config(config_path))
    return build_bundle(config, load_catalog(config.catalog))
