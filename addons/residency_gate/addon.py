"""The mitmproxy addon: intercept LLM hosts only, decide every request before it leaves.

A request's path, in hook order:
  tls_clienthello  -> intercept only catalog hosts (by CONNECT target or SNI); tunnel the rest
  requestheaders   -> note the start; refuse an LLM body declared over the size limit (413)
                      now, since a streamed body would leave before `request` runs
  request          -> destination checks (fronting), decision (large bodies off the event
                      loop), route applied, audit record durable, then act: forward (tag
                      header stripped), refuse in the provider's error shape, or reroute
  tcp_start        -> raw (non-HTTP) streams to an LLM host are killed, never relayed
  server_connect   -> connect where `resolve` says, SNI and certificate still on the host name
  responseheaders  -> stream the response, mark it with X-Residency-Decision
  response / error -> outcome record

mitmproxy logs and then ignores exceptions raised by addons, which would let a
flow through. Every hook here catches its own errors and refuses instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import connection, http, tcp, tls
from mitmproxy.proxy import server_hooks

from .engine import ALLOW, BLOCK, REROUTE, Decision, RequestInfo, decide
from .policy import Policy
from .reroute import Route, apply_body_fields
from .responses import refusal
from .sigv4 import is_signed, signed_headers

log = logging.getLogger("residency_gate")

META = "residency_gate"  # flow.metadata key holding a FlowState


class AuditSink(Protocol):
    healthy: bool

    async def append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class FlowState:
    """What we decided for one flow, for the response and outcome hooks."""

    started: float
    decision: Decision | None = None
    audit_id: str | None = None
    verdict: str = ALLOW
    routed_to: str | None = None


class Refused(Exception):
    """Refuse the request with this status and message (before or without a Decision)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


@dataclass
class Gate:
    """Shared, swappable state: the policy in force, the audit sink, counters."""

    policy: Policy
    audit: AuditSink
    metrics: Any = None
    background: set[asyncio.Task] = field(default_factory=set)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _hostname(authority: str | None) -> str:
    """Host part of a Host header / :authority, normalised; '' when absent."""
    if not authority:
        return ""
    authority = authority.strip()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0].lower()
    return authority.rsplit(":", 1)[0].rstrip(".").lower() if authority.count(":") == 1 \
        else authority.rstrip(".").lower()


INLINE_BODY_BYTES = 256 << 10  # larger request bodies are classified in a worker thread


@dataclass(frozen=True)
class Classified:
    req: RequestInfo
    decision: Decision
    digest: tuple[str, int]  # sha256 hex and length of the decoded body
    seconds: float


def classify(flow: http.HTTPFlow, policy: Policy, destination: str) -> Classified:
    """Decode the body, decide, digest the body. Pure CPU: safe in a worker thread
    (the flow is paused while its `request` hook awaits us)."""
    t0 = time.perf_counter()
    body_error = None
    try:
        body = flow.request.get_content(strict=True)
    except ValueError as e:
        body = flow.request.raw_content
        body_error = (f"body cannot be decoded (Content-Encoding: "
                      f"{flow.request.headers.get('content-encoding')}: {e})")
    req = RequestInfo(
        method=flow.request.method,
        scheme=flow.request.scheme,
        host=destination,
        port=flow.request.port,
        path=flow.request.path,
        tag_values=tuple(flow.request.headers.get_all(policy.config.header)),
        body=body,
        body_error=body_error,
        client_ip=flow.client_conn.peername[0] if flow.client_conn.peername else None,
        user=(flow.metadata.get("proxyauth") or (None,))[0],
        signed=is_signed(flow.request),
    )
    decision = decide(policy, req)
    digest = (hashlib.sha256(body or b"").hexdigest(), len(body or b""))
    return Classified(req, decision, digest, time.perf_counter() - t0)


def apply_route(flow: http.HTTPFlow, route: Route) -> None:
    """Send the request where the plan says; credentials come from the environment."""
    headers = flow.request.headers
    for name in route.remove_headers:
        headers.pop(name, None)
    for name, value in route.set_headers.items():
        if value.startswith("env:"):
            secret = os.environ.get(value[4:])
            if not secret:
                raise Refused(503, "reroute_key_missing",
                              f"The compliant endpoint {route.host} needs a key from environment "
                              f"variable {value[4:]}, which is not set on the proxy; refused.")
            value = secret if name != "authorization" else f"Bearer {secret}"
        headers[name] = value
    if route.body_fields:
        flow.request.content = apply_body_fields(flow.request.get_content(strict=True),
                                                 route.body_fields)
    flow.request.scheme = route.scheme
    flow.request.host = route.host
    flow.request.port = route.port
    flow.request.path = route.path
    default = 443 if route.scheme == "https" else 80
    flow.request.host_header = route.host if route.port == default else f"{route.host}:{route.port}"


