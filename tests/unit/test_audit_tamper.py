"""The tamper cases of shared/reference/audit.md against a log written by AuditWriter."""

import asyncio
import json
import shutil

import pytest

from residency_gate.audit.canonical import canonical, parse
from residency_gate.audit.chain import line_hash, segment_name, sign_record
from residency_gate.audit.keys import SigningKey, load_or_create_signing_key
from residency_gate.audit.segments import compress_segment
from residency_gate.audit.verify import verify, verify_bytes
from residency_gate.audit.writer import AuditWriter

ORIGIN = "gw-1"


def decision(i):
    return {
        "client": "10.20.0.7", "user": None, "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions", "host": "api.openai.com",
        "provider": "openai", "endpoint": "chat", "model": "gpt-4o",
        "requirement": ["eu"], "requirement_sources": ["header"], "places": ["us"],
        "decision": "block" if i % 3 == 0 else "allow", "reason": "processing in us",
        "status": 451 if i % 3 == 0 else None, "body_sha256": "ab" * 32,
    }


def write(directory, key, n, anchor=None, **kw):
    async def go():
        w = AuditWriter(directory, key, ORIGIN, anchor_file=anchor, **kw)
        w.open()
        recs = []
        for i in range(n):
            rec = await w.append("decision", decision(i))
            recs.append(rec)
            await w.append("outcome", {"decision_id": rec["id"], "status": 200,
                                       "bytes_in": 10, "bytes_out": 20, "duration_ms": 3,
                                       "error": None})
        await w.close()
        return recs
    return asyncio.run(go())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    key = load_or_create_signing_key(root / "certs")
    write(root / "audit", key, 12, anchor=root / "anchor.jsonl", rotate_bytes=4000,
          checkpoint_every=10)
    return root, key


@pytest.fixture
def log(base, tmp_path):
    root, key = base
    shutil.copytree(root / "audit", tmp_path / "audit")
    shutil.copy(root / "anchor.jsonl", tmp_path / "anchor.jsonl")
    return tmp_path / "audit", key, tmp_path / "anchor.jsonl"


def segments(d):
    return sorted(f for f in d.glob("gw-1-*.jsonl*") if not f.name.endswith(".tmp"))


def find(d, seq):
    """(file, line index, line bytes) of record seq."""
    for f in segments(d):
        for i, x in enumerate(f.read_bytes().splitlines()):
            if parse(x)["seq"] == seq:
                return f, i, x
    raise KeyError(seq)


def set_line(f, i, new):
    lines = f.read_bytes().splitlines()
    lines[i] = new
    f.write_bytes(b"".join(x + b"\n" for x in lines))


def run(d, key, anchor=None, **kw):
    return verify([d], {key.key_id: key.public}, anchor, **kw)


VARIANTS = ["default-plain", "thorough-plain", "default-zst", "thorough-gz"]


@pytest.fixture(params=VARIANTS)
def check(request):
    """The verifier in both modes, on plain and on compressed segments: the same verdicts.
    Compressed: every segment but the newest is compressed (as the writer leaves them)
    just before verifying; line numbers are those of the content."""
    mode, storage = request.param.split("-")

    def check(d, key, anchor=None):
        if storage != "plain":
            for f in segments(d)[:-1]:
                if f.name.endswith(".jsonl"):
                    compress_segment(f, "zstd" if storage == "zst" else "gzip")
            assert segments(d)[-1].name.endswith(".jsonl")
        rep = run(d, key, anchor, thorough=mode == "thorough", jobs=1)
        assert rep.mode == mode
        return rep
    return check


def same_file(name, f):
    """The plain segment f, or its compressed copy."""
    return name in (str(f), f"{f}.zst", f"{f}.gz")


def verdicts(rep, severity="error"):
    return [(p.code, p.seq) for p in rep.problems if p.severity == severity]


def last_seq(d):
    return parse(segments(d)[-1].read_bytes().splitlines()[-1])["seq"]


# 1 -------------------------------------------------------------------------------------
def test_01_untouched(log, check):
    d, key, anchor = log
    rep = check(d, key, anchor)
    assert rep.ok and rep.problems == []
    assert len(segments(d)) >= 3
    assert rep.origins[ORIGIN].vouched == [(0, last_seq(d))]
    assert rep.origins[ORIGIN].anchored_size == last_seq(d) + 1


