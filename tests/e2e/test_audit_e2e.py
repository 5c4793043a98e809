"""Issue 4, "Done when", end to end: the audit trail written by the REAL proxy process
(`residency-gate run`), checked with the REAL command line (`residency-gate audit verify
--json`, a subprocess).

1. traffic through the proxy (allowed, blocked 451, unknown tag 400), SIGTERM: the log
   verifies, every X-Residency-Audit-Id a client saw is a decision record, and the log
   holds body digests, never the prompt, the API key or the Authorization value sent;
2. the tamper cases of shared/reference/audit.md, each against a copy of that log, with
   the verifier's exact verdicts and seqs;
3. SIGKILL under heavy concurrent traffic, restart, verify: nothing the clients were
   answered is missing, nothing reached the provider without a durable decision;
4. readiness: /readyz says audit ok; a write failure (RLIMIT_FSIZE: stops root too)
   makes the proxy refuse LLM traffic with 503, forward nothing, and answer /readyz 503.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography.hazmat.primitives import serialization

from residency_gate.audit.canonical import canonical, parse
from residency_gate.audit.chain import ZERO_HASH, line_hash, logical_name, sign_record
from residency_gate.audit.keys import SigningKey
from residency_gate.audit.segments import compress_segment, read_segment

from .conftest import RESIDENCY_GATE, TAG_HEADER, Proxy
from .fakeprovider import FakeProvider, free_port

pytestmark = pytest.mark.e2e

ORIGIN = "e2e-gw"
CHAT_URL = "https://api.openai.com/v1/chat/completions"
PUBKEY = "audit-signing-key.pub.pem"
ROTATE = 4096  # small segments: a short run already makes a rotation series


# ---------------------------------------------------------------------------
# helpers: clients, the CLI, the files


@dataclass
class Sent:
    """One request a client sent through the proxy, and what it was answered."""

    tag: str | None
    body: bytes
    prompt: str
    api_key: str
    azure_key: str
    status: int = 0
    audit_id: str | None = None
    decision: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    @property
    def secrets(self) -> list[str]:
        return [self.prompt, self.api_key, f"Bearer {self.api_key}", self.azure_key]


def client(proxy: Proxy) -> httpx2.Client:
    return httpx2.Client(proxy=proxy.url, verify=proxy.ssl_context(), timeout=30, trust_env=False)


def send(c: httpx2.Client, tag: str | None) -> Sent:
    """POST a chat completion with a unique prompt and unique credentials."""
    nonce = uuid.uuid4().hex
    s = Sent(tag=tag, body=b"", prompt=f"PROMPT-{nonce}-never-in-the-audit",
             api_key=f"sk-e2e-{nonce}", azure_key=f"azkey-{nonce}")
    s.body = json.dumps({"model": "gpt-4o",
                         "messages": [{"role": "user", "content": s.prompt}]}).encode()
    headers = {"Authorization": f"Bearer {s.api_key}", "api-key": s.azure_key,
               "Content-Type": "application/json"}
    if tag:
        headers[TAG_HEADER] = tag
    r = c.post(CHAT_URL, headers=headers, content=s.body)
    s.status = r.status_code
    s.audit_id = r.headers.get("x-residency-audit-id")
    s.decision = r.headers.get("x-residency-decision")
    return s


EXPECTED_STATUS = {None: 200, "eu": 451, "atlantis": 400}


def verify_cli(*paths: Path, pubkey: Path, anchor: Path | None = None,
               cwd: Path | None = None) -> tuple[int, dict[str, Any]]:
    """`residency-gate audit verify PATH... --pubkey K [--anchor A] --json` -> (exit, report),
    run in both modes (default, and --thorough): they must give the same verdicts."""
    cmd = [str(RESIDENCY_GATE), "audit", "verify", *map(str, paths), "--pubkey", str(pubkey),
           "--json"]
    if anchor is not None:
        cmd += ["--anchor", str(anchor)]
    results = []
    for mode in ([], ["--thorough"]):
        p = subprocess.run(cmd + mode, capture_output=True, timeout=60,
                           cwd=cwd or paths[0].parent, stdin=subprocess.DEVNULL)
        assert p.returncode in (0, 1), f"{cmd}: exit {p.returncode}\n{p.stderr.decode()}"
        try:
            report = json.loads(p.stdout)
        except ValueError:
            pytest.fail(f"{cmd}: not JSON:\n{p.stdout.decode()}\n{p.stderr.decode()}")
        assert report["ok"] is (p.returncode == 0), report
        results.append((p.returncode, report))
    (rc, report), (rc_t, thorough) = results
    assert thorough["mode"] == "thorough" and report["mode"] == "default"
    assert (rc_t, thorough["problems"]) == (rc, report["problems"]), "modes disagree"
    for o, r in report["origins"].items():
        t = thorough["origins"][o]
        for k in ("vouched", "anchored_size", "records", "keys", "start"):
            assert t[k] == r[k], (o, k, t[k], r[k])
    return rc, report


def errors(report: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(p["code"], p["seq"]) for p in report["problems"] if p["severity"] == "error"]


def warnings(report: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(p["code"], p["seq"]) for p in report["problems"] if p["severity"] == "warning"]


def segments(d: Path, origin: str = ORIGIN) -> list[Path]:
    """Plain and compressed segments; names sort in chain order."""
    return sorted(f for f in d.glob(f"{origin}-*.jsonl*") if not f.name.endswith(".tmp"))


def lines_of(f: Path) -> list[bytes]:
    return read_segment(f).splitlines()


def write_lines(f: Path, lines: list[bytes]) -> None:
    """Rewrite a segment's content, compressed again if it was."""
    data = b"".join(x + b"\n" for x in lines)
    if f.name == logical_name(f.name):
        f.write_bytes(data)
        return
    plain = f.with_name(logical_name(f.name))
    plain.write_bytes(data)
    compress_segment(plain, "zstd" if f.name.endswith(".zst") else "gzip")


