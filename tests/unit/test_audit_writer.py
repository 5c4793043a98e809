import asyncio
import base64
import os
import stat

import pytest

from audit_helpers import BOTH, ORIGIN, check, lines_of, run_writer
from residency_gate.audit import keys as keys_mod
from residency_gate.audit.canonical import parse
from residency_gate.audit.chain import ZERO_HASH, line_hash, segment_name
from residency_gate.audit.keys import (
    key_id_for,
    load_or_create_signing_key,
    rotate_key,
)
from residency_gate.audit.verify import verify
from residency_gate.audit.writer import AuditError, AuditRecordError, AuditWriter


def test_key_files(certs, key):
    priv = certs / "audit-signing-key.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert (certs / "audit-signing-key.pub.pem").exists()
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()  # PKCS8
    again = load_or_create_signing_key(certs)
    assert again.key_id == key.key_id == key_id_for(key.public)
    assert key.key_id.startswith("ed25519:") and len(key.key_id) == 8 + 16


@BOTH
def test_records_fields_and_chain(tmp_path, certs, key, cls):
    _w, recs = run_writer(cls, tmp_path / "a", key, 3)
    lines = (tmp_path / "a" / segment_name(ORIGIN, 0)).read_bytes().splitlines()
    objs = [parse(x) for x in lines]
    assert objs[0]["kind"] == "start" and objs[0]["prev"] == ZERO_HASH
    assert objs[0]["pid"] == os.getpid()  # the proxy's pid, not the writer process's
    for i, o in enumerate(objs):
        assert o["seq"] == i and o["v"] == 1 and o["origin"] == ORIGIN
        assert o["key_id"] == key.key_id
        assert o["ts"].endswith("Z") and len(o["ts"]) == len("2026-11-28T07:24:10.123456Z")
        if i:
            assert o["prev"] == line_hash(lines[i - 1])
    assert [r["id"] for r in recs] == [f"{ORIGIN}:1", f"{ORIGIN}:2", f"{ORIGIN}:3"]
    assert [parse(x) for x in lines[1:4]] == recs  # append returns the record as written
    assert objs[-1]["kind"] == "checkpoint"  # shutdown checkpoint
    assert check(tmp_path / "a", certs).ok