# 2 -------------------------------------------------------------------------------------
def test_02_one_byte_changed(log, check):
    d, key, anchor = log
    f, i, x = find(d, 7)  # decision 3: blocked
    assert b'"decision":"block"' in x
    set_line(f, i, x.replace(b'"decision":"block"', b'"decision":"allow"'))
    rep = check(d, key, anchor)
    assert verdicts(rep) == [("bad-signature", 7), ("hash-mismatch", 8)]
    assert same_file(rep.problems[0].file, f) and rep.problems[0].line == i + 1


# 3 -------------------------------------------------------------------------------------
def test_03_changed_and_later_prev_recomputed(log, check):
    d, key, anchor = log
    prev = None
    for f in segments(d):
        out = []
        for x in f.read_bytes().splitlines():
            rec = parse(x)
            if rec["seq"] == 7:
                rec["decision"] = "allow"
            if prev is not None and rec["seq"] > 7:
                rec["prev"] = prev
            x2 = canonical(rec) if rec["seq"] >= 7 else x
            prev = line_hash(x2)
            out.append(x2)
        f.write_bytes(b"".join(y + b"\n" for y in out))
    (d / "checkpoints-gw-1.jsonl").unlink()  # it would disagree with the new heads
    rep = check(d, key)  # the chain links again, but the signatures do not
    assert {c for c, _ in verdicts(rep)} == {"bad-signature"}
    assert [s for _, s in verdicts(rep)] == list(range(7, last_seq(d) + 1))
    assert rep.origins[ORIGIN].vouched == [(0, 6)]
    # the checkpoints exported before the edit disagree with the new heads
    assert {c for c, _ in verdicts(check(d, key, anchor))} == {"bad-signature", "rollback"}


# 4 -------------------------------------------------------------------------------------
def _delete(d, key):
    f, i, _ = find(d, 5)
    lines = f.read_bytes().splitlines()
    del lines[i]
    f.write_bytes(b"".join(x + b"\n" for x in lines))


def _duplicate(d, key):
    f, i, x = find(d, 5)
    lines = f.read_bytes().splitlines()
    lines.insert(i + 1, x)
    f.write_bytes(b"".join(y + b"\n" for y in lines))


def _insert_copy(d, key):
    _f, _i, x = find(d, 2)
    f, i, _ = find(d, 6)
    lines = f.read_bytes().splitlines()
    lines.insert(i, x)
    f.write_bytes(b"".join(y + b"\n" for y in lines))


def _insert_forged(d, key):
    f, i, x = find(d, 5)
    rec = parse(x)
    rec["decision"] = "allow"
    other = SigningKey.generate()
    rec["key_id"] = other.key_id
    forged = sign_record(rec, other)
    lines = f.read_bytes().splitlines()
    lines.insert(i, forged)
    f.write_bytes(b"".join(y + b"\n" for y in lines))


def _swap(d, key):
    f, i, _ = find(d, 5)
    lines = f.read_bytes().splitlines()
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    f.write_bytes(b"".join(y + b"\n" for y in lines))


@pytest.mark.parametrize(("tamper", "expected"), [
    (_delete, [("seq-gap", 6)]),
    (_duplicate, [("duplicate", 5)]),
    (_insert_copy, [("duplicate", 2)]),
    (_insert_forged, [("unknown-key", 5), ("duplicate", 5)]),
    (_swap, [("reorder", 6), ("reorder", 5)]),
])
def test_04_delete_insert_duplicate_swap(log, tamper, expected, check):
    d, key, anchor = log
    tamper(d, key)
    rep = check(d, key, anchor)
    assert verdicts(rep) == expected


# 5 -------------------------------------------------------------------------------------
def test_05_tail_deleted(log, check):
    d, key, anchor = log
    segs = segments(d)
    lines = segs[-1].read_bytes().splitlines()  # the deleted tail ends here
    segs[-1].unlink()
    prev_lines = segs[-2].read_bytes().splitlines()
    segs[-2].write_bytes(b"".join(x + b"\n" for x in prev_lines[:-1]))
    (d / "checkpoints-gw-1.jsonl").unlink()  # the attacker covers the local checkpoints too
    kept = parse(prev_lines[-2])["seq"]
    rep = check(d, key)
    # without an anchor every prefix verifies: the verifier says what it can vouch for
    assert rep.ok and rep.problems == []
    assert rep.origins[ORIGIN].vouched == [(0, kept)]
    assert rep.origins[ORIGIN].anchored_size is None
    rep = check(d, key, anchor)
    assert verdicts(rep) == [("rollback", last_seq_from(lines))]
    assert rep.problems[0].file == str(anchor)


