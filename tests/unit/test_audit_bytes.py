"""What the writer writes, byte for byte: the same lines, whatever path builds them.

The writer serialises a record once and splices its signature in (chain.py); these tests
hold that to the reference path, ``sign_record`` (canonical JSON of the record without
``sig``, signed, then canonical JSON with it), on random records (keys outside the BMP,
escapes, controls, boundary integers, tuples) and on a golden log: the digest of every byte
a writer wrote for a fixed key, clock, host and pid, as the writer before the single
serialisation wrote it.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from residency_gate.audit import chain_writer
from residency_gate.audit.canonical import canonical, is_plain, parse
from residency_gate.audit.chain import SIG_SLOT, UtcClock, seal, sign_record, utc_ts
from residency_gate.audit.chain_writer import ChainWriter
from residency_gate.audit.keys import SigningKey
from residency_gate.audit.writer_api import AuditRecordError
from test_audit_canonical import random_record

ORIGIN = "gw-bytes"
KEY = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
NEXT_KEY = SigningKey.from_private(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))

DECISION = {
    "advice": [], "body_bytes": 68, "body_sha256": "ab" * 32, "client": "10.20.0.7",
    "code": "outside_requirement", "decision": "block", "endpoint": "global", "enforced": True,
    "host": "api.openai.com",
    "inputs": {"path": "/v1/chat/completions", "reads": {"body": "object",
                                                         "body:model": "gpt-4o"},
               "signed": False},
    "located_by": "fixed for this endpoint", "method": "POST", "model": "gpt-4o",
    "places": ["global"], "processing": ["global"], "provider": "openai",
    "reason": "Blocked by residency policy: requirement eu (from header X-Data-Residency: "
              "eu), but api.openai.com may process this request in anywhere.",
    "requirement": ["eu"], "requirement_places": ["eu"],
    "requirement_sources": [{"detail": "header X-Data-Residency: eu", "mode": "enforce",
                             "names": ["eu"], "source": "tag"}],
    "revisions": {"catalog": "c8fcedc736487dc0", "config": "defaults"}, "status": 451,
    "storage": ["global"], "tags": ["eu"], "url": "https://api.openai.com/v1/chat/completions",
    "user": None,
}
OUTCOME = {"decision_id": f"{ORIGIN}:1", "status": 451, "bytes_in": 68, "bytes_out": None,
           "duration_ms": 3, "error": None, "error_kind": None}
# refused, the writer stays healthy and writes nothing for them
def _nested(depth: int) -> list:
    out: list = [0]
    for _ in range(depth):
        out = [out]
    return out


BAD = [{"f": 1.5}, {"t": "\ud800"}, {"\udfff": 1}, {"n": 2**53}, {"b": b"x"}, {1: "int key"},
       {"seq": 1}, {"deep": _nested(70)}]


def entries(seed: int, n: int) -> list[tuple[str, dict]]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        k = r.randrange(10)
        if k < 3:
            out.append(("decision", dict(DECISION, n=i)))
        elif k < 5:
            out.append(("outcome", dict(OUTCOME, duration_ms=i)))
        elif k < 6:
            out.append(("x", r.choice(BAD)))
        else:
            out.append((r.choice(["decision", "config", "kind\u00e9", "k\U0001f600"]),
                        random_record(r)))
    return out


class FixedClock:
    """Every timestamp the writer takes, from a counter (one microsecond apart)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, when=None) -> str:
        self.n += 1
        return f"2026-11-28T07:24:{10 + self.n // 1_000_000:02d}.{self.n % 1_000_000:06d}Z"


def write_golden(d: Path, monkeypatch, owned: bool = False) -> bytes:
    """A log (rotations, checkpoints, a key hand-over, refusals) written with a fixed key,
    clock, host and pid; every byte of it, in order. ``owned``: as the writer process
    writes (fields it unmarshalled, used without a copy)."""
    monkeypatch.setattr(chain_writer.socket, "gethostname", lambda: "golden-host")
    w = ChainWriter(d, KEY, ORIGIN, rotate_bytes=6000, checkpoint_every=7,
                    checkpoint_seconds=1e9, rotate_seconds=1e9)
    w.clock = FixedClock()
    w.pid = 4242
    w.open()
    todo = entries(8785, 240)
    if owned:
        todo = [marshal.loads(marshal.dumps(e)) for e in todo]
    refused = 0
    for i in range(0, len(todo), 9):
        out = w.append_batch(todo[i:i + 9], owned=owned)
        refused += sum(isinstance(x, AuditRecordError) for x in out)
        if i == 117:
            w.rotate_key_sync(NEXT_KEY)
    w.close_sync()
    assert refused > 10 and w.healthy is False and w.failure is None
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in files)


