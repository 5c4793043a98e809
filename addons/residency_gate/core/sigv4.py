"""Which parts of a request its AWS SigV4 signature covers.

Removing or changing a signed header breaks the signature, so the tag header
stays on a request whose signature covers it; a signed request's host, path and
body are never rewritten.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

_SIGNED = re.compile(r"SignedHeaders=([^,\s]+)", re.IGNORECASE)


def signed_headers(authorization: str, path: str) -> frozenset[str]:
    """Lower-case names from `Authorization: AWS4-HMAC-SHA256 ... SignedHeaders=...`
    or from a presigned URL's X-Amz-SignedHeaders."""
    names: set[str] = set()
    if authorization.upper().startswith("AWS4-"):
        m = _SIGNED.search(authorization)
        if m:
            names.update(m.group(1).lower().split(";"))
    if "x-amz-signedheaders" in path.lower():
        for key, value in parse_qsl(path.partition("?")[2]):
            if key.lower() == "x-amz-signedheaders":
                names.update(value.lower().split(";"))
    return frozenset(names)


def is_signed(authorization: str, path: str) -> bool:
    """A SigV4-signed request: its host, path and region must not be rewritten."""
    return authorization.upper().startswith("AWS4-") or "x-amz-signature=" in path.lower()