def last_seq_from(lines):
    return parse(lines[-1])["seq"]


# 6 -------------------------------------------------------------------------------------
def test_06_middle_segment_deleted(log, check):
    d, key, _anchor = log
    segs = segments(d)
    middle = segs[1]
    first_missing = parse(middle.read_bytes().splitlines()[0])["seq"]
    next_first = parse(segs[2].read_bytes().splitlines()[0])["seq"]
    middle.unlink()
    rep = check(d, key)
    assert verdicts(rep) == [("missing-file", next_first)]
    assert f"{first_missing}-{next_first - 1}" in rep.problems[0].message
    assert middle.name in rep.problems[0].message


# 7 -------------------------------------------------------------------------------------
def test_07_file_restored_from_older_copy(tmp_path, check):
    key = load_or_create_signing_key(tmp_path / "certs")
    d, anchor = tmp_path / "audit", tmp_path / "anchor.jsonl"
    write(d, key, 3, anchor=anchor)
    old = tmp_path / "old"
    shutil.copytree(d, old)
    write(d, key, 3, anchor=anchor)  # restart, same segment keeps growing
    for f in old.iterdir():  # restore the older copy (log and local checkpoints)
        shutil.copy(f, d / f.name)
    assert check(d, key).ok  # indistinguishable from an older log without the anchor
    rep = check(d, key, anchor)
    assert {c for c, _ in verdicts(rep)} == {"rollback"}
    assert all(p.file == str(anchor) for p in rep.errors)


# 8 -------------------------------------------------------------------------------------
def test_08_regenerated_under_another_key(log, tmp_path, check):
    d, key, anchor = log
    shutil.rmtree(d)
    other = load_or_create_signing_key(tmp_path / "other-certs")
    write(d, other, 12, rotate_bytes=4000, checkpoint_every=10)
    rep = check(d, key)
    assert {c for c, _ in verdicts(rep)} == {"unknown-key"}
    assert rep.origins[ORIGIN].vouched == []
    assert "unknown-key" in {c for c, _ in verdicts(check(d, key, anchor))}


# 9 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["whitespace", "key-order", "escaped"])
def test_09_not_canonical(log, style, check):
    d, key, anchor = log
    f, i, x = find(d, 4)
    rec = parse(x)
    if style == "whitespace":
        new = json.dumps(rec, sort_keys=True).encode()
    elif style == "key-order":
        new = json.dumps(dict(reversed(list(rec.items()))), separators=(",", ":")).encode()
    else:
        new = x.replace(b'"origin":"gw-1"', b'"origin":"g\\u0077-1"')
    assert new != x and parse(new) == rec
    set_line(f, i, new)
    rep = check(d, key, anchor)
    # the content (and so the signature) is unchanged; the bytes, and so the next prev, are not
    assert verdicts(rep) == [("not-canonical", 4), ("hash-mismatch", 5)]


# 10 ------------------------------------------------------------------------------------
def test_10_torn_last_line(log, check):
    d, key, _anchor = log
    last = segments(d)[-1]
    data = last.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn_seq = parse(data[start:-1])["seq"]
    last.write_bytes(data[: start + 40])
    cpf = d / "checkpoints-gw-1.jsonl"  # crash before its checkpoint was exported
    cpf.write_bytes(b"".join(x + b"\n" for x in cpf.read_bytes().splitlines()[:-1]))
    rep = check(d, key)
    assert rep.ok
    assert [(p.code, p.severity) for p in rep.problems] == [("torn-tail", "warning")]
    assert rep.origins[ORIGIN].vouched == [(0, torn_seq - 1)]
    # restart: the writer records the torn line and resumes the chain after it
    write(d, key, 1)
    rep = check(d, key)
    assert rep.ok and [p.code for p in rep.problems] == ["torn-tail"]
    assert "recovered" in rep.problems[0].message
    assert rep.origins[ORIGIN].vouched == [(0, last_seq(d))]


