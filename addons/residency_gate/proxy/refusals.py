"""The response a client gets when the proxy answers a request itself.

API clients get a body in the destination API's own error shape (catalog
`apis.yaml`), so the official SDKs raise an error carrying our message. A
person's browser (Accept: text/html, or any request to a consumer AI app) gets a
short self-contained HTML page saying the same: what was blocked, by which rule,
what to use instead, and the audit id to quote to the help desk.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy import http

from ..audit.html import definitions, esc, page
from ..core.decision import Decision


@dataclass(frozen=True)
class BlockPage:
    """What the operator adds to a block page (config `block_page`)."""

    contact: str | None = None
    instead: str | None = None


def wants_page(accept: str | None, decision: Decision) -> bool:
    """A browser navigating (Accept names text/html), or a consumer AI app, which only
    browsers and their apps talk to."""
    if decision.endpoint is not None and decision.endpoint.provider.category == "app":
        return True
    return "text/html" in (accept or "").lower()


def refusal(decision: Decision, audit_id: str | None,
            block_page: BlockPage | None = None) -> http.Response:
    headers = {"X-Residency-Decision": decision.verdict,
               "X-Residency-Reason": str(decision.code), "Cache-Control": "no-store"}
    if audit_id:
        headers["X-Residency-Audit-Id"] = audit_id
    if block_page is not None:
        headers["Content-Type"] = "text/html; charset=utf-8"
        return http.Response.make(decision.status, render_block_page(decision, audit_id,
                                                                     block_page), headers)
    body, extra = decision.api.error(decision.status, str(decision.code), decision.reason)
    return http.Response.make(decision.status, body,
                              {"Content-Type": "application/json", **headers, **extra})


def render_block_page(decision: Decision, audit_id: str | None, block_page: BlockPage) -> str:
    """The page a person reads: the sentence the API error carries, laid out."""
    endpoint = decision.endpoint
    residency = decision.status == 451
    title = "Blocked by residency policy" if residency else "Request refused"
    what = esc(decision.url)
    if endpoint is not None:
        what += f' <span class="muted">({esc(endpoint.provider.name)}, {esc(endpoint.name)})</span>'
    rules = [f"{esc(p.detail)} requires <b>{esc(', '.join(p.names))}</b>"
             for p in decision.requirement.parts]
    items = [("What was blocked", what),
             ("Rule", "<br>".join(rules) or "none (the request could not be decided as sent)"),
             ("Why", esc(decision.reason))]
    instead = []
    if block_page.instead:
        instead.append(f"<li>{esc(block_page.instead)}</li>")
    instead += [f"<li>{esc(a)}</li>" for a in decision.advice]
    if instead:
        items.append(("Use instead", f'<ul style="margin:0;padding-left:1.2em">'
                                     f'{"".join(instead)}</ul>'))
    quote = esc(audit_id) if audit_id else "none (the audit trail could not be written)"
    items.append(("Audit id", f'<code id="audit-id">{quote}</code>'))
    ask = (f" Ask {esc(block_page.contact)}, quoting the audit id." if block_page.contact
           else " Quote the audit id when you ask your help desk.")
    body = (f'<div class="card verdict"><h1>{esc(title)}</h1>'
            f'<p>HTTP {decision.status} &middot; <code>{esc(decision.code)}</code></p></div>'
            f'<div class="card">{definitions(items)}</div>'
            f'<p class="muted small">residency-gate keeps AI traffic inside the places your '
            f"organisation has promised. Nothing was sent to the destination.{ask}</p>")
    return page(f"{title}: {decision.host}", body)
