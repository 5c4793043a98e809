"""The response a client gets when the proxy answers a request itself.

The body is in the destination API's own error shape (catalog `apis.yaml`), so
the official SDKs raise an error carrying our message.
"""

from __future__ import annotations

from mitmproxy import http

from ..core.decision import Decision


def refusal(decision: Decision, audit_id: str | None) -> http.Response:
    body, extra = decision.api.error(decision.status, str(decision.code), decision.reason)
    headers = {"Content-Type": "application/json", "X-Residency-Decision": decision.verdict,
               "X-Residency-Reason": str(decision.code), "Cache-Control": "no-store", **extra}
    if audit_id:
        headers["X-Residency-Audit-Id"] = audit_id
    return http.Response.make(decision.status, body, headers)
