"""The decision: may this request go where it is going?

Pure and synchronous: (catalog, policy, request) -> Decision. No I/O, no scans
of the catalog, so it is safe on mitmproxy's event loop. Every way the proxy
can answer a request is a Decision with a ReasonCode, including the refusals
that happen before the comparison (fronting, size, undecodable bodies,
internal errors): one type, so one path writes the response, the record and
the metric, and `explain` can show every outcome.

Report mode (`mode: report` on a rule or zone, `on_violation: report`) changes
only whether a violation of the comparison is enforced: the Decision is the one
an enforced violation gets, with `enforced=False`, and the proxy forwards the
request. Refusals that are not about places (unknown tag, unreadable body,
fronting, limits, internal errors) are always enforced: report mode never lets
broken input through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import wording
from .apis import FALLBACK, Api
from .endpoints import Catalog, Endpoint, normalise_host
from .extract import first_match
from .locate import Location, Option
from .normalise import UnsafePath, normalise_target, split_target
from .policy import Policy
from .request import BodyError, Request, RequestView, url_of
from .requirement import Requirement, UnknownTag
from .reroute import Route, plan_reroute

ALLOW, BLOCK, REROUTE = "allow", "block", "reroute"


class ReasonCode(StrEnum):
    """Why: the short code in records, metrics and `X-Residency-Reason`, with the verdict
    and the HTTP status the client sees when the proxy answers (0: forwarded)."""

    def __new__(cls, label: str, verdict: str, status: int) -> ReasonCode:
        obj = str.__new__(cls, label)
        obj._value_ = label
        obj.verdict = verdict
        obj.status = status
        return obj

    verdict: str
    status: int

    @property
    def reportable(self) -> bool:
        """A violation of the place comparison, which report mode forwards instead."""
        return self in _REPORTABLE

    # forwarded
    NOT_LLM = "not_llm", ALLOW, 0
    NO_REQUIREMENT = "no_requirement", ALLOW, 0
    COMPLIANT = "compliant", ALLOW, 0
    REROUTED = "rerouted", REROUTE, 0
    # refused: the comparison said no
    EMPTY_REQUIREMENT = "empty_requirement", BLOCK, 451
    UNKNOWN_PLACE = "unknown_place", BLOCK, 451
    OUTSIDE_REQUIREMENT = "outside_requirement", BLOCK, 451
    NO_COMPLIANT_ROUTE = "no_compliant_route", BLOCK, 451
    # refused: the request cannot be decided as sent
    UNKNOWN_TAG = "unknown_tag", BLOCK, 400
    BAD_BODY = "bad_body", BLOCK, 400
    BAD_PATH = "bad_path", BLOCK, 400
    BAD_REQUEST = "bad_request", BLOCK, 400
    BODY_TOO_LARGE = "body_too_large", BLOCK, 413
    MISDIRECTED = "misdirected", BLOCK, 421
    # the provider did not answer a forwarded request (the decision was recorded; these
    # shape the answer the client gets instead of the provider's)
    UPSTREAM_FAILED = "upstream_failed", BLOCK, 502
    UPSTREAM_TIMEOUT = "upstream_timeout", BLOCK, 504
    # refused: the gate cannot do its job right now (fail closed)
    INTERNAL_ERROR = "internal_error", BLOCK, 500
    AUDIT_UNAVAILABLE = "audit_unavailable", BLOCK, 503
    DECISION_TIMEOUT = "decision_timeout", BLOCK, 503


_REPORTABLE = frozenset({ReasonCode.EMPTY_REQUIREMENT, ReasonCode.UNKNOWN_PLACE,
                         ReasonCode.OUTSIDE_REQUIREMENT, ReasonCode.NO_COMPLIANT_ROUTE,
                         ReasonCode.REROUTED})
REPORT = "report"  # X-Residency-Decision of a forwarded violation in report mode


@dataclass(frozen=True, slots=True)  # slots: one is built per request, ~30% faster
class Decision:
    code: ReasonCode
    reason: str  # the sentence a developer reads
    host: str
    url: str  # scheme://host[:port]/path, no query string
    api: Api = FALLBACK  # wire format of the destination: shapes the refusal body
    endpoint: Endpoint | None = None
    model: str | None = None
    location: Location | None = None
    requirement: Requirement = field(default_factory=Requirement)
    advice: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    route: Route | None = None
    trace: tuple[str, ...] = ()  # the evaluation's steps, as `explain` shows them
    reads: Mapping[str, Any] = field(default_factory=dict)  # body/query values read
    enforced: bool = True  # False: a violation in report mode, forwarded unchanged
    target: str | None = None  # path?query to forward when it differs from what was sent

    @property
    def verdict(self) -> str:
        return self.code.verdict

    @property
    def disposition(self) -> str:
        """What the client is told happened (`X-Residency-Decision`)."""
        return self.code.verdict if self.enforced else REPORT

    @property
    def status(self) -> int:
        return self.code.status

    @property
    def provider(self) -> str | None:
        return self.endpoint.provider.id if self.endpoint else None

    @property
    def endpoint_id(self) -> str | None:
        return self.endpoint.id if self.endpoint else None

    @property
    def is_llm(self) -> bool:
        return self.code is not ReasonCode.NOT_LLM


def refuse(code: ReasonCode, reason: str, *, host: str, url: str, api: Api = FALLBACK,
           **known) -> Decision:
    """A refusal reached before (or instead of) the comparison."""
    return Decision(code, reason, host, url, api, trace=(f"refused: {code}",), **known)


def decide(catalog: Catalog, policy: Policy, req: Request) -> Decision:
    """Classify the destination, resolve the requirement, normalise the path, locate,
    compare."""
    host = normalise_host(req.host)
    url = url_of(req.scheme, host, req.port, req.path)
    matched = catalog.match(host)
    if matched is None:
        return Decision(ReasonCode.NOT_LLM, wording.not_llm(host), host, url,
                        catalog.api_of(""), trace=(f"destination {host}: not in the catalog",))
    endpoint, captures = matched
    trace = [f"destination {host}: {endpoint.provider.name}, {endpoint.name} ({endpoint.key})"]
    base = dict(host=host, url=url, api=endpoint.api, endpoint=endpoint)
    try:
        requirement = policy.requirements.resolve(req.tag_values, req.client_ip, req.user)
    except UnknownTag as e:
        trace.append(f"requirement: unknown tag {e.tag!r}")
        return Decision(ReasonCode.UNKNOWN_TAG, wording.unknown_tag(e.tag, policy, host),
                        trace=tuple(trace), **base)
    trace.extend(f"requirement from {p.detail}: {'+'.join(p.names)}" for p in requirement.parts)
    try:
        target = normalise_target(req.path, req.signed)  # the same object when already normal
    except UnsafePath as e:
        return unreadable(ReasonCode.BAD_PATH, f"path: {e.what}",
                          wording.bad_path(requirement, host, e), wording.no_requirement_path(e),
                          requirement, trace, base)
    if target is not req.path:
        trace.append(f"path normalised: {split_target(req.path)[0]} -> "
                     f"{split_target(target)[0]}")
        base["url"] = url_of(req.scheme, host, req.port, target)
        base["target"] = target
    path, _, query = target.partition("?")
    view = RequestView(host=host, path=path, query=query, body=req.body,
                       captures=captures, azure=policy.azure, body_error=req.body_error,
                       json_depth=policy.json_depth)
    base["reads"] = view.reads  # filled as locators read; complete once decide returns
    try:
        model = first_match(endpoint.model, view)
        location = endpoint.locator.locate(view, model)
    except BodyError as e:
        return unreadable(ReasonCode.BAD_BODY, f"body: {e}", wording.bad_body(requirement, host, e),
                          wording.no_requirement_unreadable(e), requirement, trace, base)
    if model:
        trace.append(f"model: {model}")
    trace.append(f"located by {location.detail}")
    return judge(catalog, policy, req, view, endpoint, requirement, location, model, base, trace)


def unreadable(code: ReasonCode, step: str, refused: str, forwarded: str,
               requirement: Requirement, trace: list[str], base: dict) -> Decision:
    """What the decision must read has no single reading (path or body): refused when a
    requirement applies; otherwise forwarded as sent and recorded with no place."""
    trace.append(step)
    if requirement.places is None:
        return Decision(ReasonCode.NO_REQUIREMENT, forwarded, requirement=requirement,
                        trace=tuple(trace), **base)
    return Decision(code, refused, requirement=requirement, trace=tuple(trace), **base)


def judge(catalog: Catalog, policy: Policy, req: Request, view: RequestView,
          endpoint: Endpoint, requirement: Requirement, location: Location,
          model: str | None, base: dict, trace: list[str]) -> Decision:
    """Compare where the request would go with where it may go."""
    regions = catalog.regions
    common = dict(requirement=requirement, location=location, model=model, **base)
    if requirement.places is None:
        return Decision(ReasonCode.NO_REQUIREMENT, "No residency requirement applies.",
                        trace=(*trace, "no requirement: allow"), **common)
    places = location.places
    enforced = requirement.enforces(places)
    mode = "" if enforced else " (report mode: forwarded)"
    if not requirement.places:
        return Decision(ReasonCode.EMPTY_REQUIREMENT, wording.empty_requirement(requirement),
                        trace=(*trace, f"requirement is empty: block{mode}"), enforced=enforced,
                        **common)
    if places is not None and places <= requirement.places:
        return Decision(ReasonCode.COMPLIANT,
                        wording.compliant(regions, endpoint, base["host"], location, requirement),
                        trace=(*trace, "every place inside the requirement: allow"), **common)
    options = tuple(policy.compliant_options(endpoint, requirement.places))
    advice = tuple(o.advice for o in options[:3])
    if len(options) > 3:
        advice += (f"... and {len(options) - 3} more compliant options "
                   f"(residency-gate explain lists them)",)
    code = ReasonCode.UNKNOWN_PLACE if places is None else ReasonCode.OUTSIDE_REQUIREMENT
    what = wording.violation(regions, endpoint, base["host"], location, requirement)
    trace.append("place unknown: not provable" if places is None
                 else "places outside the requirement")
    no_route = ""
    if policy.on_violation == "reroute":
        try:
            route, why = plan_reroute(catalog, policy, endpoint, view, model, requirement.places,
                                      req.scheme, req.port, view.query, req.signed)
        except BodyError as e:
            route, why = None, str(e)
        if route is not None:
            return Decision(ReasonCode.REROUTED,
                            wording.rerouted(regions, requirement, what, route),
                            route=route, advice=advice, options=options, enforced=enforced,
                            trace=(*trace, f"reroute: {route.description}{mode}"), **common)
        code = ReasonCode.NO_COMPLIANT_ROUTE
        no_route = f" No reroute: {why}."
        trace.append(f"no reroute: {why}")
    return Decision(code, wording.blocked(regions, endpoint, requirement, what, no_route, advice),
                    advice=advice, options=options, enforced=enforced,
                    trace=(*trace, f"block{mode}"), **common)
