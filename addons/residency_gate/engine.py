"""The decision: may this request go where it is going?

Pure and synchronous: (request, policy) -> Decision. No I/O, no scans of the
catalog on the allow path, so it is safe to call on mitmproxy's event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .catalog import BodyError, Endpoint, Location, RequestView, first_match, normalise_host
from .policy import Option, Policy, Requirement, UnknownTag
from .reroute import Route, plan_reroute


@dataclass(frozen=True)
class RequestInfo:
    """One request as the proxy will send it: the destination is what we connect to."""

    method: str
    scheme: str
    host: str
    port: int
    path: str  # raw, may include the query string
    tag_values: Sequence[str] = ()
    body: bytes | None = None
    client_ip: str | None = None
    user: str | None = None
    signed: bool = False  # SigV4: host, path and body must not be rewritten
    body_error: str | None = None  # the body could not be decoded (Content-Encoding)


ALLOW, BLOCK, REROUTE = "allow", "block", "reroute"


@dataclass(frozen=True)
class Decision:
    verdict: str  # allow | block | reroute
    status: int  # HTTP status the client sees when we answer (451, 400, ...); 0 when forwarded
    code: str  # short reason code (metrics, audit): compliant, no_requirement, outside, ...
    reason: str  # the sentence a developer reads
    host: str
    url: str  # scheme://host[:port]/path, no query string
    provider: str | None = None
    provider_name: str | None = None
    api: str = "other"
    endpoint: str | None = None
    endpoint_name: str | None = None
    model: str | None = None
    location: Location | None = None
    requirement: Requirement = field(default_factory=Requirement)
    advice: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    note: str = ""
    route: Route | None = None

    def summary(self, policy: Policy) -> dict[str, Any]:
        """Plain data for audit records and `explain --json`."""
        describe = policy.regions.describe
        loc = self.location
        return {
            "decision": self.verdict,
            "status": self.status,
            "code": self.code,
            "reason": self.reason,
            "url": self.url,
            "host": self.host,
            "provider": self.provider,
            "endpoint": self.endpoint,
            "model": self.model,
            "places": describe(loc.places) if loc else None,
            "processing": describe(loc.processing) if loc else None,
            "storage": describe(loc.storage) if loc else None,
            "located_by": loc.detail if loc else None,
            "requirement": list(self.requirement.names),
            "requirement_places": describe(self.requirement.places)
            if self.requirement.places is not None else None,
            "requirement_sources": [
                {"source": p.source, "detail": p.detail, "names": list(p.names)}
                for p in self.requirement.parts
            ],
            "advice": list(self.advice),
            **({"routed_to": self.route.host, "routed_url": self.route.url,
                "routed_places": describe(self.route.location.places),
                "route": self.route.description} if self.route else {}),
        }


def _url(req: RequestInfo, host: str) -> str:
    default = 443 if req.scheme == "https" else 80
    port = "" if req.port in (default, 0) else f":{req.port}"
    return f"{req.scheme}://{host}{port}{req.path.split('?', 1)[0]}"


def decide(policy: Policy, req: RequestInfo) -> Decision:
    """Classify the destination, resolve the requirement, and compare."""
    host = normalise_host(req.host)
    url = _url(req, host)
    matched = policy.catalog.match(host)
    if matched is None:
        return Decision(ALLOW, 0, "not_llm", f"{host} is not an LLM API host in the catalog",
                        host, url)
    endpoint, captures = matched
    base = dict(host=host, url=url, provider=endpoint.provider.id,
                provider_name=endpoint.provider.name, api=endpoint.provider.api,
                endpoint=endpoint.id, endpoint_name=endpoint.name, note=endpoint.note)

    try:
        requirement = policy.requirement(req.tag_values, req.client_ip, req.user)
    except UnknownTag as e:
        return Decision(
            BLOCK, 400, "unknown_tag",
            f"Unknown residency tag {e.tag!r} in header {policy.config.header}. Use a region "
            f"(a country code such as 'de'), a group such as 'eu' or 'eea', or a zone the "
            f"operator defined{_zones_hint(policy)}. Nothing was sent to {host}.",
            **base)

    path, _, query = req.path.partition("?")
    view = RequestView(host=host, path=path, query=query, body=req.body, captures=captures,
                       azure=policy.azure, body_error=req.body_error)
    try:
        model = first_match(endpoint.model, view)
        location = endpoint.locator.locate(view, model)
    except BodyError as e:
        if requirement.places is None:
            return Decision(ALLOW, 0, "no_requirement",
                            f"No residency requirement applies ({e}; not inspected further).",
                            requirement=requirement, **base)
        return Decision(
            BLOCK, 400, "bad_body",
            f"Refused: a residency requirement (from {requirement.describe()}) applies and the "
            f"request to {host} cannot be classified because its {e}. Send a valid JSON body.",
            requirement=requirement, **base)
    return judge(policy, endpoint, requirement, location, model, base, req, view)


def judge(policy: Policy, endpoint: Endpoint, requirement: Requirement, location: Location,
          model: str | None, base: dict, req: RequestInfo, view: RequestView) -> Decision:
    """Compare where the request would go with where it may go."""
    describe = policy.regions.describe
    common = dict(requirement=requirement, location=location, model=model, **base)
    where = f"{base['host']} ({endpoint.provider.name}, {endpoint.name})"
    if requirement.places is None:
        return Decision(ALLOW, 0, "no_requirement", "No residency requirement applies.", **common)
    if not requirement.places:
        return Decision(
            BLOCK, 451, "empty_requirement",
            f"Blocked: the residency requirement is empty: {requirement.describe()} have no "
            f"place in common, so no destination can satisfy it. Remove the conflicting tag.",
            **common)
    places = location.places
    if places is not None and places <= requirement.places:
        return Decision(ALLOW, 0, "compliant",
                        f"Allowed: {where} processes and stores in "
                        f"{describe(location.processing)}"
                        f"{'' if location.storage == location.processing else ' / ' + describe(location.storage)}"
                        f", inside {describe(requirement.places)} (from {requirement.describe()}).",
                        **common)
    options = tuple(policy.compliant_options(endpoint, requirement.places))
    advice = tuple(o.advice for o in options[:3])
    if len(options) > 3:
        advice += (f"... and {len(options) - 3} more compliant options "
                   f"(residency-gate explain lists them)",)
    if places is None:
        code = "unknown_place"
        what = f"the processing place of this request to {where} is unknown: {location.detail}"
    else:
        code = "outside_requirement"
        outside_places = places - requirement.places
        outside = (describe(outside_places) if len(outside_places) <= 8
                   else f"{len(outside_places)} places outside it")
        what = (f"{where} may process this request in {describe(location.processing)}"
                + ("" if location.storage == location.processing
                   else f" and store it in {describe(location.storage)}")
                + f" ({location.detail}), which includes {outside}")
    no_route = ""
    if policy.config.on_violation == "reroute":
        try:
            route, why = plan_reroute(policy, endpoint, view, model, requirement.places,
                                      req.scheme, req.port, view.query, req.signed)
        except BodyError as e:
            route, why = None, str(e)
        if route is not None:
            return Decision(
                REROUTE, 0, "rerouted",
                f"Rerouted: requirement {describe(requirement.places)} "
                f"(from {requirement.describe()}); {what}. Sent instead to {route.url} "
                f"({route.description}), which processes in "
                f"{describe(route.location.processing)}.",
                route=route, advice=advice, options=options, **common)
        code = "no_compliant_route"
        no_route = f" No reroute: {why}."
    fix = ("To comply: " + "; or ".join(advice) + "." if advice
           else f"No {endpoint.provider.name} endpoint in the catalog satisfies it.")
    note = f" Note: {endpoint.note}" if endpoint.note else ""
    reason = (f"Blocked by residency policy: requirement {describe(requirement.places)} "
              f"(from {requirement.describe()}), but {what}.{no_route} {fix}{note}")
    return Decision(BLOCK, 451, code, reason, advice=advice, options=options, **common)


def _zones_hint(policy: Policy) -> str:
    zones = sorted(policy.config.zones)
    return f" ({', '.join(zones)})" if zones else ""
