"""The path a provider will act on: RFC 3986 normal form, or a refusal.

Servers decode percent-escaped unreserved characters and remove dot segments
(RFC 3986 6.2.2, 5.2.4) before they route, so `/locations/europe-west4/../us-central1/`
runs in us-central1. Locators read the normalised path and the proxy forwards it,
so the decision and the upstream request cannot differ. What has no single reading
across servers (an encoded backslash, `//`, NUL, a broken escape, `;` parameters,
double encoding) is refused rather than guessed at. The query string is left as sent:
no locator reads it as a path.
"""

from __future__ import annotations

import re

# RFC 3986: unreserved characters, decoded wherever they are percent-encoded.
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,=:@"  # pchar without ';' (path parameters) and '%'
# Escapes that stay as sent: not unreserved (those are decoded), not a control character,
# '/', '\\' or '%' (those need a closer look).
_KEPT = r"%(?:2[0-46-9A-Ca-c]|3[A-Fa-f]|40|5[BbDdEe]|60|7[B-Db-d]|[89A-Fa-f][0-9A-Fa-f])"
# Already normal: non-empty segments of plain pchars (and kept escapes), none `.` or `..`.
# (Possessive quantifiers: a path that is not normal fails at once, without backtracking.)
_NORMAL = re.compile(rf"(?:/(?!\.\.?(?:/|\Z))[{_PCHAR}]++)*+/?")
_NORMAL_ESCAPED = re.compile(rf"(?:/(?!\.\.?(?:/|\Z))(?:[{_PCHAR}]++|{_KEPT})++)*+/?")
# The same for a whole request target (path and any query): one call on the hot path.
_TARGET = rf"(?=/)(?:/(?!\.\.?(?:[/?]|\Z))[{_PCHAR}]++)*+/?+(?:\?.*)?"
_TARGET_NORMAL = re.compile(_TARGET, re.DOTALL)
_TARGET_NORMAL_ESCAPED = re.compile(_TARGET.replace(f"[{_PCHAR}]++", f"(?:[{_PCHAR}]++|{_KEPT})++"),
                                    re.DOTALL)
_NOT_PATH = re.compile(rf"[^{_PCHAR}%/]")
_ESCAPE = re.compile(r"%(..?)?", re.DOTALL)
_HEX = frozenset("0123456789abcdefABCDEF")
_ENCODED_SLASH = re.compile(r"%2[fF]")

class UnsafePath(ValueError):
    """A path no single normal form can be given to: refused when a requirement applies."""

    def __init__(self, what: str) -> None:
        self.what = what  # "an empty segment ('//')": completes "the path has ..."
        super().__init__(what)


def split_target(target: str) -> tuple[str, str | None]:
    """(path, query or None): the request target as sent, split at the first '?'."""
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def normalise_target(target: str, signed: bool = False) -> str:
    """The request target (path and query) with its path normalised (the same object when
    it already is); raise UnsafePath. A signed target (SigV4) must already be normal: its
    signature covers the path, so it cannot be rewritten."""
    if (_TARGET_NORMAL_ESCAPED if "%" in target else _TARGET_NORMAL).fullmatch(target):
        return target
    path, query = split_target(target)
    normal = normalise_path(path)
    if normal is path:
        return target
    if signed:
        raise UnsafePath(f"a form that is not normal, and a SigV4-signed request cannot be "
                         f"rewritten (its normal form is {normal!r})")
    return normal if query is None else f"{normal}?{query}"


def normalise_path(path: str) -> str:
    """The path in normal form (the same object when it already is); raise UnsafePath."""
    if not path.startswith("/"):
        raise UnsafePath(f"no leading '/' ({path[:40]!r})")
    if (_NORMAL_ESCAPED if "%" in path else _NORMAL).fullmatch(path):
        return path
    bad = _NOT_PATH.search(path)
    if bad:
        raise UnsafePath(_describe_char(bad.group()))
    segments = path[1:].split("/")
    last = len(segments) - 1
    out: list[str] = []
    dots = slashes = False
    for i, segment in enumerate(segments):
        if "%" in segment:
            segment = _ESCAPE.sub(_decode_escape, segment)
            if _ENCODED_SLASH.search(segment):
                slashes = True
                _check_encoded_slashes(segment)
        if segment in (".", ".."):
            dots = True
            if segment == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." is "/a/"
            continue
        if not segment and i < last:
            raise UnsafePath("an empty segment ('//')")
        out.append(segment)
    if dots and slashes:
        # A server that decodes %2F before removing dot segments pops a different segment.
        raise UnsafePath("an encoded '/' together with a '.' or '..' segment")
    normal = "/" + "/".join(out)
    return path if normal == path else normal


def _decode_escape(m: re.Match[str]) -> str:
    digits = m.group(1) or ""
    if len(digits) != 2 or not (digits[0] in _HEX and digits[1] in _HEX):
        raise UnsafePath(f"an invalid percent escape ({m.group()!r})")
    char = chr(int(digits, 16))
    if char in UNRESERVED:
        return char
    if char == "\0":
        raise UnsafePath("an encoded NUL (%00)")
    if char < " " or char == "\x7f":
        raise UnsafePath(f"an encoded control character ({m.group()})")
    if char == "\\":
        raise UnsafePath(f"an encoded backslash ({m.group()})")
    if char == "%":
        following = m.string[m.end():m.end() + 2]
        if len(following) == 2 and following[0] in _HEX and following[1] in _HEX:
            raise UnsafePath(f"a double-encoded escape ({m.group()}{following})")
    return m.group()  # reserved or non-ASCII: kept exactly as sent


def _check_encoded_slashes(segment: str) -> None:
    """An encoded '/' inside one segment is data to most servers (Bedrock: a model ARN,
    `inference-profile%2Feu.anthropic...`); a server that decodes it first must still
    see no empty or dot segment, or the two readings route differently."""
    for part in _ENCODED_SLASH.split(segment):
        if part in ("", ".", ".."):
            raise UnsafePath("an encoded '/' that makes an empty or dot segment when decoded")


def _describe_char(char: str) -> str:
    if char == ";":
        return "a ';' path parameter"
    if char == "\\":
        return "a backslash"
    if char == "\0":
        return "a NUL byte"
    if char < " " or char == "\x7f":
        return f"a control character ({char!r})"
    if char == "#":
        return "a '#' fragment"
    return f"a character that must be percent-encoded ({char!r})"
