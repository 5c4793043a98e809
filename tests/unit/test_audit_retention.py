"""Compressed segments and retention: the writer compresses rotated segments in the background
(crash-safe), prunes the oldest only after a published checkpoint covers them and says so in
the chain; the verifier reads compressed and plain segments alike, verifies a pruned log from
its checkpoint, and tells pruning from deletion."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from residency_gate.audit.canonical import parse
from residency_gate.audit.chain import segment_name
from residency_gate.audit.housekeeping import Housekeeper, PrunePlan, Retention
from residency_gate.audit.segments import (
    compress_segment,
    file_sha256,
    iter_records,
    open_segment,
)
from residency_gate.audit.verify import load_start, verify
from residency_gate.audit.writer import AuditWriter
from residency_gate.audit.writer_process import ProcessAuditWriter
from residency_gate.catalog.config import load_config

ORIGIN = "gw-1"
MODES = pytest.mark.parametrize("thorough", [False, True], ids=["default", "thorough"])


def fields(i: int) -> dict:
    return {"client": "10.0.0.1", "decision": "block" if i % 2 else "allow", "n": i,
            "reason": "x" * 200}


def write(d, key, n, start=0, settle=True, **kw) -> AuditWriter:
    """n decision records through append_batch (what the writer process drives)."""
    w = AuditWriter(d, key, ORIGIN, rotate_bytes=kw.pop("rotate_bytes", 4096), **kw)
    w.open()
    for i in range(start, start + n, 4):
        w.append_batch([("decision", fields(j)) for j in range(i, min(i + 4, start + n))])
    if settle:
        settle_keeper(w)
    w.close_sync()
    return w


def settle_keeper(w: AuditWriter) -> None:
    """Let housekeeping finish: compress, plan, prune record, removal."""
    for _ in range(3):
        assert w.keeper.wait_idle(30)
        w.append_batch([])  # writes a prune record when one is ready
    assert w.keeper.wait_idle(30)


def segs(d):
    return sorted(p for p in d.iterdir() if p.name.startswith(f"{ORIGIN}-"))


def keys_of(key):
    return {key.key_id: key.public}


def codes(rep, severity=None):
    return [(p.code, p.seq) for p in rep.problems if severity is None or p.severity == severity]


# ------------------------------------------------------------------------------ compression


@pytest.mark.parametrize("fmt", ["zstd", "gzip"])
def test_rotated_segments_compressed_and_read_alike(tmp_path, key, fmt):
    d = tmp_path / "audit"
    write(d, key, 60, compress=fmt)
    files = segs(d)
    suffix = ".zst" if fmt == "zstd" else ".gz"
    assert len(files) >= 4
    assert all(f.name.endswith(".jsonl" + suffix) for f in files[:-1]), files
    assert files[-1].name.endswith(".jsonl")  # the segment being written stays plain
    assert not any(f.name.endswith(".tmp") for f in d.iterdir())
    raw = sum(len(open_segment(f).read()) for f in files)
    assert sum(f.stat().st_size for f in files) < raw / 2  # it does compress
    for thorough in (False, True):
        rep = verify([d], keys_of(key), None, thorough=thorough, jobs=1)
        assert rep.ok and rep.problems == [], [p.text() for p in rep.problems]
        o = rep.origins[ORIGIN]
        assert o.vouched == [(0, o.last_seq)] and o.anchored_size == o.last_seq + 1
    recs = [r for _f, _n, r in iter_records([d])]
    assert [r["seq"] for r in recs] == list(range(len(recs)))
    assert [r["n"] for r in recs if r["kind"] == "decision"] == list(range(60))
    # a restart continues the chain after compressed segments
    write(d, key, 8, start=60, compress=fmt)
    rep = verify([d], keys_of(key), None)
    assert rep.ok and rep.problems == []


def test_compression_never_leaves_a_segment_without_its_original(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 40)  # plain
    first = segs(d)[0]
    content = first.read_bytes()
    # 1. killed while writing the compressed copy: a partial .tmp beside the original
    tmp = first.with_name(first.name + ".zst.tmp")
    tmp.write_bytes(b"\x28\xb5\x2f\xfd partial")
    assert verify([d], keys_of(key), None).ok  # readers ignore it
    # 2. killed after the rename, before the original was removed: both, identical
    second = segs(d)[1]
    done = compress_segment(second, "zstd")
    assert done is not None and not second.exists()
    second.write_bytes(open_segment(done).read())
    rep = verify([d], keys_of(key), None)
    assert rep.ok and rep.problems == []
    # the next writer finishes both jobs and compresses what is left
    write(d, key, 4, start=40, compress="zstd")
    names = [f.name for f in segs(d)]
    assert not tmp.exists() and not second.exists()
    assert first.name + ".zst" in names and first.name not in names
    assert open_segment(d / (first.name + ".zst")).read() == content
    assert verify([d], keys_of(key), None).ok


def test_compressed_copy_that_differs_from_its_original_is_reported(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 40)
    first = segs(d)[0]
    data = first.read_bytes()
    zst = compress_segment(first, "zstd")
    first.write_bytes(data)  # the original back beside its copy ...
    other = data.replace(b'"decision":"block"', b'"decision":"allow"', 1)
    zst.unlink()
    tmp = first.with_name("x.jsonl")
    tmp.write_bytes(other)
    compress_segment(tmp, "zstd").rename(zst)  # ... and a copy that says something else
    rep = verify([d], keys_of(key), None)
    assert not rep.ok and [p.code for p in rep.errors] == ["invalid-format"]
    assert zst.name in rep.errors[0].file


def test_truncated_compressed_segment_is_reported_not_crashed(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 40, compress="zstd")
    first = segs(d)[0]
    first.write_bytes(first.read_bytes()[:-20])
    rep = verify([d], keys_of(key), None)
    assert not rep.ok
    assert "invalid-format" in {p.code for p in rep.errors} or "missing-file" in {
        p.code for p in rep.errors}


def test_process_writer_compresses_in_its_own_process(tmp_path, key):
    import asyncio

    d = tmp_path / "audit"

    async def go():
        w = ProcessAuditWriter(d, key, ORIGIN, rotate_bytes=4096, compress="zstd")
        w.open()
        for i in range(40):
            await w.append("decision", fields(i))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if len([f for f in segs(d) if f.name.endswith(".zst")]) >= len(segs(d)) - 1:
                break
            await asyncio.sleep(0.05)
        await w.close()
    asyncio.run(go())
    files = segs(d)
    assert len(files) >= 3 and all(f.name.endswith(".zst") for f in files[:-1])
    assert verify([d], keys_of(key), None).ok


# ------------------------------------------------------------------------------ retention


def test_retention_waits_for_a_published_checkpoint(tmp_path):
    k = Housekeeper(tmp_path, ORIGIN, "none", Retention(max_bytes=1))
    plan = PrunePlan([tmp_path / "a"], 0, 99, "00" * 32, 10, "over max_bytes 1", None)
    k._plan = plan
    assert not k.plan_ready(published=99)  # the writer does not wake up for it
    assert k.take_plan(published=99) is None  # covers 0-98 only
    assert k.plan_ready(published=100) and k.take_plan(published=100) is plan


@MODES
def test_pruned_log_verifies_from_its_checkpoint(tmp_path, key, thorough):
    d = tmp_path / "audit"
    write(d, key, 80, retention=Retention(max_bytes=12_000), compress="zstd")
    files = segs(d)
    assert not (d / segment_name(ORIGIN, 0)).exists() and not any(
        f.name == segment_name(ORIGIN, 0) + ".zst" for f in files)
    total = sum(f.stat().st_size for f in files)
    assert total <= 12_000 + 4096 * 2
    recs = [r for _f, _n, r in iter_records([d])]
    prunes = [r for r in recs if r["kind"] == "prune"]
    assert prunes, "no prune record in the chain"
    first_kept = recs[0]["seq"]
    assert first_kept > 0
    p = prunes[-1]
    assert p["checkpoint"] == {"size": first_kept, "head": recs[0]["prev"]}
    assert p["through"] == first_kept - 1 and p["action"] == "delete"
    assert "max_bytes 12000" in p["reason"]
    # the checkpoint the chain continues from was published before the files went
    cps = [parse(x) for x in (d / f"checkpoints-{ORIGIN}.jsonl").read_bytes().splitlines()]
    assert any(c["size"] == first_kept and c["head"] == recs[0]["prev"] for c in cps)

    rep = verify([d], keys_of(key), None, thorough=thorough, jobs=1)
    assert rep.ok, [x.text() for x in rep.problems]
    assert codes(rep) == [("pruned", first_kept)]
    o = rep.origins[ORIGIN]
    assert o.vouched == [(first_kept, o.last_seq)]
    assert o.start and o.start["size"] == first_kept and o.start["prune_seq"] == p["seq"]
    # the same, starting from the checkpoint the operator kept (the checkpoints file)
    start = load_start(str(d / f"checkpoints-{ORIGIN}.jsonl"))
    rep = verify([d], keys_of(key), None, start=start, thorough=thorough, jobs=1)
    assert rep.ok and codes(rep) == [("pruned", first_kept)]
    assert rep.origins[ORIGIN].start["source"] == "--from-checkpoint"

    # deleting the oldest remaining segment by hand is not pruning
    oldest = segs(d)[0]
    deleted_through = parse(open_segment(segs(d)[1]).read().split(b"\n", 1)[0])["seq"]
    oldest.unlink()
    rep = verify([d], keys_of(key), None, thorough=thorough, jobs=1)
    assert not rep.ok and codes(rep, "error") == [("missing-file", deleted_through)]
    assert "no prune record" in rep.errors[0].message
    # ... and from a checkpoint the operator trusts, it says no prune record accounts for it
    rep = verify([d], keys_of(key), None, start=start, thorough=thorough, jobs=1)
    assert rep.ok and codes(rep) == [("from-checkpoint", deleted_through)]


def test_archived_segments_complete_the_chain(tmp_path, key):
    d, archive = tmp_path / "audit", tmp_path / "archive"
    write(d, key, 80, retention=Retention(max_bytes=12_000, archive_dir=archive),
          compress="zstd")
    moved = sorted(archive.iterdir())
    assert moved and moved[0].name == segment_name(ORIGIN, 0) + ".zst"
    prunes = [r for _f, _n, r in iter_records([d]) if r["kind"] == "prune"]
    assert prunes[-1]["action"] == "archive" and prunes[-1]["archive_dir"] == str(archive)
    rep = verify([d], keys_of(key), None)
    assert rep.ok and [p.code for p in rep.problems] == ["pruned"]
    rep = verify([archive, d], keys_of(key), None)  # the whole chain again
    assert rep.ok and rep.problems == []
    assert rep.origins[ORIGIN].vouched == [(0, rep.origins[ORIGIN].last_seq)]


def test_retention_by_age(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 40)
    old = segs(d)[:2]
    past = time.time() - 3 * 86400
    for f in old:
        os.utime(f, (past, past))
    write(d, key, 4, start=40, retention=Retention(max_age_days=2))
    names = {f.name for f in segs(d)}
    assert not any(f.name in names for f in old)
    rep = verify([d], keys_of(key), None)
    assert rep.ok and [p.code for p in rep.problems] == ["pruned"]
    prune = [r for _f, _n, r in iter_records([d]) if r["kind"] == "prune"][-1]
    assert "older than max_age_days 2" in prune["reason"]


def test_retention_and_compress_from_the_config_file(tmp_path):
    cfg = tmp_path / "residency-gate.yaml"
    cfg.write_text("audit:\n  compress: gzip\n  retention:\n    max_bytes: 1073741824\n"
                   "    archive_dir: old\n")
    audit = load_config(cfg).audit
    assert audit.compress == "gzip"
    assert audit.retention is not None and audit.retention.max_bytes == 1 << 30
    assert audit.retention.max_age_days is None
    assert audit.retention.archive_dir == (tmp_path / "old").resolve()
    default = load_config(None).audit
    assert default.compress == "zstd" and default.retention is None


def test_from_checkpoint_argument_forms(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 8)
    cpf = d / f"checkpoints-{ORIGIN}.jsonl"
    line = cpf.read_bytes().splitlines()[-1].decode()
    assert load_start(line) == [json.loads(line)]
    assert len(load_start(str(cpf))) >= 1
    with pytest.raises(ValueError):
        load_start('{"not": "a checkpoint"}')
    shutil.rmtree(d)
    assert file_sha256  # imported for the crash-state tests above


def test_prune_waits_for_a_published_checkpoint_without_spinning(tmp_path, key):
    d = tmp_path / "audit"
    write(d, key, 40)
    (d / f"checkpoints-{ORIGIN}.jsonl").unlink()  # nothing published, as far as it knows
    w = AuditWriter(d, key, ORIGIN, rotate_bytes=4096, retention=Retention(max_bytes=4096))
    w.open()
    assert w.keeper.wait_idle(30) and w.keeper._plan is not None  # planned ...
    assert w.checkpoint_due_in() != 0.0  # ... but not due: no busy loop in the writer
    w.append_batch([("decision", fields(40))])
    assert not [r for _f, _n, r in iter_records([d]) if r["kind"] == "prune"]
    w.close_sync()  # the final checkpoint is published: the next start prunes
    write(d, key, 4, start=41, retention=Retention(max_bytes=4096))
    assert [r for _f, _n, r in iter_records([d]) if r["kind"] == "prune"]
    assert verify([d], keys_of(key), None).ok
