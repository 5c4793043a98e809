"""The sentences a developer reads: one place, so every refusal says what to change."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .places import RegionTree

if TYPE_CHECKING:
    from .endpoints import Endpoint
    from .locate import Location
    from .normalise import UnsafePath
    from .policy import Policy
    from .request import BodyError
    from .requirement import Requirement
    from .reroute import Route

NOTHING_FORWARDED = "Nothing was forwarded."
FIX_PATH = ("Send the path in normal form: no '.' or '..' segments, no empty segments, no ';' "
            "parameters, no encoded '/', '\\' or control characters, valid %XX escapes.")
FIX_BODY = {  # BodyError.kind -> what to send instead
    "json": "Send a valid JSON body.",
    "utf8": "Send the JSON body encoded as UTF-8.",
    "bom": "Send the JSON body without a byte order mark.",
    "constant": "Send numbers as finite JSON numbers.",
    "depth": "Send a less deeply nested JSON body.",
    "repeated": "Send each key once.",
    "query": "Send each query parameter the decision reads once.",
}


def not_llm(host: str) -> str:
    return f"{host} is not an LLM API host in the catalog"


def unknown_tag(tag: str, policy: Policy, host: str) -> str:
    zones = sorted(policy.requirements.zones)
    hint = f" ({', '.join(zones)})" if zones else ""
    return (f"Unknown residency tag {tag!r} in header {policy.header}. Use a region (a country "
            f"code such as 'de'), a group such as 'eu' or 'eea', or a zone the operator "
            f"defined{hint}. Nothing was sent to {host}.")


def no_requirement_unreadable(error: Exception) -> str:
    return f"No residency requirement applies ({error}; not inspected further)."


def bad_body(requirement: Requirement, host: str, error: BodyError) -> str:
    return (f"Refused: a residency requirement (from {requirement.describe()}) applies and the "
            f"request to {host} cannot be classified because its {error}. "
            f"{FIX_BODY.get(error.kind, FIX_BODY['json'])} {NOTHING_FORWARDED}")


def no_requirement_path(error: UnsafePath) -> str:
    return (f"No residency requirement applies (the path has {error.what}; forwarded as sent, "
            "not inspected further).")


def bad_path(requirement: Requirement, host: str, error: UnsafePath) -> str:
    return (f"Refused: a residency requirement (from {requirement.describe()}) applies and the "
            f"path of this request to {host} has {error.what}: servers read such a path in "
            f"different ways, so where it would be processed cannot be known. {FIX_PATH} "
            f"{NOTHING_FORWARDED}")


def empty_requirement(requirement: Requirement) -> str:
    return (f"Blocked: the residency requirement is empty: {requirement.describe()} have no "
            "place in common, so no destination can satisfy it. Remove the conflicting tag.")


def _where(endpoint: Endpoint, host: str) -> str:
    return f"{host} ({endpoint.provider.name}, {endpoint.name})"


def compliant(regions: RegionTree, endpoint: Endpoint, host: str, location: Location,
              requirement: Requirement) -> str:
    d = regions.describe
    storage = "" if location.storage == location.processing else " / " + d(location.storage)
    return (f"Allowed: {_where(endpoint, host)} processes and stores in "
            f"{d(location.processing)}{storage}, inside {d(requirement.places)} "
            f"(from {requirement.describe()}).")


def violation(regions: RegionTree, endpoint: Endpoint, host: str, location: Location,
              requirement: Requirement) -> str:
    """What is wrong with the destination, as the middle of a sentence."""
    d = regions.describe
    where = _where(endpoint, host)
    if location.places is None:
        return f"the processing place of this request to {where} is unknown: {location.detail}"
    outside_places = location.places - requirement.places
    outside = (d(outside_places) if len(outside_places) <= 8
               else f"{len(outside_places)} places outside it")
    stored = ("" if location.storage == location.processing
              else f" and store it in {d(location.storage)}")
    return (f"{where} may process this request in {d(location.processing)}{stored} "
            f"({location.detail}), which includes {outside}")


def rerouted(regions: RegionTree, requirement: Requirement, what: str, route: Route) -> str:
    d = regions.describe
    return (f"Rerouted: requirement {d(requirement.places)} (from {requirement.describe()}); "
            f"{what}. Sent instead to {route.url} ({route.description}), which processes in "
            f"{d(route.location.processing)}.")


def blocked(regions: RegionTree, endpoint: Endpoint, requirement: Requirement, what: str,
            no_route: str, advice: tuple[str, ...]) -> str:
    fix = ("To comply: " + "; or ".join(advice) + "." if advice
           else f"No {endpoint.provider.name} endpoint in the catalog satisfies it.")
    note = f" Note: {endpoint.note}" if endpoint.note else ""
    return (f"Blocked by residency policy: requirement {regions.describe(requirement.places)} "
            f"(from {requirement.describe()}), but {what}.{no_route} {fix}{note}")


# ---------------------------------------------------------------- refusals before a comparison


def fronting_disagree(names: list[str]) -> str:
    return f"Host header and TLS SNI disagree ({', '.join(names)})."


def fronting_unresolved(name: str, address: str) -> str:
    return (f"{name} does not resolve to {address}, the address this connection goes to; "
            "refused (domain fronting).")


def fronting_behind(others: list[str], target: str) -> str:
    return (f"Request names {', '.join(others)} but goes to {target}; refused (domain "
            "fronting).")


def fronting_named(target: str, others: list[str]) -> str:
    return (f"Request goes to {target} but names {', '.join(others)} in its Host header or TLS "
            "SNI; refused (domain fronting). Send it to the host you mean, through the proxy.")


def ip_literal_refused(address: str) -> str:
    return (f"TLS to the IP address {address} names no host, and this proxy refuses such "
            "connections (ip_literals: refuse). Connect by host name through the proxy. "
            f"{NOTHING_FORWARDED}")


def too_large(limit: int) -> str:
    return (f"Request body larger than {limit} bytes (limits.request_body_bytes); "
            f"residency-gate cannot classify it and refused it. {NOTHING_FORWARDED}")


def decodes_too_large(limit: int, key: str) -> str:
    return (f"Request body decodes (Content-Encoding) to more than {limit} bytes ({key}); "
            f"residency-gate refused it without decoding further. {NOTHING_FORWARDED}")


def bad_content_length() -> str:
    return "Invalid Content-Length header; refused."


def internal_error(what: str) -> str:
    return (f"residency-gate could not decide on this request ({what}) and refused it; "
            "nothing was forwarded.")


def audit_unavailable() -> str:
    return ("The residency audit trail cannot be written; residency-gate refuses LLM traffic "
            f"until it can. {NOTHING_FORWARDED}")


def decision_timeout(seconds: float) -> str:
    return (f"residency-gate could not decide on and record this request within {seconds:g}s "
            "(limits.decision_timeout_seconds) and refused it; nothing was forwarded.")


UPSTREAM_FAILURES = {
    "connect": "could not be connected to",
    "tls": "failed the TLS handshake",
    "reset": "closed the connection without an answer",
}


def upstream_failed(host: str, kind: str) -> str:
    what = UPSTREAM_FAILURES.get(kind, "did not answer")
    return (f"The provider {host} {what}; residency-gate forwarded the request (it was "
            "allowed and recorded) and got no response. Retry later.")


def upstream_timeout(host: str, key: str, seconds: float) -> str:
    return (f"The provider {host} did not answer within {seconds:g}s (limits.{key}); "
            "residency-gate forwarded the request (it was allowed and recorded) and gave up "
            "waiting. Retry later.")


def key_missing(host: str, env: str) -> str:
    return (f"the compliant endpoint {host} needs a key from environment variable {env}, "
            "which is not set on the proxy")


def connect_port_refused(host: str, port: int, allowed: list[int]) -> str:
    return (f"residency-gate refuses CONNECT to {host}:{port}: this proxy tunnels only to "
            f"port{'s' if len(allowed) > 1 else ''} {', '.join(map(str, allowed))} "
            "(the operator's access.connect_ports).\n")


def client_not_allowed(address: str) -> str:
    return (f"client {address} is not in access.clients; connection closed (add its network "
            "there to let it use the proxy)")
