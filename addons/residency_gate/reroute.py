"""Reroute planning: the compliant endpoint a violating request can be sent to instead.

A plan is only made when it is provably compliant (its places are inside the
requirement) and the model is offered there; otherwise the request is refused
with the reason. Credentials for a new destination come from environment
variables named in the config, never from the request: the plan names the
variable and the addon reads it when applying the plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .catalog import Endpoint, Location, RequestView
from .policy import Option, Policy
from .regions import Places

# Provider credentials that must never follow a request to another operator's endpoint.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key",
                      "openai-organization", "openai-project", "cookie")


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
    set_headers: Mapping[str, str] = field(default_factory=dict)  # "env:NAME" = from environment
    remove_headers: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path.split('?', 1)[0]}"


def plan_reroute(policy: Policy, endpoint: Endpoint, view: RequestView, model: str | None,
                 requirement: Places, scheme: str, port: int, query: str,
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
        for option in offered:
            route = _public_route(endpoint, option, view, model, scheme, port, query, policy)
            if route is not None:
                return route, ""
        if not options:
            reasons.append(f"no {endpoint.provider.name} endpoint satisfies the requirement")
        elif not offered:
            where = ", ".join(sorted({o.value or o.host or "?" for o in options})[:6])
            reasons.append(f"model {model!r} is not offered where it would comply ({where})")
        else:
            reasons.append("the request cannot be rewritten for the compliant endpoints")
    private, why = _private_route(policy, endpoint, view, model, requirement, query)
    if private is not None:
        return private, ""
    if why:
        reasons.append(why)
    return None, "; ".join(reasons)


def _replace_location(endpoint: Endpoint, path: str, new: str) -> str | None:
    pattern = endpoint.locator.pattern
    m = pattern.search(path) if pattern is not None else None
    if not m:
        return None
    return path[:m.start(1)] + new + path[m.end(1):]


def _public_route(endpoint: Endpoint, option: Option, view: RequestView, model: str | None,
                  scheme: str, port: int, query: str, policy: Policy) -> Route | None:
    strategy = endpoint.reroute.strategy
    location = Location(option.places, option.places, option.advice)
    full = view.path + (f"?{query}" if query else "")
    if strategy == "host" and option.kind == "host" and option.host:
        return Route("host", scheme, option.host, port, full, location,
                     f"host {view.host} -> {option.host}")
    if (strategy == "vertex_location" and option.kind == "location" and option.host
            and option.endpoint is not endpoint):  # the host moves with the location
        path = _replace_location(endpoint, view.path, option.value)
        if path is None:
            return None
        return Route("location", scheme, option.host, port, path + (f"?{query}" if query else ""),
                     location, f"location -> {option.value} ({option.host})")
    if strategy == "body_field" and option.kind == "body":
        loc = endpoint.locator
        if loc.paths and not view.path.startswith(loc.paths):
            return None
        if not isinstance(view.json(), dict):
            return None
        name = ".".join(loc.body_field)
        return Route("body", scheme, view.host, port, full, location,
                     f'body "{name}": "{option.value}"', body_fields={name: option.value})
    if strategy == "azure_deployment" and option.kind == "azure":
        resource, deployment = option.value.split("/", 1)
        requested = view.captures.get(endpoint.locator.capture, "")
        declared = policy.azure.get(resource)
        key_env = policy.config.azure_resources.get(resource, {}).get("api_key_env")
        current = _azure_deployment(endpoint, view)
        if declared is None or key_env is None or current != deployment:
            return None  # same deployment name on another resource, and its own key
        host = view.host.replace(requested, resource, 1) if requested else option.host
        return Route("azure", scheme, host, port, full, location,
                     f"Azure resource {requested} -> {resource} (deployment {deployment})",
                     set_headers={"api-key": f"env:{key_env}"},
                     remove_headers=("authorization",))
    return None


def _azure_deployment(endpoint: Endpoint, view: RequestView) -> str | None:
    from .catalog import first_match

    return first_match(endpoint.locator.deployment, view)


def _private_route(policy: Policy, endpoint: Endpoint, view: RequestView, model: str | None,
                   requirement: Places, query: str) -> tuple[Route | None, str]:
    candidates = [p for p in policy.config.private_endpoints
                  if policy.regions.expand_all(p.region) <= requirement]
    if not candidates:
        return None, ""
    if endpoint.provider.api != "openai" or not view.path.startswith("/v1/"):
        return None, (f"private endpoints speak the OpenAI API; this {endpoint.provider.name} "
                      "request cannot be sent to one")
    for private in candidates:
        served = private.models.get(model or "", private.models.get("*"))
        if served is None:
            continue
        if served == "*":
            served = model
        url = urlsplit(private.url)
        path = url.path.rstrip("/") + view.path[len("/v1"):] + (f"?{query}" if query else "")
        places = policy.regions.expand_all(private.region)
        body = {"model": served} if model and served != model else {}
        headers = {"authorization": f"env:{private.api_key_env}"} if private.api_key_env else {}
        return Route(
            "private", url.scheme, url.hostname, url.port or (443 if url.scheme == "https" else 80),
            path, Location(places, places, f"private endpoint {private.name!r}"),
            f"private endpoint {private.name} (model {served})", body_fields=body,
            set_headers=headers, remove_headers=CREDENTIAL_HEADERS,
        ), ""
    names = ", ".join(p.name for p in candidates)
    return None, f"no private endpoint ({names}) serves model {model!r}"


def apply_body_fields(content: bytes, fields: Mapping[str, Any]) -> bytes:
    data = json.loads(content)
    for dotted, value in fields.items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return json.dumps(data, separators=(",", ":")).encode()
