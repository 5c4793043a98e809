"""Refusals in each provider's own error shape.

The official SDKs only surface a message if the body looks like their
provider's errors; a generic body would turn our reason into "Unknown error".
"""

from __future__ import annotations

import json

from mitmproxy import http

_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 421: "PERMISSION_DENIED",
                  451: "PERMISSION_DENIED", 500: "INTERNAL", 503: "UNAVAILABLE"}
_AWS_TYPE = {400: "ValidationException", 413: "ValidationException",
             421: "AccessDeniedException", 451: "AccessDeniedException",
             500: "InternalServerException", 503: "ServiceUnavailableException"}
_ANTHROPIC_TYPE = {400: "invalid_request_error", 413: "request_too_large",
                   421: "permission_error", 451: "permission_error", 500: "api_error",
                   503: "overloaded_error"}


def error_body(api: str, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers for a refusal, shaped for `api`."""
    headers: dict[str, str] = {}
    if api == "anthropic":
        body = {"type": "error", "error": {"type": _ANTHROPIC_TYPE.get(status, "api_error"),
                                           "message": message}}
    elif api == "bedrock":
        kind = _AWS_TYPE.get(status, "AccessDeniedException")
        headers["x-amzn-ErrorType"] = f"{kind}:http://internal.amazon.com/coral/com.amazon.coral.service/"
        body = {"message": message, "Message": message}
    elif api == "google":
        body = {"error": {"code": status, "message": message,
                          "status": _GOOGLE_STATUS.get(status, "FAILED_PRECONDITION")}}
    else:  # openai, azure and the many OpenAI-compatible APIs
        body = {"error": {"message": message, "type": "residency_policy", "param": None,
                          "code": code}}
    return json.dumps(body).encode(), headers


def refusal(api: str, status: int, code: str, message: str, audit_id: str | None,
            verdict: str = "block") -> http.Response:
    body, extra = error_body(api, status, code, message)
    headers = {"Content-Type": "application/json", "X-Residency-Decision": verdict,
               "X-Residency-Reason": code, "Cache-Control": "no-store", **extra}
    if audit_id:
        headers["X-Residency-Audit-Id"] = audit_id
    return http.Response.make(status, body, headers)
