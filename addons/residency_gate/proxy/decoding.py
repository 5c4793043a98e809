"""Content-Encoding undone within limits: a compression bomb is measured, never held.

mitmproxy's `get_content` decodes a whole body at once (and falls back to any Python
codec, bz2 included), so 0.3 MB of gzip became 300 MB in memory before anything could
look at its size. Here a body is decoded in CHUNK-sized steps twice: first only
counting (nothing is kept, so a bomb costs one chunk of memory and stops at the limit),
then, once it is known to fit, keeping the bytes. Only the HTTP content codings a
provider accepts are decoded: identity, gzip (every member, as gzip.decompress does),
deflate (zlib or raw), br, zstd.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import brotli

try:
    from compression import zstd  # Python 3.14
except ImportError:  # pragma: no cover - depends on the Python version
    from backports import zstd

CHUNK = 64 << 10


class Undecodable(ValueError):
    """The body is not valid data in its Content-Encoding (or the coding is unknown)."""


class TooLarge(Exception):
    """Decoding would pass `limit` bytes; `key` names the config limit that set it."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"decoded body larger than {limit} bytes ({key})")
        self.key = key
        self.limit = limit


def decode(raw: bytes, encoding: str | None, limit: int, key: str) -> bytes:
    """The decoded body, or TooLarge (nothing kept), or Undecodable."""
    coding = normalise(encoding)
    if coding == "identity" or not raw:
        if len(raw) > limit:
            raise TooLarge(key, limit)
        return raw
    size = 0
    for piece in _pieces(raw, coding):
        size += len(piece)
        if size > limit:
            raise TooLarge(key, limit)
    return b"".join(_pieces(raw, coding))


def normalise(encoding: str | None) -> str:
    coding = (encoding or "identity").strip().lower()
    if coding in ("", "none"):
        coding = "identity"
    if coding == "x-gzip":
        coding = "gzip"
    if coding not in ("identity", "gzip", "deflate", "br", "zstd"):
        raise Undecodable(f"unsupported Content-Encoding {encoding!r}")
    return coding


def _pieces(raw: bytes, coding: str) -> Iterator[bytes]:
    if coding == "gzip":
        return _gzip(raw)
    if coding == "deflate":
        return _zlib(raw, zlib.MAX_WBITS if _zlib_header(raw) else -zlib.MAX_WBITS)
    if coding == "br":
        return _brotli(raw)
    return _zstd(raw)


def _zlib_header(raw: bytes) -> bool:
    return len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0


def _gzip(raw: bytes) -> Iterator[bytes]:
    """Every gzip member in turn (what the provider's gzip.decompress reads)."""
    rest = raw
    while True:
        rest = yield from _drain(zlib.decompressobj(16 + zlib.MAX_WBITS), rest, "gzip")
        if not rest.strip(b"\0"):
            return


def _zlib(raw: bytes, wbits: int) -> Iterator[bytes]:
    yield from _drain(zlib.decompressobj(wbits), raw, "deflate")


def _drain(d, data: bytes, name: str) -> Iterator[bytes]:
    """Feed `data` in CHUNK slices, never asking zlib for more than CHUNK bytes at once;
    return what follows the end of the stream."""
    view = memoryview(data)
    try:
        for start in range(0, len(view), CHUNK):
            out = d.decompress(view[start:start + CHUNK], CHUNK)
            yield out
            while not d.eof and (d.unconsumed_tail or len(out) == CHUNK):
                out = d.decompress(d.unconsumed_tail, CHUNK)
                yield out
            if d.eof:
                return bytes(d.unused_data) + bytes(view[start + CHUNK:])
    except zlib.error as e:
        raise Undecodable(f"invalid {name} data: {e}") from None
    raise Undecodable(f"truncated {name} body")


def _brotli(raw: bytes) -> Iterator[bytes]:
    d = brotli.Decompressor()
    view = memoryview(raw)
    try:
        for start in range(0, len(view), CHUNK):
            yield d.process(bytes(view[start:start + CHUNK]), output_buffer_limit=CHUNK)
            while not d.can_accept_more_data():
                yield d.process(b"", output_buffer_limit=CHUNK)
        while not d.is_finished():  # output still pending after the last input
            out = d.process(b"", output_buffer_limit=CHUNK)
            if not out:
                break
            yield out
    except brotli.error as e:
        raise Undecodable(f"invalid brotli data: {e}") from None
    if raw and not d.is_finished():
        raise Undecodable("truncated brotli body")


def _zstd(raw: bytes) -> Iterator[bytes]:
    """Every zstd frame in turn."""
    rest = raw
    try:
        while rest:
            d = zstd.ZstdDecompressor()
            yield d.decompress(rest, CHUNK)
            while not d.eof:
                if d.needs_input:
                    raise Undecodable("truncated zstd body")
                yield d.decompress(b"", CHUNK)
            rest = d.unused_data
    except zstd.ZstdError as e:
        raise Undecodable(f"invalid zstd data: {e}") from None