def records(d: Path, origin: str = ORIGIN) -> list[dict[str, Any]]:
    """Every parseable record of the segments, in chain order."""
    out = []
    for f in segments(d, origin):
        for x in lines_of(f):
            try:
                rec = parse(x)
            except ValueError:
                continue
            if isinstance(rec, dict) and "seq" in rec:
                out.append(rec)
    return out


def find(d: Path, seq: int) -> tuple[Path, int, bytes]:
    """(file, line index, line) of record seq."""
    for f in segments(d):
        for i, x in enumerate(lines_of(f)):
            if parse(x)["seq"] == seq:
                return f, i, x
    raise KeyError(seq)


def pick(d: Path, pred: Callable[[dict[str, Any]], bool], *, interior: bool = True) -> int:
    """seq of the first record matching pred that has a record before and after it in its
    own segment (so that editing it cannot be mistaken for a segment boundary)."""
    for f in segments(d)[1:-1]:
        ls = lines_of(f)
        for i, x in enumerate(ls):
            rec = parse(x)
            if pred(rec) and (not interior or 0 < i < len(ls) - 1):
                return rec["seq"]
    raise AssertionError(f"no record in {d} matches")


def is_blocked_decision(rec: dict[str, Any]) -> bool:
    return rec.get("kind") == "decision" and rec.get("decision") == "block" \
        and rec.get("code") == "outside_requirement"


def last_seq(d: Path) -> int:
    return parse(lines_of(segments(d)[-1])[-1])["seq"]


def seq_of(audit_id: str) -> int:
    _origin, _, seq = audit_id.rpartition(":")
    return int(seq)


def all_bytes(*paths: Path) -> bytes:
    """Every byte of the audit files, compressed segments decompressed."""
    out = b""
    for p in paths:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            out += read_segment(f) if f.name.endswith((".zst", ".gz")) else f.read_bytes()
    return out


# ---------------------------------------------------------------------------
# the log: written by the running proxy over two runs (SIGTERM in between)


@dataclass
class Trail:
    proxy: Proxy
    anchor: Path
    old: Path  # a copy of the audit dir as it was after run 1
    run1: list[Sent] = field(default_factory=list)
    run2: list[Sent] = field(default_factory=list)
    received: list[Any] = field(default_factory=list)  # what the fake provider got
    stop_codes: list[int | None] = field(default_factory=list)
    run1_last_seq: int = -1

    @property
    def audit(self) -> Path:
        return self.proxy.audit_dir

    @property
    def pubkey(self) -> Path:
        return self.proxy.certs_dir / PUBKEY

    @property
    def sent(self) -> list[Sent]:
        return self.run1 + self.run2


@pytest.fixture(scope="module")
def trail(start_module_proxy: Callable[..., Proxy], fake: FakeProvider,
          tmp_path_factory: pytest.TempPathFactory) -> Trail:
    fake.reset()
    keep = tmp_path_factory.mktemp("offhost")
    anchor = keep / "anchor.jsonl"
    proxy = start_module_proxy({"audit": {"origin": ORIGIN, "rotate_bytes": ROTATE,
                                          "anchor": str(anchor)}})
    t = Trail(proxy=proxy, anchor=anchor, old=keep / "audit-after-run1")
    with client(proxy) as c:
        for _ in range(4):
            for tag in (None, "eu", "atlantis"):
                t.run1.append(send(c, tag))
    t.stop_codes.append(proxy.stop())
    shutil.copytree(proxy.audit_dir, t.old)
    t.run1_last_seq = last_seq(proxy.audit_dir)
    # run 2: the same audit dir and keys; the chain must continue
    proxy.start()
    with client(proxy) as c:
        for tag in (None, "eu", None, "eu"):
            t.run2.append(send(c, tag))
    t.stop_codes.append(proxy.stop())
    t.received = fake.requests
    return t