@pytest.mark.parametrize("owned", [False, True], ids=["thread", "process"])
def test_golden_log(tmp_path, monkeypatch, owned):
    data = write_golden(tmp_path / "a", monkeypatch, owned)
    # written by the writer of ff4a825 (three serialisations a record) with this test's inputs
    assert hashlib.sha256(data).hexdigest() == \
        "687df07fd87c821bd3e9e4cb03db205fb4952f5ba5bd587a4df158d3af7b2df2"


def test_every_line_is_the_reference_serialisation(tmp_path, monkeypatch):
    """Each line the writer wrote is what sign_record makes of its content."""
    d = tmp_path / "a"
    write_golden(d, monkeypatch)
    keys = {KEY.key_id: KEY, NEXT_KEY.key_id: NEXT_KEY}
    n = 0
    for p in sorted(d.glob(f"{ORIGIN}-*.jsonl")):
        for line in p.read_bytes().splitlines():
            rec = parse(line)
            rec.pop("sig")
            assert sign_record(rec, keys[rec["key_id"]]) == line
            n += 1
    assert n > 150


@pytest.mark.parametrize("seed", range(3))
def test_random_records_through_the_writer_verify(tmp_path, seed):
    from residency_gate.audit.verify import verify

    d = tmp_path / "a"
    w = ChainWriter(d, KEY, ORIGIN, rotate_bytes=8000, checkpoint_every=5)
    w.open()
    for i in range(0, 90, 10):
        w.append_batch(entries(seed, 90)[i:i + 10])
    w.close_sync()
    rep = verify([d], {KEY.key_id: KEY.public}, None, thorough=True, jobs=1)
    assert rep.ok and rep.problems == [], [p.text() for p in rep.problems]


def _header(r: random.Random, seq: int) -> dict:
    return {"v": 1, "origin": r.choice(["gw-1", "gw-\u00e9", "gw-\U0001f600"]), "seq": seq,
            "ts": "2026-11-28T07:24:10.123456Z", "kind": r.choice(["decision", "outcome", "k"]),
            "prev": f"{r.getrandbits(256):064x}", "key_id": KEY.key_id}


def test_seal_is_sign_record_on_random_records():
    """One serialisation with the slot, spliced, against sign_record (two serialisations):
    the same line and signature, on both serialisers (plain: json; else rfc8785)."""
    r = random.Random(11)
    paths = set()
    for seq in range(1500):
        fields = json_copy(random_record(r))
        if seq % 97 == 0:  # a field that holds the slot itself: seal falls back
            fields["meta"] = {"sig": SIG_SLOT}
        rec = {**_header(r, seq), **fields}
        plain = is_plain(rec)
        paths.add(plain)
        reference = dict(rec)
        expected = sign_record(reference, KEY, plain=plain)
        rec["sig"] = SIG_SLOT
        assert seal(rec, KEY, plain=plain) == expected
        assert rec == reference and list(rec) == list(reference)
    assert paths == {True, False}


def json_copy(fields: dict) -> dict:
    """The fields as the writer keeps them (tuples become lists)."""
    return json.loads(canonical(fields))


def test_clock_is_utc_ts():
    """The writer's clock formats an instant exactly as utc_ts does (boundaries of seconds,
    days, years, leap days; microseconds rounded down), and agrees with it on now."""
    clock = UtcClock()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    r = random.Random(3)
    samples = [0, 999, 1000, 999_999_999, 1_000_000_000, 951_782_399_999_999_999,
               951_782_400_000_000_000, 1_798_761_599_999_999_000, 1_798_761_600_000_000_000]
    samples += [r.randrange(0, 4_102_444_800 * 10**9) for _ in range(3000)]
    samples += [1_800_000_000 * 10**9 + i * 137_000 for i in range(3000)]  # same second
    for ns in samples:
        assert clock.at(ns) == utc_ts(epoch + timedelta(microseconds=ns // 1000)), ns
    for _ in range(1000):
        before, now, after = utc_ts(), clock(), utc_ts()
        assert before <= now <= after


def test_a_kind_that_cannot_be_written_is_refused_not_fatal(tmp_path):
    """A kind with a lone surrogate used to pass the checks and fail the writer for good
    when its record was serialised; it is refused like a bad field."""
    w = ChainWriter(tmp_path / "a", KEY, ORIGIN)
    w.open()
    out = w.append_batch([("k\ud800", {}), ("k\U0001f600", {"a": 1})], owned=True)
    assert isinstance(out[0], AuditRecordError) and out[1]["kind"] == "k\U0001f600"
    assert w.healthy
    w.close_sync()
