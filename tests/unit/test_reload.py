"""Hot reload (ops/reload.py): whatever makes a reload fail keeps the old bundle, counts
an error and says why; a load that hangs (here: the config file is a FIFO nobody writes)
is given up on, and never started twice."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from residency_gate.catalog.bundle import load_bundle
from residency_gate.ops import reload
from residency_gate.ops.metrics import Metrics
from residency_gate.proxy.interface import Gate


class NoAudit:
    healthy = True

    async def append(self, kind, fields):
        return {"id": "x"}


def reloads(m: Metrics, result: str) -> float:
    return m.config_reloads.labels(result=result)._value.get()


def test_a_hanging_load_times_out_keeps_the_old_bundle_and_is_not_started_twice(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(reload, "LOAD_TIMEOUT", 0.5)
    cfg = tmp_path / "rg.yaml"
    cfg.write_text("residency: {default: eu}\n")
    old = load_bundle(str(cfg))
    metrics = Metrics()
    gate = Gate(bundle=old, audit=NoAudit(), metrics=metrics)
    cfg.unlink()
    os.mkfifo(cfg)  # opening it blocks until a writer comes: a stuck read
    r = reload.Reloader(gate, str(cfg), metrics)

    async def go() -> tuple[bool, bool]:
        first = await asyncio.wait_for(r.reload(), 5)  # fails, not hangs, without a timeout
        second = await r.reload()  # the first load still hangs in its thread
        threading.Thread(target=lambda: cfg.open("w").write("residency: {default: de}\n"),
                         daemon=True).start()  # let the stuck thread finish
        await asyncio.wait_for(asyncio.shield(r._loading), 10)
        return first, second

    with caplog.at_level(logging.ERROR, logger="residency_gate.reload"):
        first, second = asyncio.run(go())
    assert (first, second) == (False, False)
    assert gate.bundle is old
    assert reloads(metrics, "error") == 2 and metrics.config_reload_failure._value.get() == 1
    text = caplog.text
    assert "not loaded within 0.5s" in text and "still loading" in text


def test_an_alias_bomb_is_refused_at_once(tmp_path, caplog):
    cfg = tmp_path / "rg.yaml"
    cfg.write_text("residency: {default: eu}\n")
    old = load_bundle(str(cfg))
    metrics = Metrics()
    gate = Gate(bundle=old, audit=NoAudit(), metrics=metrics)
    levels = "\n".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                       for i in range(1, 10))
    cfg.write_text('l0: &l0 ["lol"]\n' + levels + "\n")
    r = reload.Reloader(gate, str(cfg), metrics)
    with caplog.at_level(logging.ERROR, logger="residency_gate.reload"):
        assert asyncio.run(asyncio.wait_for(r.reload(), 5)) is False
    assert gate.bundle is old and reloads(metrics, "error") == 1
    assert f"{cfg}:1: invalid YAML: anchors and aliases" in caplog.text
