"""Reroute planning: the compliant endpoint a violating request can be sent to instead.

A plan is only made when it is provably compliant (its places are inside the
requirement), the model is offered there, and the credential it needs is at
hand; otherwise the request is refused with the reason. A new destination's
credential comes from an environment variable named in the config, never from
the request: the plan names the variable, the proxy reads it when applying.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import wording
from .locate import AzureLocator, Location, Option, PathLocator
from .places import Places
from .request import RequestView

if TYPE_CHECKING:
    from .endpoints import Catalog, Endpoint
    from .policy import Policy


@dataclass(frozen=True)
class Credential:
    """The key a route sends instead of the client's: `header: format` with the key from env."""

    header: str
    format: str
    env: str


@dataclass(frozen=True)
class Route:
    kind: str  # host | location | body | azure | private
    scheme: str
    host: str
    port: int
    path: str  # full raw path after rewrite, query included
    location: Location
    description: str
    body_fields: Mapping[str, Any] = field(default_factory=dict)
    credential: Credential | None = None
    remove_headers: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path.split('?', 1)[0]}"


def plan_reroute(catalog: Catalog, policy: Policy, endpoint: Endpoint, view: RequestView,
                 model: str | None, requirement: Places, scheme: str, port: int, query: str,
                 signed: bool) -> tuple[Route | None, str]:
    """(route, "") or (None, why no compliant route exists)."""
    strategy = endpoint.reroute.strategy
    reasons: list[str] = []
    if signed:
        reasons.append("the request is SigV4-signed (host, path and body are covered by the "
                       "signature), so it cannot be rewritten")
    elif strategy == "never":
        reasons.append(f"{endpoint.name} requests are never rewritten"
                       + (f" ({endpoint.reroute.reason})" if endpoint.reroute.reason else ""))
    else:
        options = policy.compliant_options(endpoint, requirement)
        offered = [o for o in options if o.endpoint.reroute.offers(o.value, model)
                   and endpoint.reroute.offers(o.value, model)]
        missing_keys: list[str] = []
        for option in offered:
            route = _public_route(endpoint, option, view, scheme, port, query, policy)
            if route is None:
                continue
            route = _with_credentials(route, endpoint, policy)
            if isinstance(route, str):
                missing_keys.append(route)
                continue
            if route.credential and route.credential.env not in policy.env_present:
                missing_keys.append(wording.key_missing(route.host, route.credential.env))
                continue
            return route, ""
        if not options:
            reasons.append(f"no {endpoint.provider.name} endpoint satisfies the requirement")
        elif not offered:
            where = ", ".join(sorted({o.value or o.host or "?" for o in options})[:6])
            reasons.append(f"model {model!r} is not offered where it would comply ({where})")
        elif missing_keys:
            reasons.extend(missing_keys)
        else:
            reasons.append("the request cannot be rewritten for the compliant endpoints")
    private, why = _private_route(catalog, policy, endpoint, view, model, requirement, query)
    if private is not None:
        return private, ""
    if why:
        reasons.append(why)
    return None, "; ".join(reasons)


