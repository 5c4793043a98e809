"""Shared by the audit writer tests (fixtures `certs` and `key` are in conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from residency_gate.audit.canonical import parse
from residency_gate.audit.keys import default_public_keys
from residency_gate.audit.verify import verify
from residency_gate.audit.writer import AuditWriter
from residency_gate.audit.writer_process import ProcessAuditWriter

ORIGIN = "gw-1"

# The writer's semantics hold for both implementations: the in-process thread writer and
# the writer process the proxy uses by default.
BOTH = pytest.mark.parametrize("cls", [AuditWriter, ProcessAuditWriter], ids=["thread", "process"])


def run_writer(cls, directory, key, n, origin=ORIGIN, **kw):
    async def go():
        w = cls(directory, key, origin, **kw)
        w.open()
        recs = [await w.append("decision", {"n": i, "decision": "allow"}) for i in range(n)]
        await w.close()
        return w, recs
    return asyncio.run(go())


def lines_of(directory):
    out = []
    for f in sorted(directory.glob(f"{ORIGIN}-*.jsonl")):
        out += [parse(x) for x in f.read_bytes().splitlines() if x]
    return out


def check(directory, certs, anchor=None):
    return verify([directory], default_public_keys(certs), anchor)
