"""Which headers a request's AWS SigV4 signature covers.

Removing or changing a signed header breaks the signature, so the tag header
stays on a request whose signature covers it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from mitmproxy import http

_SIGNED = re.compile(r"SignedHeaders=([^,\s]+)", re.IGNORECASE)


def signed_headers(request: http.Request) -> frozenset[str]:
    """Lower-case names from `Authorization: AWS4-HMAC-SHA256 ... SignedHeaders=...`
    or from a presigned URL's X-Amz-SignedHeaders."""
    names: set[str] = set()
    auth = request.headers.get("authorization", "")
    if auth.upper().startswith("AWS4-"):
        m = _SIGNED.search(auth)
        if m:
            names.update(m.group(1).lower().split(";"))
    if "x-amz-signedheaders" in request.path.lower():
        for key, value in parse_qsl(request.path.partition("?")[2]):
            if key.lower() == "x-amz-signedheaders":
                names.update(value.lower().split(";"))
    return frozenset(names)


def is_signed(request: http.Request) -> bool:
    """A SigV4-signed request: its host, path and region must not be rewritten."""
    return request.headers.get("authorization", "").upper().startswith("AWS4-") or (
        "x-amz-signature=" in request.path.lower())