# 11 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("junk", [b"garbage\n", b"garbage", b'{"a":1}\n', b"\n",
                                  b'{"a":1}x', b"\x00\x01\x02\n"])
def test_11_bytes_appended(log, junk, check):
    d, key, anchor = log
    last = segments(d)[-1]
    with open(last, "ab") as fh:
        fh.write(junk)
    rep = check(d, key, anchor)
    assert verdicts(rep) == [("trailing-data", None)]


# 12 ------------------------------------------------------------------------------------
def test_12_every_single_bit_flip_detected(tmp_path):
    key = load_or_create_signing_key(tmp_path / "certs")
    d = tmp_path / "audit"

    async def go():
        w = AuditWriter(d, key, ORIGIN)
        w.open()
        for i in range(3):
            await w.append("decision", {"decision": "allow", "n": i})
        await w.close()
    asyncio.run(go())
    seg = d / segment_name(ORIGIN, 0)
    data = seg.read_bytes()
    assert data.count(b"\n") == 5
    cps = {"checkpoints-gw-1.jsonl": (d / "checkpoints-gw-1.jsonl").read_bytes()}
    keys = {key.key_id: key.public}
    assert verify_bytes({seg.name: data}, cps, keys).problems == []
    missed = []
    buf = bytearray(data)
    for pos in range(len(data)):
        for bit in range(8):
            buf[pos] ^= 1 << bit
            rep = verify_bytes({seg.name: bytes(buf)}, cps, keys)
            if rep.ok:
                missed.append((pos, bit))
            buf[pos] ^= 1 << bit
    assert missed == []


# 13 ------------------------------------------------------------------------------------
def test_13_killed_at_every_write(tmp_path):
    """Cut the log at every byte of its last batch (a crash mid-write or before the fsync
    completed), restart: the log verifies and no acknowledged record is lost."""
    key = load_or_create_signing_key(tmp_path / "certs")
    src = tmp_path / "src"
    acked = write(src, key, 2)  # fully acknowledged records
    seg = src / segment_name(ORIGIN, 0)
    data = seg.read_bytes()
    cp_lines = (src / "checkpoints-gw-1.jsonl").read_bytes().splitlines()
    # the last batch: the final outcome record and the shutdown checkpoint
    lines = data.splitlines(keepends=True)
    batch_start = len(b"".join(lines[:-2]))
    acked_seqs = {r["seq"] for r in acked}
    keys = {key.key_id: key.public}
    ends = [len(b"".join(lines[:k])) for k in range(len(lines) - 1, len(lines) + 1)]
    cuts = sorted({c for c in range(batch_start, len(data) + 1)
                   if c % 7 == 0 or any(abs(c - e) <= 24 for e in ends)
                   or c - batch_start <= 24})
    for cut in cuts:
        d = tmp_path / f"c{cut}"
        d.mkdir()
        kept = data[:cut]
        (d / seg.name).write_bytes(kept)
        intact = kept.count(b"\n")
        # only checkpoints whose records were durable had been exported
        (d / "checkpoints-gw-1.jsonl").write_bytes(
            b"".join(x + b"\n" for x in cp_lines if parse(x)["size"] <= intact))
        recs = write(d, key, 1)
        rep = verify([d], keys, None)
        assert rep.ok, (cut, [p.text() for p in rep.problems])
        seqs = [parse(x)["seq"] for x in (d / seg.name).read_bytes().splitlines()
                if x.startswith(b"{") and _ok(x)]
        assert acked_seqs <= set(seqs)
        assert recs[0]["seq"] == max(seqs) - 2  # decision, outcome, checkpoint after it
        shutil.rmtree(d)


def _ok(x):
    try:
        parse(x)
        return True
    except ValueError:
        return False


def test_13_killed_after_rotation_created_empty_segment(tmp_path):
    key = load_or_create_signing_key(tmp_path / "certs")
    d = tmp_path / "audit"
    write(d, key, 2)
    n = len((d / segment_name(ORIGIN, 0)).read_bytes().splitlines())
    (d / segment_name(ORIGIN, n)).write_bytes(b"")  # created + dir fsynced, then killed
    write(d, key, 1)
    rep = verify([d], {key.key_id: key.public}, None)
    assert rep.ok and rep.problems == []


