"""Wire formats (catalog `apis.yaml`): how each API family shapes errors and credentials.

The official SDKs only surface a message if an error body looks like their
provider's errors, so a refusal is rendered from the API's own template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Api:
    """One wire format: error template, credential headers, key header, path prefix."""

    id: str
    name: str
    error_body: Any  # JSON template: "{message}", "{code}", "{type}" in strings; "{status}" -> int
    error_headers: Mapping[str, str] = field(default_factory=dict)
    error_types: Mapping[int, str] = field(default_factory=dict)  # status -> provider error type
    default_error_type: str = "error"
    credential_headers: tuple[str, ...] = ()  # never follow a request to another operator
    key_header: str | None = None  # where an endpoint's own key goes on a reroute
    key_format: str = "{key}"
    path_prefix: str | None = None  # e.g. /v1/ for OpenAI-compatible servers

    def error(self, status: int, code: str, message: str) -> tuple[bytes, dict[str, str]]:
        """Body and extra headers of a refusal in this API's shape."""
        values = {"message": message, "code": code, "status": status,
                  "type": self.error_types.get(status, self.default_error_type)}
        body = _fill(self.error_body, values)
        headers = {k: str(_fill(v, values)) for k, v in self.error_headers.items()}
        return json.dumps(body).encode(), headers

    def key_value(self, key: str) -> str:
        return self.key_format.replace("{key}", key)


def _fill(template: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, values) for v in template]
    if isinstance(template, str):
        whole = template[1:-1] if template.startswith("{") and template.endswith("}") else None
        if whole in values:
            return values[whole]  # keeps the type: {"code": "{status}"} -> 451
        out = template
        for name, value in values.items():
            out = out.replace("{" + name + "}", str(value))
        return out
    return template


# Used when the catalog has no apis.yaml entry for an API (never for shipped data).
FALLBACK = Api("other", "generic", {"error": {"message": "{message}", "code": "{code}"}})
