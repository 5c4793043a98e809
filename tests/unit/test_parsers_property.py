"""Differential property, pure core: for random mutations of requests of every locator
kind, the decision is a refusal, or it equals the decision computed from what the
provider would receive under every reading a server may apply to it. The e2e
companion (tests/e2e/test_fuzz_e2e.py) sends a subset through the running proxy."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import event, given

from helpers import policy_from
from mutations import CONFIG, Sent, agrees, fuzz_settings, reference_decisions, requests, summary
from residency_gate.core.normalise import UnsafePath, normalise_target
from residency_gate.core.request import Request


@cache
def gate_bundle():
    import tempfile
    from pathlib import Path

    return policy_from(Path(tempfile.mkdtemp(prefix="rg-fuzz-")), CONFIG)


@fuzz_settings(1000)
@given(sent=requests())
def test_decision_is_what_the_provider_acts_on(sent: Sent) -> None:
    bundle = gate_bundle()
    req = Request(method="POST", scheme="https", host=sent.host, port=443, path=sent.target,
                  tag_values=sent.tags, body=sent.body)
    decision = bundle.decide(req)  # never raises: an error would be a 500
    event(f"{sent.kind}: {decision.code}")
    if decision.verdict == "block":
        assert decision.status in (400, 421, 451), decision
        if decision.code == "bad_path":
            with pytest.raises(UnsafePath):
                normalise_target(sent.target)
        return
    forwarded = decision.target or sent.target
    if decision.target is not None:
        assert normalise_target(decision.target) == decision.target  # a fixed point
        assert decision.url.endswith(decision.target.partition("?")[0])
    gate = summary(decision, bundle.regions)
    for label, reference in reference_decisions(bundle, sent.host_header, forwarded, sent.body,
                                                sent.tags):
        assert agrees(gate, reference), (label, gate, reference, sent)
