"""A PAC file (proxy auto-config) that sends only catalog hosts through the proxy.

Browsers and OS proxy settings evaluate ``FindProxyForURL(url, host)``. The file
generated here answers ``PROXY host:port`` for hosts the catalog knows and
``DIRECT`` for everything else, so only LLM API traffic crosses residency-gate.

Host patterns come from the catalog: exact names (``api.openai.com``) or names
with ``{capture}`` placeholders. A placeholder stands for one or more of
``[a-z0-9-]`` inside one DNS label, so ``{resource}.openai.azure.com`` matches
``myres.openai.azure.com`` but neither ``a.b.openai.azure.com`` nor
``openai.azure.com``. Each pattern becomes an anchored regular expression; the
host is lower-cased and a trailing dot removed before matching.

Catalog hosts deliberately get no ``; DIRECT`` fallback: if the proxy is down,
LLM traffic must fail rather than bypass the residency check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from ..core.endpoints import normalise_host

__all__ = ["pac_file", "pattern_regex", "proxy_directive"]

_LABEL_CHARS = "[a-z0-9-]"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LITERAL_OK = re.compile(r"[a-z0-9.-]*")
_HOSTPORT = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})"
)


def pattern_regex(pattern: str) -> str:
    """The anchored regular expression (JavaScript and Python compatible) for a host pattern.

    Raises ValueError for a pattern that is not a host name with optional placeholders.
    """
    p = normalise_host(pattern)
    if not p:
        raise ValueError("empty host pattern")
    out = ["^"]
    pos = 0
    for m in _PLACEHOLDER.finditer(p):
        literal = p[pos : m.start()]
        if not _LITERAL_OK.fullmatch(literal):
            raise ValueError(f"invalid host pattern {pattern!r}")
        out.append(re.escape(literal).replace("\\-", "-"))
        out.append(_LABEL_CHARS + "+")
        pos = m.end()
    tail = p[pos:]
    if not _LITERAL_OK.fullmatch(tail):
        raise ValueError(f"invalid host pattern {pattern!r}")
    out.append(re.escape(tail).replace("\\-", "-"))
    out.append("$")
    if ".." in _PLACEHOLDER.sub("x", p) or _PLACEHOLDER.sub("x", p).startswith("."):
        raise ValueError(f"invalid host pattern {pattern!r}")
    return "".join(out)


def proxy_directive(proxy: str) -> str:
    """``PROXY host:port`` (several comma-separated proxies become a failover list)."""
    directives = []
    for item in proxy.split(","):
        item = item.strip()
        if item.upper().startswith("PROXY "):
            item = item[6:].strip()
        m = _HOSTPORT.fullmatch(item)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            raise ValueError(f"proxy must be HOST:PORT, got {item!r}")
        directives.append(f"PROXY {item}")
    if not directives:
        raise ValueError("no proxy given")
    return "; ".join(directives)


def pac_file(host_patterns: Iterable[str], proxy: str) -> str:
    """A PAC script sending exactly the given host patterns to ``proxy`` (HOST:PORT)."""
    directive = proxy_directive(proxy)
    exact: set[str] = set()
    regexes: dict[str, str] = {}
    for pattern in host_patterns:
        norm = normalise_host(pattern)
        rx = pattern_regex(pattern)  # validates
        if _PLACEHOLDER.search(norm):
            regexes.setdefault(rx, norm)
        else:
            exact.add(norm)
    exact_js = ",\n".join(f"    {json.dumps(h)}: 1" for h in sorted(exact))
    ordered = sorted(regexes.items(), key=lambda kv: kv[1])
    rx_js = ",\n".join(f"    new RegExp({json.dumps(rx)})" for rx, _ in ordered)
    comments = "\n".join(f"//   {src}" for _, src in ordered)
    return f"""\
// residency-gate proxy auto-config: only LLM API hosts and AI apps from the catalog
// go through the proxy; everything else connects directly. Generated; do not edit
// (residency-gate ca pac --proxy HOST:PORT).
// No DIRECT fallback for catalog hosts: they fail closed when the proxy is down.
// Patterns ({{capture}} = one or more of [a-z0-9-] inside one DNS label):
{comments or "//   (none)"}

var RG_PROXY = {json.dumps(directive)};

var RG_EXACT = {{
{exact_js}
}};

var RG_PATTERNS = [
{rx_js}
];

function FindProxyForURL(url, host) {{
  var h = String(host).toLowerCase();
  if (h.length > 0 && h.charAt(h.length - 1) == ".") {{
    h = h.substring(0, h.length - 1);
  }}
  if (Object.prototype.hasOwnProperty.call(RG_EXACT, h)) {{
    return RG_PROXY;
  }}
  for (var i = 0; i < RG_PATTERNS.length; i++) {{
    if (RG_PATTERNS[i].test(h)) {{
      return RG_PROXY;
    }}
  }}
  return "DIRECT";
}}
"""
