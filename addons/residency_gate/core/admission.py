"""Admission: checks a request must pass before its destination is compared at all.

Each check returns None (pass) or a refusal Decision, so refusals found here
travel the same path as every other decision. The proxy supplies the facts it
measured (names in the request, whether a name resolves to the connected
address, declared sizes); nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from . import wording
from .decision import Decision, ReasonCode, refuse
from .endpoints import Catalog, normalise_host


@lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:
    """An IP literal (v4, v6, bracketed v6), not a name. Asked several times per request of
    the same few hosts: cached."""
    host = host.strip("[]")
    if not host or (":" not in host and not host[-1].isdigit()):
        return False  # a name: IPv4 ends in a digit and IPv6 has a colon
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def authority_host(authority: str | None) -> str:
    """Host part of a Host header / :authority, normalised; '' when absent."""
    if not authority:
        return ""
    authority = authority.strip()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0].lower()
    if authority.count(":") == 1:
        authority = authority.rsplit(":", 1)[0]
    return normalise_host(authority)


@dataclass(frozen=True)
class Destination:
    """Where the connection goes (CONNECT target, original destination, or the absolute
    URL's host) and the names the request uses for it (Host header, TLS SNI)."""

    target: str
    names: frozenset[str]
    scheme: str = "https"
    port: int = 443
    path: str = "/"

    @classmethod
    def of(cls, target: str, host_header: str | None, sni: str | None, scheme: str = "https",
           port: int = 443, path: str = "/") -> Destination:
        names = {n for n in (authority_host(host_header), normalise_host(sni or "")) if n}
        return cls(normalise_host(target), frozenset(names), scheme, port, path)

    @property
    def url(self) -> str:
        """scheme://target[:port]/path, no query: what a refusal names (built only then)."""
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port in (default, 0) else f":{self.port}"
        host = f"[{self.target}]" if ":" in self.target else self.target
        return f"{self.scheme}://{host}{port}{self.path.split('?', 1)[0]}"

    @property
    def by_address(self) -> bool:
        """Transparent mode: the connection goes to an address, not a name."""
        return is_ip(self.target)


def name_to_verify(catalog: Catalog, dest: Destination) -> str | None:
    """The LLM name an address-only destination claims, whose DNS the proxy must check."""
    if not dest.by_address or len(dest.names) != 1:
        return None
    (name,) = dest.names
    return name if catalog.is_llm(name) else None


def destination(catalog: Catalog, dest: Destination,
                resolves: bool | None = None) -> str | Decision | None:
    """The LLM host the request really goes to, None for non-LLM traffic, or a refusal.

    Decide on what the proxy connects to: a Host header or SNI naming another host is
    domain fronting, refused, never followed. `resolves`: whether the one name of an
    address-only destination resolves to that address (see `name_to_verify`).
    """
    api = catalog.api_of(dest.target)
    target = dest.target
    if dest.by_address:
        llm_names = sorted(n for n in dest.names if catalog.is_llm(n))
        if not llm_names:
            return None
        api = catalog.api_of(llm_names[0])
        if len(dest.names) > 1:
            return refuse(ReasonCode.MISDIRECTED, wording.fronting_disagree(sorted(dest.names)),
                          host=target, url=dest.url, api=api)
        if not resolves:
            return refuse(ReasonCode.MISDIRECTED, wording.fronting_unresolved(llm_names[0],
                                                                              target),
                          host=target, url=dest.url, api=api)
        return llm_names[0]
    others = sorted(dest.names - {target})
    if not catalog.is_llm(target):
        fronted = [n for n in others if catalog.is_llm(n)]
        if fronted:
            return refuse(ReasonCode.MISDIRECTED, wording.fronting_behind(others, target),
                          host=target, url=dest.url, api=catalog.api_of(fronted[0]))
        return None
    if others:
        return refuse(ReasonCode.MISDIRECTED, wording.fronting_named(target, others),
                      host=target, url=dest.url, api=api)
    return target


def ip_literal_refused(catalog: Catalog, dest: Destination) -> Decision:
    """`ip_literals: refuse`: TLS to an address the client chose names no host."""
    llm = sorted(n for n in dest.names if catalog.is_llm(n))
    return refuse(ReasonCode.MISDIRECTED, wording.ip_literal_refused(dest.target),
                  host=dest.target, url=dest.url, api=catalog.api_of(llm[0] if llm else ""))


def declared_size(content_length: str | None, limit: int, host: str, url: str,
                  catalog: Catalog) -> Decision | None:
    """Refuse a body declared over the limit before it is read (it would otherwise have
    to be streamed, and a streamed body leaves before it can be decided on)."""
    try:
        length = int(content_length or "0")
        if length < 0:
            raise ValueError
    except ValueError:
        return refuse(ReasonCode.BAD_REQUEST, wording.bad_content_length(), host=host, url=url,
                      api=catalog.api_of(host))
    if length <= limit:
        return None
    return too_large(limit, host, url, catalog)


def too_large(limit: int, host: str, url: str, catalog: Catalog) -> Decision:
    return refuse(ReasonCode.BODY_TOO_LARGE, wording.too_large(limit), host=host, url=url,
                  api=catalog.api_of(host))