@BOTH
def test_restart_continues_seq_and_prev(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    run_writer(cls, d, key, 3)
    before = lines_of(d)
    run_writer(cls, d, key, 2)
    after = lines_of(d)
    assert [o["seq"] for o in after] == list(range(len(after)))
    assert after[len(before)]["kind"] == "start"
    rep = check(d, certs)
    assert rep.ok and rep.origins[ORIGIN].vouched == [(0, len(after) - 1)]


@pytest.mark.parametrize("cut", [1, 10, 50, -1])
@BOTH
def test_torn_tail_recorded_and_chain_resumes(tmp_path, certs, key, cut, cls, caplog):
    d = tmp_path / "a"
    run_writer(cls, d, key, 3)
    seg = d / segment_name(ORIGIN, 0)
    data = seg.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn_len = (len(data) - 2 - last_start) if cut == -1 else cut  # -1: all but "}\n"
    seg.write_bytes(data[: last_start + torn_len])
    # the crash came before that record's checkpoint was exported
    cpf = d / "checkpoints-gw-1.jsonl"
    cpf.write_bytes(b"".join(x + b"\n" for x in cpf.read_bytes().splitlines()[:-1]))
    with caplog.at_level("WARNING", logger="residency_gate.audit"):
        w, _ = run_writer(cls, d, key, 1)
    assert w.stats.torn_tails == 1
    # loud: the warning reaches the proxy's log (from the writer process too)
    assert any("torn write" in r.getMessage() for r in caplog.records)
    objs = [parse(x) for x in seg.read_bytes().splitlines() if x.startswith(b'{"') and
            x.endswith(b"}") and _parses(x)]
    torn = [o for o in objs if o["kind"] == "torn_tail"]
    assert len(torn) == 1
    t = torn[0]
    assert t["file"] == seg.name and t["offset"] == last_start and t["length"] == torn_len
    # not chained onto the torn bytes: prev is the hash of the last intact record
    intact = data[:last_start].splitlines()[-1]
    assert t["prev"] == line_hash(intact)
    rep = check(d, certs)
    assert rep.ok, [p.text() for p in rep.problems]
    assert rep.codes() == {"torn-tail"}


def _parses(x):
    try:
        parse(x)
        return True
    except ValueError:
        return False


@BOTH
def test_complete_record_missing_newline_is_kept(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    run_writer(cls, d, key, 2)
    seg = d / segment_name(ORIGIN, 0)
    seg.write_bytes(seg.read_bytes()[:-1])
    w, _ = run_writer(cls, d, key, 1)
    assert w.stats.torn_tails == 0
    rep = check(d, certs)
    assert rep.ok and not rep.problems


def test_group_commit_returns_only_after_fsync(tmp_path, key, monkeypatch):
    synced = []
    written = {"n": 0}
    real_fsync = os.fsync

    def counting_fsync(fd):
        real_fsync(fd)
        synced.append(written["n"])

    import residency_gate.audit.segment_file as wmod
    real_write_all = wmod.write_all

    def counting_write(fd, data):
        real_write_all(fd, data)
        written["n"] += data.count(b"\n")

    monkeypatch.setattr(wmod.os, "fsync", counting_fsync)
    monkeypatch.setattr(wmod, "write_all", counting_write)

    async def go():
        w = AuditWriter(tmp_path / "a", key, ORIGIN, checkpoint_every=10_000)
        w.open()
        base = len(synced)
        results = []

        async def one(i):
            rec = await w.append("decision", {"n": i})
            # at the moment append returns, an fsync covering this record has happened
            assert synced and synced[-1] >= rec["seq"] + 1
            results.append(rec)

        await asyncio.gather(*(one(i) for i in range(200)))
        fsyncs = len(synced) - base
        await w.close()
        return w, fsyncs, results

    w, fsyncs, results = asyncio.run(go())
    assert len(results) == 200
    assert fsyncs < 50  # batched: far fewer fsyncs than records
    assert w.stats.batches >= 1 and w.stats.max_batch_size > 1


def test_fsync_always_syncs_every_record(tmp_path, key, monkeypatch):
    import residency_gate.audit.segment_file as wmod
    count = {"n": 0}
    real = os.fsync

    def fs(fd):
        count["n"] += 1
        real(fd)

    monkeypatch.setattr(wmod.os, "fsync", fs)

    async def go():
        w = AuditWriter(tmp_path / "a", key, ORIGIN, fsync="always", checkpoint_every=10_000)
        w.open()
        n0 = count["n"]
        await asyncio.gather(*(w.append("x", {"n": i}) for i in range(20)))
        n = count["n"] - n0
        await w.close()
        return n

    assert asyncio.run(go()) >= 20


def test_fsync_failure_fails_permanently(tmp_path, key, monkeypatch, caplog):
    import residency_gate.audit.segment_file as wmod
    state = {"fail": False, "calls": 0}
    real = os.fsync

    def fs(fd):
        state["calls"] += 1
        if state["fail"]:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(wmod.os, "fsync", fs)

    async def go():
        w = AuditWriter(tmp_path / "a", key, ORIGIN)
        w.open()
        await w.append("decision", {"n": 0})
        assert w.healthy
        state["fail"] = True
        results = await asyncio.gather(*(w.append("decision", {"n": i}) for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, AuditError) for r in results)
        assert not w.healthy and w.stats.write_failures == 1
        calls = state["calls"]
        state["fail"] = False  # a later fsync would "succeed": must never be retried
        with pytest.raises(AuditError):
            await w.append("decision", {"n": 9})
        assert state["calls"] == calls
        await w.close()
        return w

    with caplog.at_level("CRITICAL", logger="residency_gate.audit"):
        asyncio.run(go())
    assert any(r.levelname == "CRITICAL" for r in caplog.records)


def test_write_failure_fails(tmp_path, key, monkeypatch):
    import residency_gate.audit.segment_file as wmod

    async def go():
        w = AuditWriter(tmp_path / "a", key, ORIGIN)
        w.open()

        def boom(fd, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(wmod, "write_all", boom)
        with pytest.raises(AuditError):
            await w.append("decision", {})
        assert not w.healthy
        await w.close()

    asyncio.run(go())


@BOTH
@pytest.mark.parametrize("fields", [{"seq": 1}, {"sig": "x"}, {"f": 1.5}, {"x": object()},
                                    {1: "int key"}, {"b": b"bytes"}])
def test_invalid_fields_rejected_writer_stays_healthy(tmp_path, certs, key, fields, cls):
    async def go():
        w = cls(tmp_path / "a", key, ORIGIN)
        w.open()
        with pytest.raises(AuditRecordError):
            await w.append("decision", fields)
        assert w.healthy
        # a refused record among good ones: the others are written, in order
        results = await asyncio.gather(w.append("decision", {"ok": 1}),
                                       w.append("decision", fields),
                                       w.append("decision", {"ok": 2}),
                                       return_exceptions=True)
        await w.close()
        return results

    a, bad, b = asyncio.run(go())
    assert isinstance(bad, AuditRecordError)
    assert (a["seq"], a["ok"], b["seq"], b["ok"]) == (1, 1, 2, 2)
    assert check(tmp_path / "a", certs).ok

@BOTH
def test_append_before_open_and_after_close(tmp_path, key, cls):
    async def go():
        w = cls(tmp_path / "a", key, ORIGIN)
        with pytest.raises(AuditError):
            await w.append("x", {})
        w.open()
        await w.close()
        assert not w.healthy
        with pytest.raises(AuditError):
            await w.append("x", {})
    asyncio.run(go())

@BOTH
def test_rotation_keeps_chain(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    run_writer(cls, d, key, 40, rotate_bytes=2000, checkpoint_every=1000)
    files = sorted(d.glob("gw-1-*.jsonl"))
    assert len(files) > 3
    objs = lines_of(d)
    assert [o["seq"] for o in objs] == list(range(len(objs)))
    for f in files:
        first = parse(f.read_bytes().splitlines()[0])
        assert f.name == segment_name(ORIGIN, first["seq"])
        last = parse(f.read_bytes().splitlines()[-1])
        assert last["kind"] == "checkpoint"  # checkpoint at rotation and at shutdown
    rep = check(d, certs)
    assert rep.ok and not rep.problems
    assert rep.origins[ORIGIN].vouched == [(0, len(objs) - 1)]


def test_time_rotation_and_time_checkpoint(tmp_path, certs, key):
    d = tmp_path / "a"

    async def go():
        w = AuditWriter(d, key, ORIGIN, rotate_seconds=0.05, checkpoint_seconds=0.05,
                        checkpoint_every=10_000)
        w.open()
        await w.append("x", {})
        await asyncio.sleep(0.2)  # idle: the timer writes a checkpoint
        cps = w.stats.checkpoints
        await w.append("x", {})  # segment older than rotate_seconds: rotates first
        await w.close()
        return cps, w

    cps, w = asyncio.run(go())
    assert cps == 1
    assert w.stats.rotations == 1
    assert check(d, certs).ok


@BOTH
def test_checkpoints_file_and_anchor(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    anchor = tmp_path / "offhost" / "anchor.jsonl"
    run_writer(cls, d, key, 10, checkpoint_every=4, anchor_file=anchor)
    cp_lines = (d / "checkpoints-gw-1.jsonl").read_bytes().splitlines()
    assert cp_lines == anchor.read_bytes().splitlines()
    objs = lines_of(d)
    chain_cps = [o for o in objs if o["kind"] == "checkpoint"]
    assert len(cp_lines) == len(chain_cps) >= 3
    raw = {o["seq"]: x for o, x in zip(objs, (d / segment_name(ORIGIN, 0)).read_bytes()
                                          .splitlines(), strict=True)}
    for line, rec in zip(cp_lines, chain_cps, strict=True):
        c = parse(line)
        assert rec["size"] == rec["seq"] and rec["head"] == rec["prev"]
        assert c["size"] == rec["seq"] + 1 and c["head"] == line_hash(raw[rec["seq"]])
        assert set(c) == {"v", "origin", "size", "head", "ts", "key_id", "sig"}
    rep = check(d, certs, anchor)
    assert rep.ok and rep.origins[ORIGIN].anchored_size == len(objs)


@BOTH
def test_key_rotation_hand_over(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    old_pub = tmp_path / "old.pub.pem"
    old_pub.write_bytes((certs / "audit-signing-key.pub.pem").read_bytes())
    run_writer(cls, d, key, 2)
    old, new = rotate_key(certs)
    assert old.key_id == key.key_id and new.key_id != key.key_id
    k2 = load_or_create_signing_key(certs)
    assert k2.key_id == new.key_id and [k.key_id for k in k2.retired] == [old.key_id]
    run_writer(cls, d, k2, 2)
    objs = lines_of(d)
    ho = [o for o in objs if o["kind"] == "key_rotation"]
    assert len(ho) == 1
    assert ho[0]["key_id"] == old.key_id and ho[0]["new_key_id"] == new.key_id
    assert base64.b64decode(ho[0]["new_public_key"]) == keys_mod.public_raw(new.public)
    after = objs[objs.index(ho[0]) + 1:]
    assert after and all(o["key_id"] == new.key_id for o in after)
    # trusting only the OLD key: the hand-over introduces the new one
    only_old = keys_mod.load_public_keys([old_pub])
    rep = verify([d], only_old, None)
    assert rep.ok, [p.text() for p in rep.problems]
    assert rep.origins[ORIGIN].keys == [old.key_id, new.key_id]
    # trusting only the NEW key: everything before the hand-over is unknown-key
    rep = verify([d], keys_mod.load_public_keys([certs / "audit-signing-key.pub.pem"]), None)
    assert rep.codes() == {"unknown-key"}


@BOTH
def test_live_rotate_key(tmp_path, certs, key, cls):
    d = tmp_path / "a"
    new = keys_mod.SigningKey.generate()

    async def go():
        w = cls(d, key, ORIGIN)
        w.open()
        await w.append("x", {})
        rec = await w.rotate_key(new)
        after = await w.append("x", {})
        await w.close()
        return rec, after

    rec, after = asyncio.run(go())
    assert rec["kind"] == "key_rotation" and rec["new_key_id"] == new.key_id
    assert rec["key_id"] == key.key_id and after["key_id"] == new.key_id
    assert verify([d], {key.key_id: key.public}, None).ok


@BOTH
def test_hand_over_impossible_without_old_key(tmp_path, key, cls):
    d = tmp_path / "a"
    run_writer(cls, d, key, 1)
    other = keys_mod.SigningKey.generate()
    w = cls(d, other, ORIGIN)
    with pytest.raises(AuditError, match="neither the current"):
        w.open()
    assert not w.healthy


@BOTH
def test_close_sync(tmp_path, certs, key, cls):
    d = tmp_path / "a"

    async def go(w):
        await w.append("x", {})

    w = cls(d, key, ORIGIN)
    w.open()
    asyncio.run(go(w))
    w.close_sync()
    assert not w.healthy
    objs = lines_of(d)
    assert objs[-1]["kind"] == "checkpoint"
    assert check(d, certs).ok


def test_append_batch_is_one_durable_group_commit(tmp_path, certs, key):
    """The synchronous API the writer process drives: refusals in place, a hand-over in order."""
    d = tmp_path / "a"
    w = AuditWriter(d, key, ORIGIN, checkpoint_every=10_000)
    w.open()
    fsyncs = w.stats.fsyncs
    out = w.append_batch([("decision", {"n": 1}), ("decision", {"f": 1.5}),
                          ("outcome", {"decision_id": f"{ORIGIN}:1"})])
    assert [type(r) for r in out] == [dict, AuditRecordError, dict]
    assert (out[0]["seq"], out[0]["id"], out[2]["seq"]) == (1, f"{ORIGIN}:1", 2)
    assert w.stats.fsyncs == fsyncs + 1  # one batch, one fsync
    assert [o["seq"] for o in lines_of(d)] == [0, 1, 2]  # on disk when it returns
    assert w.append_batch([]) == [] and w.stats.fsyncs == fsyncs + 1  # nothing due
    new = keys_mod.SigningKey.generate()
    rec = w.rotate_key_sync(new)
    assert rec["key_id"] == key.key_id and rec["new_key_id"] == new.key_id
    assert w.append_batch([("x", {})])[0]["key_id"] == new.key_id
    w.close_sync()
    assert verify([d], {key.key_id: key.public}, None).ok


@BOTH
def test_settings_by_object_or_keyword(tmp_path, key, cls):
    """Both writers take one WriterSettings (what open_audit passes) or its fields as
    keywords (which override it); a bad value or an unknown option is refused."""
    from residency_gate.audit.housekeeping import Retention
    from residency_gate.audit.writer_api import WriterSettings

    s = WriterSettings(fsync="always", rotate_bytes="4096", checkpoint_every=0,
                       anchor_file=str(tmp_path / "anchor"), compress="zstd",
                       retention=Retention(30, None, tmp_path / "arch"))
    assert (s.rotate_bytes, s.checkpoint_every, s.anchor_file) == (4096, 1, tmp_path / "anchor")
    assert WriterSettings.from_wire(s.to_wire()) == s
    w = cls(tmp_path / "a", key, ORIGIN, settings=s, checkpoint_seconds=5)
    assert w.settings == WriterSettings.of(s, checkpoint_seconds=5)
    assert cls(tmp_path / "b", key, ORIGIN, fsync="always").settings.fsync == "always"
    with pytest.raises(ValueError, match="fsync"):
        cls(tmp_path / "c", key, ORIGIN, fsync="sometimes")
    with pytest.raises(TypeError):
        cls(tmp_path / "c", key, ORIGIN, rotate_megabytes=1)


@BOTH
def test_fields_changed_after_append_do_not_change_the_record(tmp_path, certs, key, cls):
    """The writer keeps a copy of the fields as they were at append (the thread writer
    serialises them later, on its worker thread)."""
    d = tmp_path / "a"

    async def go():
        w = cls(d, key, ORIGIN)
        w.open()
        fields = {"places": ["eu"], "inputs": {"reads": {"model": "m"}}, "n": 1}
        fut = w.append_nowait("decision", fields)
        fields["places"].append("us")
        fields["inputs"]["reads"]["model"] = "changed"
        fields["n"] = 2
        rec = await fut
        await w.close()
        return rec

    rec = asyncio.run(go())
    written = next(o for o in lines_of(d) if o["seq"] == rec["seq"])
    assert (written["places"], written["inputs"], written["n"]) == (
        ["eu"], {"reads": {"model": "m"}}, 1)
    assert check(d, certs).ok
