"""Extractors: find one value (a model ID, a deployment name) in a request.

What to extract and where is catalog data (`model:`, `deployment:`, `arn:`);
this module only knows the three places a value can be (body, query, path)
and how a `{placeholder}` pattern reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from .request import RequestView

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def compile_path_pattern(pattern: str) -> re.Pattern[str]:
    """`/model/{model}/` -> a regex searching the path; captures stop at `/`."""
    parts = PLACEHOLDER.split(pattern)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            lazy = "?" if i + 1 < len(parts) and parts[i + 1] else ""
            out.append(f"(?P<{part}>[^/?#]+{lazy})")
    return re.compile("".join(out))


def compile_field_pattern(pattern: str) -> re.Pattern[str]:
    """`arn:{partition}:bedrock:{region}:...:{type}/{id}` -> an anchored regex: each
    placeholder runs up to the next literal character, the last one to the end."""
    parts = PLACEHOLDER.split(pattern)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
            continue
        following = parts[i + 1] if i + 1 < len(parts) else ""
        out.append(f"(?P<{part}>[^{re.escape(following[0])}]*)" if following
                   else f"(?P<{part}>.+)")
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Extractor:
    """One place a value may be found in a request."""

    kind: str  # body | query | path
    key: tuple[str, ...] | str
    regex: re.Pattern[str] | None = None

    @classmethod
    def compile(cls, spec: Mapping[str, str]) -> Extractor:
        (kind, value), *_ = spec.items()
        if kind == "body":
            return cls("body", tuple(value.split(".")))
        if kind == "query":
            return cls("query", value)
        regex = compile_path_pattern(value)
        return cls("path", next(iter(regex.groupindex)), regex)

    def find(self, req: RequestView) -> str | None:
        if self.kind == "path":
            m = self.regex.search(req.path)
            return unquote(m.group(1)) if m else None
        if self.kind == "query":
            return req.query_param(self.key)
        value = req.body_value(self.key)
        return value if isinstance(value, str) and value else None

    def describe(self) -> str:
        if self.kind == "body":
            return f"body field {'.'.join(self.key)!r}"
        if self.kind == "query":
            return f"query parameter {self.key!r}"
        return f"path segment {self.regex.pattern!r}"


def first_match(extractors: tuple[Extractor, ...], req: RequestView) -> str | None:
    for ex in extractors:
        value = ex.find(req)
        if value:
            return value
    return None