def _public_route(endpoint: Endpoint, option: Option, view: RequestView, scheme: str,
                  port: int, query: str, policy: Policy) -> Route | None:
    strategy = endpoint.reroute.strategy
    location = Location(option.places, option.places, option.advice)
    suffix = f"?{query}" if query else ""
    full = view.path + suffix
    locator = endpoint.locator
    if strategy == "host" and option.kind == "host" and option.host:
        return Route("host", scheme, option.host, port, full, location,
                     f"host {view.host} -> {option.host}")
    if (strategy == "vertex_location" and option.kind == "location" and option.host
            and option.endpoint is not endpoint and isinstance(locator, PathLocator)):
        path = locator.replace(view.path, option.value)  # the host moves with the location
        if path is None:
            return None
        return Route("location", scheme, option.host, port, path + suffix, location,
                     f"location -> {option.value} ({option.host})")
    if strategy == "body_field" and option.kind == "body":
        if locator.paths and not view.path.startswith(locator.paths):
            return None
        if not isinstance(view.json(), dict):
            return None
        name = locator.field_name
        return Route("body", scheme, view.host, port, full, location,
                     f'body "{name}": "{option.value}"', body_fields={name: option.value})
    if strategy == "azure_deployment" and option.kind == "azure" \
            and isinstance(locator, AzureLocator):
        resource, deployment = option.value.split("/", 1)
        requested = view.captures.get(locator.capture, "")
        key_env = policy.azure_keys.get(resource)
        if resource not in policy.azure or key_env is None \
                or locator.deployment_of(view) != deployment:
            return None  # same deployment name on another resource, and its own key
        host = view.host.replace(requested, resource, 1) if requested else option.host
        api = endpoint.api
        return Route("azure", scheme, host, port, full, location,
                     f"Azure resource {requested} -> {resource} (deployment {deployment})",
                     credential=Credential(api.key_header or "api-key", api.key_format, key_env),
                     remove_headers=tuple(h for h in api.credential_headers
                                          if h != api.key_header))
    return None


def _with_credentials(route: Route, source: Endpoint, policy: Policy) -> Route | str:
    """The key the route sends: the operator's for that host if one is configured, else the
    client's where the catalog says it carries over; a reason when neither holds."""
    if route.credential is not None:
        return route  # Azure: already the target resource's own key
    env = policy.reroute_keys.get(route.host)
    api = source.api
    if env is not None:
        return replace(route, credential=Credential(api.key_header or "authorization",
                                                    api.key_format, env),
                       remove_headers=api.credential_headers)
    if source.reroute.credentials == "own":
        return (f"{route.host} does not accept the client's key and no key is configured for it "
                f"(reroute.credentials.{route.host}.api_key_env)")
    if source.reroute.credentials == "conditional":
        return replace(route, description=f"{route.description}, client's key kept")
    return route


def _private_route(catalog: Catalog, policy: Policy, endpoint: Endpoint, view: RequestView,
                   model: str | None, requirement: Places,
                   query: str) -> tuple[Route | None, str]:
    candidates = [p for p in policy.private if p.places <= requirement]
    if not candidates:
        return None, ""
    prefix = endpoint.api.path_prefix
    if endpoint.api.id != "openai" or not prefix or not view.path.startswith(prefix):
        return None, (f"private endpoints speak the OpenAI API; this {endpoint.provider.name} "
                      "request cannot be sent to one")
    credential_headers = tuple(sorted({h for api in catalog.apis.values()
                                       for h in api.credential_headers}))
    missing = []
    for private in candidates:
        served = private.serves(model)
        if served is None:
            continue
        credential = None
        if private.api_key_env:
            if private.api_key_env not in policy.env_present:
                missing.append(wording.key_missing(private.host, private.api_key_env))
                continue
            api = catalog.apis[private.api]
            credential = Credential(api.key_header or "authorization", api.key_format,
                                    private.api_key_env)
        path = private.path + view.path[len(prefix) - 1:] + (f"?{query}" if query else "")
        return Route(
            "private", private.scheme, private.host, private.port, path,
            Location(private.places, private.places, f"private endpoint {private.name!r}"),
            f"private endpoint {private.name} (model {served})",
            body_fields={"model": served} if model and served != model else {},
            credential=credential, remove_headers=credential_headers,
        ), ""
    if missing:
        return None, "; ".join(missing)
    names = ", ".join(p.name for p in candidates)
    return None, f"no private endpoint ({names}) serves model {model!r}"


def apply_body_fields(content: bytes, fields: Mapping[str, Any]) -> bytes:
    """The body with `fields` (dotted names) set; the rest as the client sent it."""
    data = json.loads(content)
    for dotted, value in fields.items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return json.dumps(data, separators=(",", ":")).encode()