@pytest.fixture
def copy(trail: Trail, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the proxy's audit dir and of its anchor file."""
    d = tmp_path / "audit"
    shutil.copytree(trail.audit, d)
    a = tmp_path / "anchor.jsonl"
    shutil.copy(trail.anchor, a)
    return d, a


# ---------------------------------------------------------------------------
# 1. the untouched log, through the real CLI


def test_real_traffic_log_verifies_ids_match_no_secrets(trail: Trail) -> None:
    assert trail.stop_codes == [0, 0], f"SIGTERM exit codes {trail.stop_codes}\n{trail.proxy.log_text()[-3000:]}"
    for s in trail.sent:
        assert s.status == EXPECTED_STATUS[s.tag], (s.tag, s.status)
        assert s.decision == ("allow" if s.tag is None else "block")
        assert s.audit_id and s.audit_id.startswith(f"{ORIGIN}:"), s.audit_id

    # the real CLI, pinned key and the off-host anchor the proxy wrote
    rc, rep = verify_cli(trail.audit, pubkey=trail.pubkey, anchor=trail.anchor)
    last = last_seq(trail.audit)
    assert rc == 0 and rep["problems"] == [], rep["problems"]
    o = rep["origins"][ORIGIN]
    assert o["vouched"] == [[0, last]]
    assert o["anchored_size"] == last + 1, "the anchor does not cover the whole log"
    assert len(o["files"]) >= 4, f"expected a rotation series, got {o['files']}"
    # the writer compressed rotated segments (audit.compress: zstd, the default): the
    # tamper cases below run on those
    assert len([f for f in o["files"] if f.endswith(".jsonl.zst")]) >= 2, o["files"]
    # the human-readable form agrees
    p = subprocess.run([str(RESIDENCY_GATE), "audit", "verify", str(trail.audit), "--pubkey",
                        str(trail.pubkey)], capture_output=True, text=True, timeout=60,
                       cwd=trail.audit.parent)
    assert p.returncode == 0 and "verified: intact" in p.stdout, p.stdout + p.stderr

    recs = records(trail.audit)
    assert [r["seq"] for r in recs] == list(range(last + 1)), "seq is not 0, 1, 2, ... per origin"
    decisions = {r["id"]: r for r in recs if r["kind"] == "decision"}
    outcomes = {r["decision_id"]: r for r in recs if r["kind"] == "outcome"}
    # every decision record is one a client saw, and the other way round
    assert set(decisions) == {s.audit_id for s in trail.sent}
    for s in trail.sent:
        rec = decisions[s.audit_id]
        assert rec["id"] == f"{ORIGIN}:{rec['seq']}"
        assert rec["decision"] == s.decision
        assert rec["status"] == (0 if s.status == 200 else s.status)
        assert rec["body_sha256"] == s.sha256 and rec["body_bytes"] == len(s.body)
        assert rec["url"] == CHAT_URL and rec["method"] == "POST"
        assert outcomes[s.audit_id]["status"] == s.status
        assert outcomes[s.audit_id]["seq"] > rec["seq"]
    # only allowed requests reached the provider, each exactly once
    got = sorted(hashlib.sha256(r.body).hexdigest() for r in trail.received)
    assert got == sorted(s.sha256 for s in trail.sent if s.status == 200)
    # the secrets were really sent (the provider saw them) and are nowhere in the trail
    allowed = next(s for s in trail.sent if s.status == 200)
    fwd = next(r for r in trail.received if hashlib.sha256(r.body).hexdigest() == allowed.sha256)
    assert fwd.header("authorization") == f"Bearer {allowed.api_key}"
    assert allowed.prompt.encode() in fwd.body
    everything = all_bytes(trail.audit, trail.anchor)
    leaked = [x for s in trail.sent for x in s.secrets if x.encode() in everything]
    assert leaked == [], f"secrets in the audit files: {leaked}"

    # a restart is visible, and the chain continued without reusing a seq
    starts = [r for r in recs if r["kind"] == "start"]
    assert [r["seq"] for r in starts] == [0, trail.run1_last_seq + 1]
    assert min(seq_of(s.audit_id) for s in trail.run2) > trail.run1_last_seq


# ---------------------------------------------------------------------------
# 2. tamper cases (shared/reference/audit.md), each on a copy of the proxy's log


def _edit(old: bytes, new: bytes) -> Callable[[Path, int], None]:
    def tamper(d: Path, seq: int) -> None:
        f, i, x = find(d, seq)
        assert old in x
        ls = lines_of(f)
        ls[i] = x.replace(old, new, 1)
        assert len(ls[i]) == len(x)
        write_lines(f, ls)
    return tamper


def _one_byte(d: Path, seq: int) -> None:
    """One byte of the record's content (in a compressed segment: of what it decompresses to,
    compressed again; a byte of the compressed stream may not decompress at all)."""
    f, i, x = find(d, seq)
    pos = x.index(b'"body_sha256":"') + len(b'"body_sha256":"')
    y = bytearray(x)
    y[pos] = ord("0") if y[pos] != ord("0") else ord("1")
    ls = lines_of(f)
    ls[i] = bytes(y)
    write_lines(f, ls)


@pytest.mark.parametrize("tamper", [
    _edit(b'"decision":"block"', b'"decision":"allow"'),
    _edit(b'"status":451', b'"status":200'),
    _one_byte,
], ids=["block-to-allow", "451-to-200", "one-byte-of-digest"])
def test_02_record_changed(trail: Trail, copy: tuple[Path, Path], tamper: Callable) -> None:
    d, anchor = copy
    s = pick(d, is_blocked_decision)
    tamper(d, s)
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1
    assert errors(rep) == [("bad-signature", s), ("hash-mismatch", s + 1)]
    f, i, _ = find(d, s)
    assert rep["problems"][0]["file"] == str(f) and rep["problems"][0]["line"] == i + 1
    # it vouches for the records on either side, not for the altered one
    assert rep["origins"][ORIGIN]["vouched"] == [[0, s - 1], [s + 1, last_seq(d)]]


def test_03_changed_and_later_prevs_recomputed(trail: Trail, copy: tuple[Path, Path]) -> None:
    d, anchor = copy
    s = pick(d, is_blocked_decision)
    prev = None
    for f in segments(d):
        out = []
        for x in lines_of(f):
            rec = parse(x)
            if rec["seq"] == s:
                rec["decision"], rec["status"] = "allow", 0
            if prev is not None and rec["seq"] > s:
                rec["prev"] = prev
            y = canonical(rec) if rec["seq"] >= s else x
            prev = line_hash(y)
            out.append(y)
        write_lines(f, out)
    (d / f"checkpoints-{ORIGIN}.jsonl").unlink()  # it would disagree with the new heads
    last = last_seq(d)
    rc, rep = verify_cli(d, pubkey=trail.pubkey)  # the chain links again; signatures do not
    assert rc == 1
    assert errors(rep) == [("bad-signature", n) for n in range(s, last + 1)]
    assert rep["origins"][ORIGIN]["vouched"] == [[0, s - 1]]
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1 and {c for c, _ in errors(rep)} == {"bad-signature", "rollback"}
    assert all(p["file"] == str(anchor) for p in rep["problems"] if p["code"] == "rollback")


def _delete(d: Path, s: int) -> list[tuple[str, int]]:
    f, i, _ = find(d, s)
    ls = lines_of(f)
    del ls[i]
    write_lines(f, ls)
    return [("seq-gap", s + 1)]


def _insert_copy(d: Path, s: int) -> list[tuple[str, int]]:
    _f, _i, early = find(d, 1)  # an authentic record, replayed later
    f, i, _ = find(d, s)
    ls = lines_of(f)
    ls.insert(i, early)
    write_lines(f, ls)
    return [("duplicate", 1)]


def _insert_forged(d: Path, s: int) -> list[tuple[str, int]]:
    f, i, x = find(d, s)
    rec = parse(x)
    rec["decision"], rec["status"] = "allow", 0
    other = SigningKey.generate()
    rec["key_id"] = other.key_id
    ls = lines_of(f)
    ls.insert(i, sign_record(rec, other))
    write_lines(f, ls)
    return [("unknown-key", s), ("duplicate", s)]


def _duplicate(d: Path, s: int) -> list[tuple[str, int]]:
    f, i, x = find(d, s)
    ls = lines_of(f)
    ls.insert(i + 1, x)
    write_lines(f, ls)
    return [("duplicate", s)]


def _swap(d: Path, s: int) -> list[tuple[str, int]]:
    f, i, _ = find(d, s)
    ls = lines_of(f)
    ls[i], ls[i + 1] = ls[i + 1], ls[i]
    write_lines(f, ls)
    return [("reorder", s + 1), ("reorder", s)]


@pytest.mark.parametrize("tamper", [_delete, _insert_copy, _insert_forged, _duplicate, _swap],
                         ids=["deleted", "inserted-replay", "inserted-forged", "duplicated",
                              "swapped"])
def test_04_records_deleted_inserted_duplicated_swapped(
    trail: Trail, copy: tuple[Path, Path], tamper: Callable
) -> None:
    d, anchor = copy
    s = pick(d, is_blocked_decision)
    f, i, _ = find(d, s)
    assert i + 1 < len(lines_of(f)), "the record after it must be in the same segment"
    expected = tamper(d, s)
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1
    assert errors(rep) == expected


def test_05_tail_deleted(trail: Trail, copy: tuple[Path, Path]) -> None:
    d, anchor = copy
    full_last = last_seq(d)
    segs = segments(d)
    segs[-1].unlink()
    ls = lines_of(segs[-2])
    write_lines(segs[-2], ls[:-1])
    kept = parse(ls[-2])["seq"]
    assert kept < full_last - 1
    # an attacker who forgets the local checkpoints file is caught by it
    rc, rep = verify_cli(d, pubkey=trail.pubkey)
    assert rc == 1 and {c for c, _ in errors(rep)} == {"rollback"}
    assert errors(rep)[-1] == ("rollback", full_last)
    # one who deletes it too: every prefix verifies; the verifier says what it vouches for
    (d / f"checkpoints-{ORIGIN}.jsonl").unlink()
    rc, rep = verify_cli(d, pubkey=trail.pubkey)
    assert rc == 0 and rep["problems"] == []
    assert rep["origins"][ORIGIN]["vouched"] == [[0, kept]]
    assert rep["origins"][ORIGIN]["anchored_size"] is None
    # the anchor the proxy exported (kept off the host) catches it
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1 and errors(rep) == [("rollback", full_last)]
    assert rep["problems"][0]["file"] == str(anchor)


def test_06_middle_segment_deleted(trail: Trail, copy: tuple[Path, Path]) -> None:
    d, anchor = copy
    segs = segments(d)
    assert len(segs) >= 4
    middle = segs[2]
    first_missing = parse(lines_of(middle)[0])["seq"]
    next_first = parse(lines_of(segs[3])[0])["seq"]
    middle.unlink()
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1 and errors(rep) == [("missing-file", next_first)]
    msg = rep["problems"][0]["message"]
    assert f"{first_missing}-{next_first - 1}" in msg and logical_name(middle.name) in msg


def test_07_directory_restored_from_older_copy(trail: Trail, copy: tuple[Path, Path]) -> None:
    d, anchor = copy
    shutil.rmtree(d)
    shutil.copytree(trail.old, d)  # the log (and its local checkpoints) as after run 1
    assert last_seq(d) == trail.run1_last_seq < last_seq(trail.audit)
    rc, rep = verify_cli(d, pubkey=trail.pubkey)
    assert rc == 0, "without the anchor an older log is indistinguishable"
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1 and errors(rep) == [("rollback", last_seq(trail.audit))]
    assert rep["problems"][0]["file"] == str(anchor)


def test_07_one_segment_restored_from_older_copy(trail: Trail, copy: tuple[Path, Path]) -> None:
    """Run 2 appended to the segment run 1 ended in; restore that segment alone."""
    d, anchor = copy
    seg = segments(trail.old)[-1]
    now = next(f for f in segments(d) if logical_name(f.name) == logical_name(seg.name))
    assert read_segment(now) != read_segment(seg), "run 2 did not append to it"
    now.unlink()
    shutil.copy(seg, d / seg.name)
    after = next(f for f in segments(d)
                 if logical_name(f.name) > logical_name(seg.name))
    first_after = parse(lines_of(after)[0])["seq"]
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1
    assert errors(rep) == [("missing-file", first_after)]
    assert f"{trail.run1_last_seq + 1}-{first_after - 1}" in rep["problems"][0]["message"]


def test_08_regenerated_under_another_key(trail: Trail, copy: tuple[Path, Path]) -> None:
    d, anchor = copy
    other = SigningKey.generate()
    prev = ZERO_HASH
    for f in segments(d):
        out = []
        for x in lines_of(f):
            rec = parse(x)
            rec.pop("sig")
            rec["prev"], rec["key_id"] = prev, other.key_id
            if rec["kind"] == "checkpoint":
                rec["head"] = prev
            y = sign_record(rec, other)
            prev = line_hash(y)
            out.append(y)
        write_lines(f, out)
    cps = d / f"checkpoints-{ORIGIN}.jsonl"
    cps.unlink()
    last = last_seq(d)
    rc, rep = verify_cli(d, pubkey=trail.pubkey)
    assert rc == 1
    assert errors(rep) == [("unknown-key", n) for n in range(last + 1)]
    assert rep["origins"][ORIGIN]["vouched"] == []
    # ... trusted only by someone who takes the attacker's key: then it is self-consistent
    pub = d.parent / "attacker.pub.pem"
    pub.write_bytes(other.public.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    assert verify_cli(d, pubkey=pub)[0] == 0
    rc, rep = verify_cli(d, pubkey=pub, anchor=anchor)  # the anchor still knows the truth
    assert rc == 1 and "unknown-key" in {c for c, _ in errors(rep)}


@pytest.mark.parametrize("style", ["whitespace", "key-order", "escaped"])
def test_09_record_reserialised_not_canonical(trail: Trail, copy: tuple[Path, Path],
                                              style: str) -> None:
    d, anchor = copy
    s = pick(d, is_blocked_decision)
    f, i, x = find(d, s)
    rec = parse(x)
    if style == "whitespace":
        new = json.dumps(rec, sort_keys=True).encode()
    elif style == "key-order":
        new = json.dumps(dict(reversed(list(rec.items()))), separators=(",", ":")).encode()
    else:
        new = x.replace(b'"decision":"block"', b'"decision":"bl\\u006fck"')
    assert new != x and parse(new) == rec
    ls = lines_of(f)
    ls[i] = new
    write_lines(f, ls)
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1
    # the content (and so the signature) is unchanged; the bytes, and so the next prev, are not
    assert errors(rep) == [("not-canonical", s), ("hash-mismatch", s + 1)]


def test_10_torn_last_line_then_proxy_resumes(
    trail: Trail, copy: tuple[Path, Path], start_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    d, anchor = copy
    last = segments(d)[-1]
    data = last.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn_seq = parse(data[start:-1])["seq"]
    last.write_bytes(data[: start + 40])  # the crash tore the final record
    torn_len = 40
    # a crash before the record was durable also means its checkpoint was never exported
    for cp in (d / f"checkpoints-{ORIGIN}.jsonl", anchor):
        write_lines(cp, lines_of(cp)[:-1])
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 0, rep["problems"]
    assert errors(rep) == [] and warnings(rep) == [("torn-tail", None)]
    assert rep["origins"][ORIGIN]["vouched"] == [[0, torn_seq - 1]]

    # the proxy restarted on it records the torn bytes and resumes the chain after them
    proxy = start_proxy({"certs_dir": str(trail.proxy.certs_dir),
                         "audit": {"dir": str(d), "origin": ORIGIN, "rotate_bytes": ROTATE,
                                   "anchor": str(anchor)}})
    with client(proxy) as c:
        sent = [send(c, None), send(c, "eu")]
    assert proxy.stop() == 0
    assert [s.status for s in sent] == [200, 451]
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 0, rep["problems"]
    assert errors(rep) == [] and warnings(rep) == [("torn-tail", None)]
    assert "recovered" in rep["problems"][0]["message"]
    new_last = last_seq(d)
    assert rep["origins"][ORIGIN]["vouched"] == [[0, new_last]]
    assert rep["origins"][ORIGIN]["anchored_size"] == new_last + 1
    recs = {r["seq"]: r for r in records(d)}
    torn = recs[torn_seq]
    assert torn["kind"] == "torn_tail"
    assert (torn["file"], torn["offset"], torn["length"]) == (last.name, start, torn_len)
    assert recs[torn_seq + 1]["kind"] == "start"
    ids = {r["id"] for r in recs.values() if r["kind"] == "decision"}
    assert {s.audit_id for s in sent} <= ids
    assert min(seq_of(s.audit_id) for s in sent) > torn_seq + 1


@pytest.mark.parametrize("junk", [b"garbage\n", b'{"a":1}\n', b"\x00\x01\x02\n", b"{}x"],
                         ids=["text", "json", "binary", "unterminated"])
def test_11_bytes_appended(trail: Trail, copy: tuple[Path, Path], junk: bytes) -> None:
    d, anchor = copy
    with open(segments(d)[-1], "ab") as fh:
        fh.write(junk)
    rc, rep = verify_cli(d, pubkey=trail.pubkey, anchor=anchor)
    assert rc == 1 and errors(rep) == [("trailing-data", None)]


# ---------------------------------------------------------------------------
# 3. SIGKILL under heavy traffic


def test_sigkill_under_load_loses_no_answered_decision(
    start_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    origin = "e2e-kill"
    proxy = start_proxy({"audit": {"origin": origin, "rotate_bytes": 64 << 10}})
    got: list[Sent] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed = threading.Event()

    def worker(n: int) -> None:
        tag = "eu" if n % 3 == 0 else None
        with client(proxy) as c:
            while not stop.is_set():
                try:
                    s = send(c, tag)
                except Exception as e:  # the proxy died under us
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                    if killed.is_set():
                        return
                    continue
                with lock:
                    got.append(s)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(16)]
    for t in threads:
        t.start()
    # Kill mid-traffic once enough has been answered (count-driven, not a throughput
    # test: a loaded CI machine only makes this take longer).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            before = len(got)
            n_allowed = sum(1 for s in got if s.status == 200)
        if before >= 300 and n_allowed >= 100:
            break
        time.sleep(0.05)
    killed.set()
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait(10)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    with lock:
        answered = list(got)
    n_allowed = sum(1 for s in answered if s.status == 200)
    assert before >= 300, f"only {before} requests answered in 30 s: not heavy traffic"
    assert n_allowed >= 100, (
        f"only {n_allowed} allowed requests answered in 30 s: forwarding "
        "stalled (see test_keepalive_client_not_stalled_after_five_requests)")
    assert failures, "no client noticed the kill: it did not happen mid-traffic"
    pre_kill = list(got)
    assert all(s.audit_id for s in pre_kill), "an answered request without an audit id"
    for s in pre_kill:
        assert s.status == EXPECTED_STATUS[s.tag], (s.tag, s.status)
    max_seen = max(seq_of(s.audit_id) for s in pre_kill)

    proxy.start()  # same config, audit dir and keys
    with client(proxy) as c:
        after = [send(c, None), send(c, "eu"), send(c, None)]
    assert proxy.stop() == 0
    assert [s.status for s in after] == [200, 451, 200]

    rc, rep = verify_cli(proxy.audit_dir, pubkey=proxy.certs_dir / PUBKEY)
    assert rc == 0, rep["problems"][:10]
    assert {c for c, _ in warnings(rep)} <= {"torn-tail"}
    recs = records(proxy.audit_dir, origin)
    seqs = [r["seq"] for r in recs]
    assert len(seqs) == len(set(seqs)), "a seq was reused"
    assert seqs == list(range(len(seqs))), "the chain has a hole"
    decisions = {r["id"]: r for r in recs if r["kind"] == "decision"}
    missing = [s.audit_id for s in pre_kill + after if s.audit_id not in decisions]
    assert missing == [], f"{len(missing)} answered decisions are not in the log: {missing[:5]}"
    for s in pre_kill + after:
        assert decisions[s.audit_id]["decision"] == s.decision
        assert decisions[s.audit_id]["body_sha256"] == s.sha256
    starts = [r["seq"] for r in recs if r["kind"] == "start"]
    assert len(starts) == 2 and starts[1] > max_seen
    assert min(seq_of(s.audit_id) for s in after) > starts[1]
    # nothing reached the provider without a durable "allow" decision for exactly that body
    allowed = {r["body_sha256"] for r in decisions.values() if r["decision"] == "allow"}
    received = fake.requests
    assert len(received) >= sum(1 for s in pre_kill if s.status == 200)
    unaudited = [r for r in received if hashlib.sha256(r.body).hexdigest() not in allowed]
    assert unaudited == [], f"{len(unaudited)} requests forwarded without a decision record"


def test_keepalive_client_not_stalled_after_five_requests(
    start_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    """Found by the test above: one keep-alive client connection, allowed requests in a
    row (or mixed with blocked ones); the 6th used to wait for an idle upstream connection
    to time out (mitmproxy caps upstream connections per address, and `resolve` left them
    under the IP so none was ever reused)."""
    proxy = start_proxy({"audit": {"origin": "e2e-keepalive"}})
    with httpx2.Client(proxy=proxy.url, verify=proxy.ssl_context(), timeout=5,
                       trust_env=False) as c:
        statuses = []
        for tag in (None, "eu") * 2 + (None,) * 6:
            t0 = time.monotonic()
            statuses.append(send(c, tag).status)
            assert time.monotonic() - t0 < 3, f"request {len(statuses)} took {time.monotonic() - t0:.1f}s"
    assert statuses == [200, 451, 200, 451] + [200] * 6
    assert len(fake.requests) == 8


# ---------------------------------------------------------------------------
# 4. readiness, and failing closed when the audit log cannot be written


def _get(url: str) -> tuple[int, dict[str, Any]]:
    r = httpx2.get(url, timeout=10, trust_env=False)
    return r.status_code, r.json()


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.extend(int(c) for c in text)
    return out


def test_write_failure_refuses_llm_traffic_and_reports_unready(
    start_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    admin = free_port()
    proxy = start_proxy({"admin": f"127.0.0.1:{admin}", "audit": {"origin": "e2e-ready"}})
    readyz = f"http://127.0.0.1:{admin}/readyz"
    deadline = time.monotonic() + 10
    while True:
        try:
            status, body = _get(readyz)
            break
        except httpx2.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert status == 200 and body["ready"] is True and body["checks"]["audit"] is True, body

    with client(proxy) as c:
        ok = [send(c, None) for _ in range(4)]
        assert [s.status for s in ok] == [200] * 4
        seg = segments(proxy.audit_dir, "e2e-ready")[-1]
        # wait for the last outcome record, then allow no byte more: the next write fails
        # with EFBIG, for root too (chmod would not stop root)
        def outcome_written() -> bool:
            return any(r.get("kind") == "outcome" and r.get("decision_id") == ok[-1].audit_id
                       for r in (json.loads(line) for line in seg.read_bytes().splitlines()
                                 if line.strip()))

        deadline = time.monotonic() + 20
        while not outcome_written():
            assert time.monotonic() < deadline, "outcome record never written"
            time.sleep(0.02)
        size = seg.stat().st_size
        assert proxy.stderr_path.stat().st_size < size - 1024, "stderr would hit the limit first"
        fake.reset()
        # The proxy and its audit writer process (which does the writing) alike.
        for pid in [proxy.pid, *child_pids(proxy.pid)]:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, size))
        refused = send(c, None)
        assert refused.status == 503, refused.status
        assert refused.decision != "allow"
        again = send(c, "eu")
        assert again.status == 503
    assert fake.requests == [], "a request was forwarded after the audit log failed"
    status, body = _get(readyz)
    assert status == 503 and body["ready"] is False and body["failing"].get("audit") is False, body
    assert seg.stat().st_size == size
    deadline = time.monotonic() + 5
    while "AUDIT LOG WRITE FAILED" not in proxy.stderr_path.read_text():
        assert time.monotonic() < deadline, proxy.log_text()[-2000:]
        time.sleep(0.05)
    assert seg.name in proxy.stderr_path.read_text()
    proxy.stop()
    # what was written before the failure still verifies, and holds no record of the refusals
    rc, rep = verify_cli(proxy.audit_dir, pubkey=proxy.certs_dir / PUBKEY)
    assert rc == 0 and errors(rep) == [], rep["problems"]
    ids = {r.get("id") for r in records(proxy.audit_dir, "e2e-ready")}
    assert {s.audit_id for s in ok} <= ids


# ---------------------------------------------------------------------------
# 5. the report a security lead opens, of the proxy's own trail, one record forged


def test_report_of_a_tampered_trail_rendered_in_chromium(trail: Trail, copy: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    from browser import Browser

    d, anchor = copy
    s = pick(d, is_blocked_decision)
    _edit(b'"decision":"block"', b'"decision":"allow"')(d, s)
    page = tmp_path / "report.html"
    p = subprocess.run([str(RESIDENCY_GATE), "audit", "report", str(d), "--html", str(page),
                        "--pubkey", str(trail.pubkey), "--anchor", str(anchor)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "1 record(s) did not verify" in p.stdout, p.stdout + p.stderr
    blocked = sum(1 for x in trail.sent if x.decision == "block")
    allowed = sum(1 for x in trail.sent if x.decision == "allow")
    views = {}
    with Browser() as b:
        for width in (1280, 390):
            v = views[width] = b.render(page, width, screenshot=tmp_path / f"r{width}.png")
            assert v.title.startswith("VERIFICATION FAILED"), v.title
            assert v.first.startswith("VERIFICATION FAILED") and v.first_top < 40
            assert "bad-signature" in v.first
            assert v.scroll_width <= v.inner_width, f"wider than {width} px"
    text = views[1280].text
    # the forged allow is counted neither as an allow nor, altered, as a block
    assert "Records that did not verify (1)" in text
    assert f"Blocked flows ({blocked - 1})" in text
    counts = text[text.index(f"Decisions ({len(trail.sent) - 1})"):].splitlines()
    assert [str(allowed), str(blocked - 1), "0", "0", str(len(trail.sent) - 1)] in [
        line.split() for line in counts[:6]], counts[:6]
    unverified = text[text.index("Records that did not verify"):]
    assert f"did not verify\t{s}\tdecision\tallow" in unverified
    assert "covers seq 0-" in text  # the anchor given vouched for the log (up to the edit)