class ResidencyGate:
    """Decides and enforces; see the module docstring for the order of hooks."""

    def __init__(self, gate: Gate | None = None) -> None:
        self.gate = gate
        self._resolved: dict[str, tuple] = {}  # server connection id -> name it was opened for

    # ------------------------------------------------------------------ connections

    def client_connected(self, client: connection.Client) -> None:
        if self.gate and self.gate.metrics:
            self.gate.metrics.open_connections.inc()

    def client_disconnected(self, client: connection.Client) -> None:
        if self.gate and self.gate.metrics:
            self.gate.metrics.open_connections.dec()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Intercept when the CONNECT target or the SNI is an LLM host; tunnel the rest."""
        try:
            catalog = self.gate.policy.catalog
            target = data.context.server.address[0] if data.context.server.address else ""
            sni = data.client_hello.sni or ""
            intercept = bool(catalog.match(target)) or bool(sni and catalog.match(sni))
        except Exception:
            log.exception("cannot classify TLS connection; intercepting it (fail closed)")
            intercept = True
        data.ignore_connection = not intercept
        if self.gate and self.gate.metrics:
            self.gate.metrics.flows.labels(kind="intercepted" if intercept else "tunnelled").inc()

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        """Non-HTTP bytes inside an intercepted LLM tunnel would be relayed undecided: kill."""
        try:
            catalog = self.gate.policy.catalog
            names = [flow.server_conn.address[0] if flow.server_conn.address else "",
                     flow.client_conn.sni or ""]
            if not any(n and catalog.match(n) for n in names):
                return
        except Exception:
            log.exception("cannot classify a raw TCP flow; killing it (fail closed)")
        log.warning("refused a non-HTTP stream to %s (only HTTP is decided on)",
                    flow.server_conn.address)
        flow.kill()

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """`resolve`: connect elsewhere, keep SNI and certificate checks on the name."""
        if not self.gate or not data.server.address:
            return
        host, port = data.server.address[0], data.server.address[1]
        resolve = self.gate.policy.config.resolve
        target = resolve.get(f"{host.lower()}:{port}") or resolve.get(host.lower().rstrip("."))
        if target:
            if data.server.sni is None and not _is_ip(host):
                data.server.sni = host
            self._resolved[data.server.id] = data.server.address
            data.server.address = target

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Give a resolved connection its name back: mitmproxy reuses upstream connections
        by address, and caps them at 5 per address, so a connection left under the IP is
        never reused and a keep-alive client stalls on its 6th request."""
        original = self._resolved.pop(data.server.id, None)
        if original is not None:
            # mitmproxy refuses address changes on open connections (to keep reuse honest);
            # the name this connection was opened for is the honest key, so set it directly.
            object.__setattr__(data.server, "address", original)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._resolved.pop(data.server.id, None)

    # ------------------------------------------------------------------ requests

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse declared-oversized LLM bodies now: a streamed body would be forwarded
        before the `request` hook runs, so it must never be streamed to an LLM host."""
        state = FlowState(started=time.monotonic())
        flow.metadata[META] = state
        try:
            limit = self.gate.policy.config.request_body_bytes
            length = int(flow.request.headers.get("content-length", "0") or 0)
            if length <= limit:
                return
            if await self._destination(flow, self.gate.policy) is None:
                flow.request.stream = True  # not an LLM API: pass it through unbuffered
                return
            raise self._too_large(limit)
        except Refused as r:
            await self._refuse_without_decision(flow, state, r)
        except ValueError:
            r = Refused(400, "bad_request", "Invalid Content-Length header; refused.")
            await self._refuse_without_decision(flow, state, r)
        except Exception as e:  # fail closed
            log.exception("internal error in requestheaders")
            r = Refused(500, "internal_error", f"residency-gate could not check this request "
                        f"({type(e).__name__}) and refused it; nothing was forwarded.")
            await self._refuse_without_decision(flow, state, r)

    @staticmethod
    def _too_large(limit: int) -> Refused:
        return Refused(413, "body_too_large",
                       f"Request body larger than {limit} bytes (limits.request_body_bytes); "
                       "residency-gate cannot classify it and refused it. Nothing was forwarded.")

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return  # answered by another addon (proxyauth's 407) or gone
        state = flow.metadata.setdefault(META, FlowState(started=time.monotonic()))
        timeout = self.gate.policy.config.decision_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._decide_and_act(flow, state)
        except Refused as r:
            await self._refuse_without_decision(flow, state, r)
        except TimeoutError:  # a stuck audit write, most likely: refuse, never forward
            log.critical("no decision within %.1fs for %s %s (audit trail stuck?); refused",
                         timeout, flow.request.method, flow.request.pretty_url)
            r = Refused(503, "decision_timeout",
                        f"residency-gate could not decide on and record this request within "
                        f"{timeout:g}s (limits.decision_timeout_seconds) and refused it; "
                        "nothing was forwarded.")
            await self._refuse_without_decision(flow, state, r)
        except Exception as e:  # fail closed: anything unexpected refuses the request
            log.exception("internal error deciding %s %s", flow.request.method,
                          flow.request.pretty_url)
            r = Refused(500, "internal_error",
                        "residency-gate could not decide on this request "
                        f"({type(e).__name__}) and refused it; nothing was forwarded.")
            await self._refuse_without_decision(flow, state, r)

    async def _decide_and_act(self, flow: http.HTTPFlow, state: FlowState) -> None:
        policy = self.gate.policy
        destination = await self._destination(flow, policy)
        if destination is None:
            return  # not an LLM API: untouched
        raw = flow.request.raw_content or b""
        if len(raw) > policy.config.request_body_bytes:  # chunked: no Content-Length up front
            raise self._too_large(policy.config.request_body_bytes)
        if len(raw) <= INLINE_BODY_BYTES:
            c = classify(flow, policy, destination)
        else:  # decompressing, parsing and hashing megabytes: not on the event loop
            c = await asyncio.get_running_loop().run_in_executor(
                None, classify, flow, policy, destination)
        decision = c.decision
        if self.gate.metrics:
            self.gate.metrics.decision_seconds.observe(c.seconds)
        state.decision = decision
        if decision.verdict != BLOCK:
            self._strip_tag(flow, policy.config.header)
        if decision.verdict == REROUTE:
            apply_route(flow, decision.route)  # may refuse (no key): then no reroute record
            state.routed_to = decision.route.host
        # Nothing leaves, and no answer is given, before the record is durable.
        record = await self._audit("decision", self._record(flow, c.req, decision, c.digest))
        state.audit_id = record.get("id")
        state.verdict = decision.verdict
        self._count(decision)
        if decision.verdict == BLOCK:
            flow.response = refusal(decision.api, decision.status, decision.code,
                                    decision.reason, state.audit_id)

    async def _destination(self, flow: http.HTTPFlow, policy: Policy) -> str | None:
        """The LLM host this request really goes to, or None for non-LLM traffic.

        The connection goes to flow.request.host (the CONNECT target, or the original
        destination in transparent mode). A Host header or SNI naming another host is
        domain fronting: refused, never followed.
        """
        catalog = policy.catalog
        target = flow.request.host.rstrip(".").lower()
        named = {n for n in (_hostname(flow.request.host_header),
                             (flow.client_conn.sni or "").rstrip(".").lower()) if n}
        if _is_ip(target):
            # Transparent mode: the name must resolve to the address we connect to.
            llm_names = {n for n in named if catalog.match(n)}
            if not llm_names:
                return None
            if len(named) > 1:
                raise Refused(421, "misdirected",
                              f"Host header and TLS SNI disagree ({', '.join(sorted(named))}).")
            name = llm_names.pop()
            if not await self._resolves_to(name, target, policy):
                raise Refused(421, "misdirected",
                              f"{name} does not resolve to {target}, the address this "
                              "connection goes to; refused (domain fronting).")
            return name
        others = named - {target}
        if catalog.match(target) is None:
            if any(catalog.match(n) for n in others):
                raise Refused(421, "misdirected",
                              f"Request names {', '.join(sorted(others))} but goes to {target}; "
                              "refused (domain fronting).")
            return None
        if others:
            raise Refused(421, "misdirected",
                          f"Request goes to {target} but names {', '.join(sorted(others))} in "
                          "its Host header or TLS SNI; refused (domain fronting). Send it to the "
                          "host you mean, through the proxy.")
        return target

    async def _resolves_to(self, name: str, address: str, policy: Policy) -> bool:
        resolve = policy.config.resolve.get(name)
        if resolve is not None:
            return resolve[0] == address
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None)
        except OSError:
            return False
        return any(info[4][0] == address for info in infos)

    @staticmethod
    def _strip_tag(flow: http.HTTPFlow, header: str) -> None:
        """The tag is ours, not the provider's, unless the request's signature covers it."""
        if header not in flow.request.headers:
            return
        if header.lower() in signed_headers(flow.request):
            return
        del flow.request.headers[header]

    # ------------------------------------------------------------------ audit

    def _record(self, flow: http.HTTPFlow, req: RequestInfo | None, decision: Decision | None,
                digest: tuple[str, int] | None) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "client": req.client_ip if req else (
                flow.client_conn.peername[0] if flow.client_conn.peername else None),
            "user": req.user if req else None,
            "method": flow.request.method,
            "tags": list(req.tag_values) if req else [],
            "body_sha256": digest[0] if digest else None,
            "body_bytes": digest[1] if digest else None,
        }
        if decision is not None:
            fields.update(decision.summary(self.gate.policy))
        return fields

    async def _audit(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        audit = self.gate.audit
        if not audit.healthy:
            raise Refused(503, "audit_unavailable",
                          "The residency audit trail cannot be written; residency-gate refuses "
                          "LLM traffic until an operator repairs it. Nothing was forwarded.")
        t0 = time.perf_counter()
        try:
            record = await audit.append(kind, fields)
        except Exception as e:
            if self.gate.metrics:
                self.gate.metrics.audit_failures.inc()
            log.critical("audit write failed: %s", e)
            raise Refused(503, "audit_unavailable",
                          "The residency audit trail cannot be written; the request was "
                          "refused and nothing was forwarded.") from e
        if self.gate.metrics:
            self.gate.metrics.audit_write_seconds.observe(time.perf_counter() - t0)
            self.gate.metrics.audit_records.inc()
        return record

    async def _refuse_without_decision(self, flow: http.HTTPFlow, state: FlowState,
                                       r: Refused) -> None:
        """Refuse, and audit the refusal when the audit trail still works."""
        state.verdict = BLOCK
        api = state.decision.api if state.decision else self._api_of(flow)
        fields = self._record(flow, None, state.decision, None)
        fields.update({"decision": BLOCK, "status": r.status, "code": r.code,
                       "reason": r.message, "url": flow.request.pretty_url.split("?", 1)[0],
                       "host": flow.request.host})
        if r.code != "audit_unavailable":
            try:  # bounded: a refusal must reach the client even if the audit is stuck
                async with asyncio.timeout(self.gate.policy.config.decision_timeout):
                    record = await self.gate.audit.append("decision", fields)
                state.audit_id = record.get("id")
            except Exception as e:
                log.critical("cannot audit a refusal (%s): %s", r.code, e or type(e).__name__)
        if self.gate.metrics:
            self.gate.metrics.decisions.labels(provider=fields.get("provider") or "-",
                                               decision=BLOCK, reason=r.code).inc()
        flow.response = refusal(api, r.status, r.code, r.message, state.audit_id)

    def _api_of(self, flow: http.HTTPFlow) -> str:
        try:
            match = self.gate.policy.catalog.match(flow.request.host)
            return match[0].provider.api if match else "openai"
        except Exception:
            return "openai"

    def _count(self, decision: Decision) -> None:
        if self.gate.metrics:
            self.gate.metrics.decisions.labels(provider=decision.provider or "-",
                                               decision=decision.verdict,
                                               reason=decision.code).inc()

    # ------------------------------------------------------------------ responses

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.decision is None:
            return
        # Never buffer LLM responses: SSE and large bodies go through as they arrive.
        flow.response.stream = True
        flow.response.headers["X-Residency-Decision"] = state.verdict
        if state.audit_id:
            flow.response.headers["X-Residency-Audit-Id"] = state.audit_id
        if state.routed_to:
            flow.response.headers["X-Residency-Routed-To"] = state.routed_to

    def response(self, flow: http.HTTPFlow) -> None:
        self._outcome(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._outcome(flow)

    def _outcome(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(META)
        if state is None or state.audit_id is None or self.gate is None:
            return
        fields = {
            "decision_id": state.audit_id,
            "status": flow.response.status_code if flow.response else None,
            "bytes_in": len(flow.request.raw_content or b""),
            "bytes_out": (len(flow.response.raw_content or b"")
                          if flow.response and not flow.response.stream else None),
            "duration_ms": int((time.monotonic() - state.started) * 1000),
            "error": flow.error.msg if flow.error else None,
        }
        state.audit_id = None  # one outcome per decision
        if not self.gate.audit.healthy:
            return
        task = asyncio.get_running_loop().create_task(self._write_outcome(fields))
        self.gate.background.add(task)
        task.add_done_callback(self.gate.background.discard)

    async def _write_outcome(self, fields: dict[str, Any]) -> None:
        try:
            await self.gate.audit.append("outcome", fields)
            if self.gate.metrics:
                self.gate.metrics.audit_records.inc()
        except Exception as e:
            log.critical("cannot write outcome record: %s", e)
