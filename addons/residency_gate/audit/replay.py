"""What-if: re-decide recorded requests under a candidate config and catalog.

A decision record carries every input the decision read except the body's bytes
(method, URL, tags, client, user, whether it was signed, and `inputs.reads`: the
body and query values locators and extractors read, and the body's JSON type).
`request_of_record` rebuilds a request that reads the same, `replay` decides it
under the candidate and compares what would happen to the traffic:

  newly_blocked       forwarded before, refused now
  newly_allowed       refused before, forwarded now
  rerouted            forwarded both times, to another destination
  newly_reported      forwarded to the same place, now a reported violation
  no_longer_reported  forwarded to the same place, no longer a reported violation
  reason_changed      the same outcome for another reason code

A replay under the config that recorded the run reproduces every record field
for field (`exact`). A value the candidate reads that the recorded decision never
read is unknown: such results are listed as `uncertain`.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from ..catalog.bundle import Bundle
from ..core import admission
from ..core.decision import BLOCK, REROUTE, ReasonCode
from ..core.request import Request
from .inventory import client_network
from .record import decision_fields

# Refusals reached before the comparison, from facts a record does not hold (names in the
# TLS handshake, declared sizes, the proxy's own health): kept as recorded.
NOT_REDECIDED = frozenset({ReasonCode.MISDIRECTED, ReasonCode.BAD_REQUEST,
                           ReasonCode.BODY_TOO_LARGE, ReasonCode.INTERNAL_ERROR,
                           ReasonCode.AUDIT_UNAVAILABLE, ReasonCode.DECISION_TIMEOUT})
# Fields that name the run rather than the decision.
NOT_COMPARED = ("revisions", "body_sha256", "body_bytes")
CHANGES = ("newly_blocked", "newly_allowed", "rerouted", "newly_reported",
           "no_longer_reported", "reason_changed")
_JSON_OF_TYPE = {"array": b"[]", "string": b'""', "number": b"0", "boolean": b"false",
                 "null": b"null", "empty": b""}
_CONTAINER = {"<dict>": {}, "<list>": []}


def request_of_record(rec: dict[str, Any]) -> Request:
    """The request a decision record describes, reading as the recorded one did."""
    url = urlsplit(rec["url"])
    inputs = rec.get("inputs") or {}
    reads = inputs.get("reads") or {}
    query = urlencode([(k[6:], v) for k, v in reads.items()
                       if k.startswith("query:") and v is not None])
    path = inputs.get("path") or url.path or "/"
    body, body_error = _body_of(reads)
    return Request(method=rec.get("method") or "POST", scheme=url.scheme,
                   host=url.hostname or rec.get("host") or "",
                   port=url.port or (443 if url.scheme == "https" else 80),
                   path=path + (f"?{query}" if query else ""),
                   tag_values=tuple(rec.get("tags") or ()), body=body,
                   client_ip=rec.get("client"), user=rec.get("user"),
                   signed=bool(inputs.get("signed")), body_error=body_error)


def _body_of(reads: dict[str, Any]) -> tuple[bytes | None, str | None]:
    kind = reads.get("body")
    if kind is None:
        return None, None  # the decision never read the body
    if kind == "unreadable":
        return b"?", str(reads.get("body_error") or "request body cannot be read")
    if kind != "object":
        return _JSON_OF_TYPE.get(kind, b""), None
    doc: dict[str, Any] = {}
    for key, value in reads.items():
        if not key.startswith("body:") or value is None:
            continue
        *parents, last = key[5:].split(".")
        target = doc
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            target[last] = _CONTAINER.get(value, value) if isinstance(value, str) else value
    return json.dumps(doc).encode(), None


@dataclass(frozen=True)
class Outcome:
    """What happens to the traffic: refused, or forwarded to a destination."""

    decision: str
    enforced: bool
    code: str
    target: str | None  # the URL forwarded to; None: refused

    @classmethod
    def of(cls, fields: dict[str, Any]) -> Outcome:
        enforced = fields.get("enforced", True) is not False
        decision = fields.get("decision") or BLOCK
        if decision == BLOCK and enforced:
            target = None
        elif decision == REROUTE and enforced:
            target = fields.get("routed_url") or fields.get("url")
        else:
            target = fields.get("url")
        return cls(decision, enforced, str(fields.get("code")), target)

    @property
    def reported(self) -> bool:
        return not self.enforced

    def label(self) -> str:
        if self.target is None:
            return f"block ({self.code})"
        if not self.enforced:
            return f"report ({self.decision}: {self.code})"
        return self.decision + (f" to {self.target}" if self.decision == REROUTE else "")


def change_of(before: Outcome, after: Outcome) -> str | None:
    if (before.target is None) != (after.target is None):
        return "newly_blocked" if after.target is None else "newly_allowed"
    if before.target != after.target:
        return "rerouted"
    if before.reported != after.reported:
        return "newly_reported" if after.reported else "no_longer_reported"
    if before.code != after.code:
        return "reason_changed"
    return None


@dataclass
class Replayed:
    record: dict[str, Any]
    before: Outcome
    after: Outcome
    change: str | None
    exact: bool
    fields: dict[str, Any]  # the decision record the candidate would write
    uncertain: tuple[str, ...] = ()
    redecided: bool = True


@dataclass
class ReplayReport:
    candidate: dict[str, Any]
    recorded_revisions: list[dict[str, str]] = field(default_factory=list)
    results: list[Replayed] = field(default_factory=list)
    networks: tuple = ()  # the candidate's client networks: how changes are grouped

    @property
    def changed(self) -> list[Replayed]:
        return [r for r in self.results if r.change]

    def totals(self) -> dict[str, int]:
        counts = Counter(r.change for r in self.results if r.change)
        return {k: counts.get(k, 0) for k in CHANGES}

    def by(self, dimension: str) -> dict[str, dict[str, int]]:
        """Changes per client network, user, provider or (new) reason code."""
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.changed:
            out[_dimension(r, dimension, self.networks)][r.change] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        changed = self.changed
        return {
            "candidate": self.candidate,
            "recorded_revisions": self.recorded_revisions,
            "decisions": len(self.results),
            "redecided": sum(r.redecided for r in self.results),
            "exact": sum(r.exact for r in self.results),
            "uncertain": sum(bool(r.uncertain) for r in self.results),
            "totals": self.totals(),
            "by": {d: self.by(d) for d in ("network", "user", "provider", "reason")},
            "changes": [_change_dict(r) for r in changed[:limit]],
            "changes_omitted": max(0, len(changed) - limit) if limit is not None else 0,
        }


def _dimension(r: Replayed, dimension: str, networks: tuple) -> str:
    rec = r.record
    if dimension == "network":
        return client_network(rec.get("client"), networks)
    if dimension == "user":
        return rec.get("user") or "-"
    if dimension == "provider":
        return rec.get("provider") or r.fields.get("provider") or "-"
    return r.after.code


def _change_dict(r: Replayed) -> dict[str, Any]:
    rec = r.record
    return {"id": rec.get("id"), "ts": rec.get("ts"), "client": rec.get("client"),
            "user": rec.get("user"), "method": rec.get("method"), "url": rec.get("url"),
            "provider": rec.get("provider"), "model": rec.get("model"), "change": r.change,
            "before": r.before.label(), "after": r.after.label(),
            "reason": r.fields.get("reason"), "uncertain": list(r.uncertain)}


def assume_keys_present(bundle: Bundle) -> Bundle:
    """The proxy's environment is not the replaying shell's: a replay assumes every key
    variable the candidate names is set, as on a proxy that can reroute."""
    policy = bundle.policy
    policy.env_present = frozenset({*policy.azure_keys.values(), *policy.reroute_keys.values(),
                                    *(p.api_key_env for p in policy.private if p.api_key_env)})
    policy._advice_cache.clear()
    return bundle


def replay(records: Iterable[tuple[str, int, dict[str, Any]]], bundle: Bundle) -> ReplayReport:
    """Re-decide every decision record under `bundle` (streaming over `records`)."""
    report = ReplayReport({"config": str(bundle.config.path or "<defaults>"),
                           "revisions": bundle.revisions},
                          networks=tuple(r.network for r in bundle.config.clients
                                         if r.network is not None))
    seen_revisions: list[dict[str, str]] = []
    for _file, _line, rec in records:
        if rec.get("kind") != "decision" or not isinstance(rec.get("url"), str):
            continue
        revisions = rec.get("revisions")
        if isinstance(revisions, dict) and revisions not in seen_revisions:
            seen_revisions.append(revisions)
        report.results.append(replay_one(rec, bundle))
    report.recorded_revisions = seen_revisions
    return report


def replay_one(rec: dict[str, Any], bundle: Bundle) -> Replayed:
    before = Outcome.of(rec)
    try:
        code = ReasonCode(rec.get("code"))
    except ValueError:
        code = None
    if code is None or code in NOT_REDECIDED:
        return Replayed(rec, before, before, None, True, rec, redecided=False)
    req = request_of_record(rec)
    limit = bundle.config.request_body_bytes
    if isinstance(rec.get("body_bytes"), int) and rec["body_bytes"] > limit:
        decision = admission.too_large(limit, req.host, rec["url"], bundle.catalog)
    else:
        decision = bundle.decide(req)
    fields = decision_fields(decision, req, bundle.regions, bundle.revisions)
    if not decision.is_llm:
        fields.update(decision="allow", code=str(decision.code), enforced=True)
    after = Outcome.of(fields)
    exact = all(fields.get(k) == rec.get(k) for k in fields if k not in NOT_COMPARED)
    recorded = (rec.get("inputs") or {}).get("reads") or {}
    uncertain = tuple(sorted(k for k in decision.reads if k not in recorded
                             and _unknown_before(k, recorded)))
    return Replayed(rec, before, after, change_of(before, after), exact, fields, uncertain)


def _unknown_before(key: str, recorded: dict[str, Any]) -> bool:
    """Was this value unknown to the recording? A body field of a body that was not an
    object reads None either way; anything else not read then is unknown."""
    if key.startswith("body:") or key == "body":
        return recorded.get("body") in (None, "object")
    return key != "body_error"


def render_html(report: ReplayReport, sources: list[str], limit: int = 1000) -> str:
    """The what-if page: totals first, then where the changes fall, then each change."""
    from .html import esc, kpis, page, table, tag

    data = report.to_dict(limit)
    totals = data["totals"]
    changed = sum(totals.values())
    verdict = ("No change: every recorded request would be decided the same way."
               if not changed else f"{changed} of {data['decisions']} recorded requests "
               "would be treated differently.")
    body = [f'<div class="card verdict {"ok" if not changed else "warn"}">'
            f"<h1>What-if: {esc(report.candidate['config'])}</h1><p><b>{esc(verdict)}</b></p>"
            f'<p class="muted small">Candidate config {esc(report.candidate["revisions"]["config"])}'
            f', catalog {esc(report.candidate["revisions"]["catalog"])}; records from '
            f"{esc(', '.join(sources))}; {data['exact']} of {data['decisions']} re-decided "
            f"field for field as recorded; {data['redecided']} re-decided "
            f"(refusals before the comparison are kept as recorded).</p></div>",
            kpis([(k.replace("_", " "), v) for k, v in totals.items()])]
    if data["uncertain"]:
        body.append(f'<p class="muted">{data["uncertain"]} result(s) depend on a value the '
                    "recorded decision never read (marked uncertain below).</p>")
    for dim, title in (("network", "By client network"), ("user", "By user"),
                       ("provider", "By provider"), ("reason", "By new reason")):
        rows = [[k, *(v.get(c, 0) for c in CHANGES)] for k, v in data["by"][dim].items()]
        if rows:
            body.append(f"<h2>{title}</h2>" + table(
                [dim, *(c.replace("_", " ") for c in CHANGES)], rows,
                numeric=range(1, len(CHANGES) + 1)))
    if data["changes"]:
        kinds = {"newly_blocked": "block", "newly_allowed": "allow", "rerouted": "reroute"}
        rows = [[c["ts"], c["client"], c["user"], f"{c['method']} {c['url']}",
                 tag(kinds.get(c["change"], "report"), c["change"].replace("_", " ")),
                 c["before"], c["after"] + (" (uncertain)" if c["uncertain"] else ""),
                 c["reason"]] for c in data["changes"]]
        body.append("<h2>Each change</h2>" + table(
            ["time", "client", "user", "request", "change", "before", "after", "reason"],
            rows, wrap=(3, 5, 6, 7), raw=(4,)))
        if data["changes_omitted"]:
            body.append(f'<p class="muted">{data["changes_omitted"]} more changes: see '
                        "--json.</p>")
    return page(f"What-if: {changed} change(s) under {report.candidate['config']}",
                "".join(body))