def test_13_killed_while_exporting_checkpoint(tmp_path):
    key = load_or_create_signing_key(tmp_path / "certs")
    d = tmp_path / "audit"
    write(d, key, 2)
    cpf = d / "checkpoints-gw-1.jsonl"
    cpf.write_bytes(cpf.read_bytes()[:-30])
    write(d, key, 1)
    rep = verify([d], {key.key_id: key.public}, None)
    assert rep.ok and [p.code for p in rep.problems] == ["torn-tail"]


# thorough mode in worker processes -------------------------------------------------------
def test_thorough_in_worker_processes_gives_the_same_verdicts(tmp_path, monkeypatch):
    """Segments checked in parallel, chain joined in order: the same verdicts as inline,
    also across a key hand-over (workers learn the new key from the key_rotation record)."""
    from residency_gate.audit import verify as verify_mod
    from residency_gate.audit.keys import rotate_key

    certs = tmp_path / "certs"
    key = load_or_create_signing_key(certs)
    d = tmp_path / "audit"
    write(d, key, 10, rotate_bytes=3000, checkpoint_every=7)
    old, new = rotate_key(certs)
    write(d, load_or_create_signing_key(certs), 10, rotate_bytes=3000, checkpoint_every=7)
    f, i, x = find(d, 31)
    assert b'"kind":"decision"' in x or b'"kind":"outcome"' in x
    set_line(f, i, x.replace(b'"status":', b'"status" :', 1) if b'"status":' in x
             else x.replace(b'"decision_id"', b'"decision_id" ', 1))
    keys = {old.key_id: old.public}  # trust only the old key: the new one by hand-over
    monkeypatch.setattr(verify_mod, "PARALLEL_MIN_BYTES", 0)
    serial = verify([d], keys, None, thorough=True, jobs=1)
    parallel = verify([d], keys, None, thorough=True, jobs=2)
    default = verify([d], keys, None)
    assert len(segments(d)) >= 4
    assert [p.text() for p in parallel.problems] == [p.text() for p in serial.problems] \
        == [p.text() for p in default.problems]
    assert {c for c, _ in verdicts(serial)} == {"not-canonical", "hash-mismatch"}
    assert parallel.origins[ORIGIN].vouched == serial.origins[ORIGIN].vouched
    assert parallel.origins[ORIGIN].keys == [old.key_id, new.key_id]
    assert parallel.origins[ORIGIN].signatures_checked == serial.origins[ORIGIN].records
    assert (parallel.workers, serial.workers, default.workers) == (2, 0, 0)


def test_fast_reading_falls_back_to_parsing_when_a_line_fools_it(tmp_path):
    """Default mode reads seq/prev/kind straight from the bytes; a record whose nested
    values carry the same keys first (allowed: record fields are free-form) makes that
    reading wrong, and the verifier must notice and parse instead: same verdicts."""
    key = load_or_create_signing_key(tmp_path / "certs")
    d = tmp_path / "audit"

    async def go():
        w = AuditWriter(d, key, ORIGIN, rotate_bytes=3000)
        w.open()
        for i in range(12):
            await w.append("decision", {"meta": {"a": 0, "prev": "ab" * 32},
                                        "routed": {"a": 0, "seq": 1000 + i, "z": 0},
                                        "decision": "allow", "n": i})
        await w.close()
    asyncio.run(go())
    from residency_gate.audit.scan import scan_fields as _extract

    _f, _i, x = find(d, 3)
    assert _extract(x)[:2] != (3, parse(x)["prev"])  # the fast reading is fooled here
    keys = {key.key_id: key.public}
    rep = verify([d], keys, None)
    assert rep.ok and rep.problems == [], [p.text() for p in rep.problems]
    assert rep.origins[ORIGIN].vouched == [(0, last_seq(d))]
    f, i, x = find(d, 5)
    set_line(f, i, x.replace(b'"decision":"allow"', b'"decision":"block"'))
    default, thorough = verify([d], keys, None), verify([d], keys, None, thorough=True, jobs=1)
    assert verdicts(default) == verdicts(thorough) == [("bad-signature", 5),
                                                        ("hash-mismatch", 6)]
