"""The mitmproxy addon: decide every LLM request before anything leaves.

A request's path, in hook order (connection hooks live in `connections.py`):
  requestheaders   -> an LLM body declared over the size limit is refused now: a
                      streamed body would leave before `request` runs
  request          -> destination checks (fronting; an IP-literal CONNECT target is
                      decided by the name its Host header gives, and then connected to by
                      that name) -> decision (path normalised, body read strictly; large
                      bodies off the event loop) -> `_answer`: route applied, record
                      durable, metric, then forward exactly what was decided on (the
                      normalised path, tag header stripped), refuse, or reroute
  responseheaders  -> stream the response, mark it with X-Residency-Decision
  response / error -> outcome record; a provider that did not answer (connect, TLS,
                      timeout, reset: `limits.py` times it) gets the client a 502/504 in
                      the provider's own shape instead of mitmproxy's page (`upstream.py`)

mitmproxy logs and then ignores exceptions raised by addons, which would let a
flow through. Both request hooks run inside `_guard`, which turns any error or
timeout into a refusal; a refusal is a Decision like any other and goes out
through `_answer`, the one path that records, counts and responds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from ..audit.record import BodyDigest, decision_fields, outcome_fields
from ..catalog.bundle import Bundle
from ..core import admission, wording
from ..core.decision import BLOCK, REROUTE, Decision, ReasonCode, refuse
from ..core.request import Request
from . import decoding, upstream
from .connections import Access, Interception, Resolve
from .flows import (
    MissingKey,
    apply_route,
    connect_by_name,
    destination_of,
    read_body,
    request_of,
    strip_tag,
)
from .interface import Gate
from .inventory import Inventory
from .limits import ConnectionLimits
from .refusals import BlockPage, refusal, wants_page

log = logging.getLogger("residency_gate")

META = "residency_gate"  # flow.metadata key holding a FlowState
# larger request bodies, and every compressed one (200 KB of gzip may be 20 MB of JSON),
# are classified in a worker thread
INLINE_BODY_BYTES = 256 << 10


@dataclass
class FlowState:
    """What we decided for one flow, for the response and outcome hooks."""

    started: float
    request: Request | None = None
    decision: Decision | None = None
    audit_id: str | None = None
    answered: bool = False  # the proxy answered this request itself


class AuditFailed(Exception):
    """The audit trail could not take a record that must be durable first."""


@dataclass(frozen=True)
class Classified:
    request: Request
    decision: Decision
    digest: BodyDigest | None
    seconds: float


def classify(flow: http.HTTPFlow, bundle: Bundle, host: str) -> Classified:
    """Decode the body, decide, digest the body. Pure CPU: safe in a worker thread
    (the flow is paused while its `request` hook awaits us)."""
    t0 = time.perf_counter()
    try:
        body, error, digest = read_body(flow, bundle.config.limits)
    except decoding.TooLarge as e:  # a compression bomb: refused, never held in memory
        req = request_of(flow, host, bundle.policy.header)
        refused = refuse(ReasonCode.BODY_TOO_LARGE, wording.decodes_too_large(e.limit, e.key),
                         host=host, url=req.url, api=bundle.catalog.api_of(host))
        return Classified(req, refused, None, time.perf_counter() - t0)
    req = request_of(flow, host, bundle.policy.header, body, error)
    return Classified(req, bundle.decide(req), digest, time.perf_counter() - t0)


def block_page(flow: http.HTTPFlow, bundle: Bundle, decision: Decision) -> BlockPage | None:
    """The HTML page for a person's browser; None: the API's own error shape."""
    if not wants_page(flow.request.headers.get("accept"), decision):
        return None
    return BlockPage(bundle.config.block_page_contact, bundle.config.block_page_instead)


class ResidencyGate:
    """Decides and enforces; see the module docstring for the order of hooks."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.gate = gate
        self.interception = Interception(self)
        # mitmproxy loads nested addons, after its own; ConnectionLimits comes last: it
        # wraps the layers that next_layer (mitmproxy's, Interception's, Inventory's) picked
        self.addons = [Access(self), self.interception, Resolve(self), Inventory(self),
                       ConnectionLimits(self)]

    # ------------------------------------------------------------------ requests

    # Both request hooks are plain functions that return a coroutine only when there is
    # something to wait for: mitmproxy awaits what a hook returns, and most requests
    # (a body within the limit, in requestheaders) need no coroutine at all.

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response or flow.error or not flow.live:
            return None  # answered by another addon (proxyauth's 407) or gone
        state = FlowState(started=time.monotonic())
        flow.metadata[META] = state
        declared = flow.request.headers.get("content-length")
        if declared is None or (declared.isdigit()
                                and int(declared) <= self.gate.bundle.config.request_body_bytes):
            return None  # nothing to refuse before the body arrives
        return self._guard(flow, state, self._check_declared_size(flow, state))

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = flow.metadata.get(META)
        if state is None:
            state = flow.metadata[META] = FlowState(started=time.monotonic())
        if flow.response or flow.error or not flow.live or state.answered:
            return None
        return self._guard(flow, state, self._decide_and_answer(flow, state))

    async def _guard(self, flow: http.HTTPFlow, state: FlowState, work: Any) -> None:
        """Fail closed: any error or timeout refuses the request; nothing is forwarded."""
        bundle = self.gate.bundle
        timeout = bundle.config.decision_timeout
        try:
            async with asyncio.timeout(timeout):
                await work
        except AuditFailed:
            await self._refuse(flow, state, bundle, ReasonCode.AUDIT_UNAVAILABLE,
                               wording.audit_unavailable(), record=False)
        except TimeoutError:  # a stuck audit write, most likely
            log.critical("no decision within %.1fs for %s %s (audit trail stuck?); refused",
                         timeout, flow.request.method, flow.request.pretty_url)
            await self._refuse(flow, state, bundle, ReasonCode.DECISION_TIMEOUT,
                               wording.decision_timeout(timeout))
        except Exception as e:
            log.exception("internal error deciding %s %s", flow.request.method,
                          flow.request.pretty_url)
            await self._refuse(flow, state, bundle, ReasonCode.INTERNAL_ERROR,
                               wording.internal_error(type(e).__name__))

    async def _check_declared_size(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """A body over the limit must never be streamed to an LLM host: refuse it before
        it is read; a large body to any other host passes through unbuffered."""
        bundle = self.gate.bundle
        limit = bundle.config.request_body_bytes
        declared = flow.request.headers.get("content-length")
        host = await self._destination(flow, bundle)
        if host is None:
            flow.request.stream = True
            return
        if isinstance(host, Decision):
            await self._answer(flow, state, bundle, host)
            return
        refused = admission.declared_size(declared, limit, host, flow.request.pretty_url,
                                          bundle.catalog)
        if refused is not None:
            state.request = request_of(flow, host, bundle.policy.header)
            await self._answer(flow, state, bundle, refused)

    async def _decide_and_answer(self, flow: http.HTTPFlow, state: FlowState) -> None:
        bundle = self.gate.bundle  # one bundle per request, even across a reload
        host = await self._destination(flow, bundle)
        if host is None:
            return  # not an LLM API: untouched
        if isinstance(host, Decision):
            await self._answer(flow, state, bundle, host)
            return
        connect_by_name(flow, host)
        raw = flow.request.raw_content or b""
        limit = bundle.config.request_body_bytes
        if len(raw) > limit:  # chunked: no Content-Length up front
            state.request = request_of(flow, host, bundle.policy.header)
            await self._answer(flow, state, bundle, admission.too_large(
                limit, host, flow.request.pretty_url, bundle.catalog))
            return
        if len(raw) <= INLINE_BODY_BYTES and not flow.request.headers.get("content-encoding"):
            c = classify(flow, bundle, host)
        else:  # decompressing, parsing and hashing megabytes: not on the event loop
            c = await asyncio.get_running_loop().run_in_executor(
                None, classify, flow, bundle, host)
        if self.gate.metrics:
            self.gate.metrics.decision_seconds.observe(c.seconds)
        state.request = c.request
        await self._answer(flow, state, bundle, c.decision, c.digest)

    async def _destination(self, flow: http.HTTPFlow, bundle: Bundle) -> str | Decision | None:
        """The LLM host this request really goes to, None for other traffic, or a refusal."""
        dest = destination_of(flow)
        if flow.client_conn.id in self.interception.refused:
            return admission.ip_literal_refused(bundle.catalog, dest)
        name = admission.name_to_verify(bundle.catalog, dest)
        resolves = await self._resolves_to(name, dest.target, bundle) if name else None
        return admission.destination(bundle.catalog, dest, resolves)

    async def _resolves_to(self, name: str, address: str, bundle: Bundle) -> bool:
        """Transparent mode: does `name` resolve to the address the client connected to?"""
        resolve = bundle.config.resolve.get(name)
        if resolve is not None:
            return resolve[0] == address
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None)
        except OSError:
            return False
        addresses = [info[4][0] for info in infos]
        self.interception.llm_addresses.learn(addresses)  # they serve an LLM host (ECH)
        return address in addresses

    # ------------------------------------------------------------------ the one answer path

    async def _answer(self, flow: http.HTTPFlow, state: FlowState, bundle: Bundle,
                      decision: Decision, digest: BodyDigest | None = None,
                      record: bool = True, must_record: bool = True) -> None:
        """Apply the decision, make its record durable, count it, then act on it.

        Nothing leaves, and no answer is given, before the record is durable. A refusal
        made because something else failed (`must_record=False`) is still answered when
        its record cannot be written."""
        header = bundle.policy.header
        if decision.target is not None and (decision.verdict != BLOCK or not decision.enforced):
            flow.request.path = decision.target  # the normalised path it was decided on
        if decision.verdict == REROUTE and decision.enforced:  # (a route sets its own path)
            try:
                apply_route(flow, decision.route)
            except MissingKey as e:
                decision = refuse(ReasonCode.NO_COMPLIANT_ROUTE,
                                  f"No reroute: {e}; refused. {wording.NOTHING_FORWARDED}",
                                  host=decision.host, url=decision.url, api=decision.api,
                                  endpoint=decision.endpoint, model=decision.model,
                                  requirement=decision.requirement)
        forward = decision.verdict != BLOCK or not decision.enforced  # report mode forwards
        if forward:
            strip_tag(flow, header, state.request.signed if state.request else None)
        state.decision = decision
        if record:
            req = state.request or request_of(flow, decision.host, header)
            fields = decision_fields(decision, req, bundle.regions, bundle.revisions, digest)
            state.audit_id = await self._record(fields, must_record)
        self._count(decision)
        if not forward:
            state.answered = True
            flow.response = refusal(decision, state.audit_id, block_page(flow, bundle, decision))

    async def _refuse(self, flow: http.HTTPFlow, state: FlowState, bundle: Bundle,
                      code: ReasonCode, reason: str, record: bool = True) -> None:
        """Refuse after a failure; the record is attempted within a bounded time."""
        known = state.decision
        host = known.host if known else flow.request.host
        same = ({"endpoint": known.endpoint, "model": known.model,
                 "requirement": known.requirement} if known else {})
        decision = refuse(code, reason, host=host, url=flow.request.pretty_url.split("?", 1)[0],
                          api=known.api if known else bundle.catalog.api_of(host), **same)
        try:
            async with asyncio.timeout(bundle.config.decision_timeout):
                await self._answer(flow, state, bundle, decision, record=record,
                                   must_record=False)
        except TimeoutError:
            log.critical("cannot audit a refusal (%s) in time", code)
            state.answered = True
            flow.response = refusal(decision, None, block_page(flow, bundle, decision))

    async def _record(self, fields: dict[str, Any], must_record: bool) -> str | None:
        audit = self.gate.audit
        metrics = self.gate.metrics
        try:
            if not audit.healthy:
                raise AuditFailed("audit writer unhealthy")
            t0 = time.perf_counter()
            record = await audit.append("decision", fields)
        except Exception as e:
            if metrics:
                metrics.audit_failures.inc()
            if must_record:
                log.critical("audit write failed: %s", e)
                raise AuditFailed(str(e)) from e
            log.critical("cannot audit a refusal: %s", e or type(e).__name__)
            return None
        if metrics:
            metrics.audit_write_seconds.observe(time.perf_counter() - t0)
            metrics.audit_records.inc()
        return record.get("id")

    def _count(self, decision: Decision) -> None:
        metrics = self.gate.metrics
        if metrics:  # a violation in report mode was not enforced: counted apart
            counter = metrics.decisions if decision.enforced else metrics.reported
            counter.labels(provider=decision.provider or "-", decision=decision.verdict,
                           reason=str(decision.code)).inc()

    # ------------------------------------------------------------------ responses

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.decision is None or state.answered:
            return
        # Never buffer LLM responses: SSE and large bodies go through as they arrive.
        flow.response.stream = True
        decision = state.decision
        flow.response.headers["X-Residency-Decision"] = decision.disposition
        if not decision.enforced:  # report mode: what enforcing would have done, and why
            flow.response.headers["X-Residency-Reason"] = str(decision.code)
        if state.audit_id:
            flow.response.headers["X-Residency-Audit-Id"] = state.audit_id
        if decision.route is not None and decision.verdict == REROUTE and decision.enforced:
            flow.response.headers["X-Residency-Routed-To"] = decision.route.host

    def response(self, flow: http.HTTPFlow) -> None:
        self._outcome(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        kind = upstream.error_kind(flow)
        state: FlowState | None = flow.metadata.get(META)
        if (state is not None and state.decision is not None and not state.answered
                and flow.response is None and kind in upstream.PROVIDER_KINDS):
            flow.metadata[upstream.ANSWER] = self._provider_failed(flow, state, kind)
        self._outcome(flow, kind)

    def _provider_failed(self, flow: http.HTTPFlow, state: FlowState, kind: str
                         ) -> http.Response:
        """The answer for a forwarded request the provider did not answer: 504 or 502 in
        the provider's error shape, with the audit id of the decision that forwarded it."""
        failure = upstream.failure_of(flow)
        host = flow.request.host  # where it went (the route's host after a reroute)
        known = state.decision
        if failure is not None and failure.kind == "timeout":
            code, reason = ReasonCode.UPSTREAM_TIMEOUT, wording.upstream_timeout(
                host, failure.limit, failure.seconds)
        else:
            code, reason = ReasonCode.UPSTREAM_FAILED, wording.upstream_failed(host, kind)
        if self.gate is not None and self.gate.metrics:
            self.gate.metrics.upstream_errors.labels(provider=known.provider or "-",
                                                     kind=kind).inc()
        log.warning("no answer from %s for %s (%s): %s", host, state.audit_id, kind,
                    flow.error.msg if flow.error else "")
        return refusal(refuse(code, reason, host=host, url=known.url, api=known.api,
                              endpoint=known.endpoint, model=known.model,
                              requirement=known.requirement), state.audit_id)

    def _outcome(self, flow: http.HTTPFlow, error_kind: str | None = None) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.audit_id is None or self.gate is None:
            return
        answer = flow.response or flow.metadata.get(upstream.ANSWER)  # what the client got
        fields = outcome_fields(
            state.audit_id, answer.status_code if answer else None,
            len(flow.request.raw_content or b""),
            len(flow.response.raw_content or b"")
            if flow.response and not flow.response.stream else None,
            int((time.monotonic() - state.started) * 1000),
            flow.error.msg if flow.error else None, error_kind)
        state.audit_id = None  # one outcome per decision
        if not self.gate.audit.healthy:
            return
        try:  # a future, not a task per request: nobody waits for an outcome
            written = self.gate.audit.append_nowait("outcome", fields)
        except Exception as e:
            log.critical("cannot write outcome record: %s", e)
            return
        written.add_done_callback(self._outcome_written)

    def _outcome_written(self, written: asyncio.Future) -> None:
        if written.cancelled():
            log.critical("outcome record not written: the writer was closed")
        elif (e := written.exception()) is not None:
            log.critical("cannot write outcome record: %s", e)
        elif self.gate is not None and self.gate.metrics:
            self.gate.metrics.audit_records.inc()
