"""Content-Encoding undone within limits (proxy/decoding.py): every coding a provider
accepts round-trips, truncated and unknown ones are Undecodable, and a bomb stops at
the limit without the decoded bytes ever being held."""

from __future__ import annotations

import gzip
import resource
import zlib

import brotli
import pytest

from residency_gate.proxy.decoding import TooLarge, Undecodable, decode

try:
    from compression import zstd
except ImportError:
    from backports import zstd

BODY = b'{"model":"gpt-4o","messages":[' + b'{"role":"user","content":"hi"},' * 20000 + b"{}]}"

CODINGS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as RFC 9110 says
    "br": brotli.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("coding", sorted(CODINGS))
def test_each_coding_round_trips_and_stops_at_the_limit(coding):
    packed = CODINGS[coding](BODY)
    assert decode(packed, coding.upper(), len(BODY), "k") == BODY
    with pytest.raises(TooLarge) as e:
        decode(packed, coding, len(BODY) - 1, "limits.x")
    assert e.value.key == "limits.x" and e.value.limit == len(BODY) - 1
    with pytest.raises(Undecodable):
        decode(packed[:-8], coding, len(BODY), "k")


def test_raw_deflate_and_concatenated_members_decode_as_the_provider_reads_them():
    raw_deflate = zlib.compress(BODY)[2:-4]
    assert decode(raw_deflate, "deflate", len(BODY), "k") == BODY
    assert decode(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10, "k") == b"abcd"
    assert decode(zstd.compress(b"ab") + zstd.compress(b"cd"), "zstd", 10, "k") == b"abcd"


@pytest.mark.parametrize("coding", ["bz2", "base64", "gzip, br", "rot13", "compress"])
def test_only_http_content_codings_are_decoded(coding):
    """mitmproxy's get_content falls back to any Python codec (bz2 is a bomb too)."""
    with pytest.raises(Undecodable, match="unsupported Content-Encoding"):
        decode(b"QUJD", coding, 100, "k")


def test_identity_and_empty_bodies():
    assert decode(b"abc", None, 3, "k") == b"abc"
    assert decode(b"", "gzip", 0, "k") == b""
    with pytest.raises(TooLarge):
        decode(b"abcd", "identity", 3, "k")
    with pytest.raises(Undecodable):
        decode(gzip.compress(b"a") + b"trailing garbage", "gzip", 10, "k")


def make_bomb(coding: str, mib: int) -> bytes:
    """`mib` MiB of zeros, compressed a MiB at a time (never held whole here either)."""
    zeros = bytes(1 << 20)
    if coding == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join(c.compress(zeros) for _ in range(mib)) + c.flush()
    if coding == "br":
        c = brotli.Compressor()
        return b"".join(c.process(zeros) for _ in range(mib)) + c.finish()
    c = zstd.ZstdCompressor()
    return b"".join(c.compress(zeros) for _ in range(mib)) + c.flush()


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_a_bomb_is_refused_without_holding_what_it_decodes_to(coding):
    bomb = make_bomb(coding, 128)
    assert len(bomb) < 300 << 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TooLarge):
        decode(bomb, coding, 100 << 20, "k")
    grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kb < 8 << 10, f"peak RSS grew {grew_kb} kB decoding a {coding} bomb"
