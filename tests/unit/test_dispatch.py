"""ops/dispatch.py: the memoised hook dispatch calls exactly what mitmproxy's own would,
in the same order, with the same error handling; and the gate's master uses it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from residency_gate.ops import dispatch
from residency_gate.ops.embed import gate_master


class Recorder:
    def __init__(self, name: str, calls: list, *, fail: bool = False, halt: bool = False,
                 children: list | None = None) -> None:
        self.name = name
        self.calls = calls
        self.fail = fail
        self.halt = halt
        if children is not None:
            self.addons = children

    def request(self, flow) -> None:
        self.calls.append((self.name, "request"))
        if self.fail:
            raise ValueError(f"{self.name} failed")
        if self.halt:
            raise exceptions.AddonHalt()


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append((self.name, "request (async)"))

    def response(self, flow) -> None:
        self.calls.append((self.name, "response"))


class NotCallable:
    request = "not a function"


def tree(calls: list) -> list:
    """Nested addons, an async one, a failing child with a sibling after it, a halt."""
    return [
        Recorder("a", calls),
        Recorder("b", calls, children=[Recorder("b1", calls, fail=True), Recorder("b2", calls)]),
        AsyncRecorder("c", calls, children=[Recorder("c1", calls)]),
        Recorder("no-hooks-here", calls, children=[]),
        Recorder("d", calls, halt=True),
        Recorder("e", calls),  # never reached: d halted the event
    ]


def make_master(manager_cls: type[AddonManager]) -> Master:
    master = Master(Options(), with_termlog=False)
    if manager_cls is dispatch.HookDispatch:
        dispatch.install(master)
    return master


async def fire(manager_cls: type[AddonManager], events: list[hooks.Hook]) -> list:
    master = make_master(manager_cls)
    calls: list = []
    master.addons.add(*tree(calls))
    for event in events:
        await master.addons.trigger_event(event)
    return calls


def both(fn) -> tuple:
    """fn(mitmproxy's manager class), fn(ours): in one event loop (a master logs into its
    own loop, so none may outlive it)."""
    async def go() -> tuple:
        return await fn(AddonManager), await fn(dispatch.HookDispatch)
    return asyncio.run(go())


@pytest.mark.parametrize("twice", [False, True])
def test_same_calls_in_the_same_order_as_mitmproxy(twice: bool, caplog) -> None:
    f = tflow.tflow()
    events = [HttpRequestHook(f), HttpResponseHook(f), hooks.UpdateHook([f])]
    if twice:  # the second round comes from the memo
        events += events

    async def run(cls) -> tuple:
        caplog.clear()
        calls = await fire(cls, events)
        await asyncio.sleep(0)
        return calls, caplog.text.count("Addon error: b1 failed")

    with caplog.at_level(logging.ERROR):
        (theirs, errors_theirs), (ours, errors_ours) = both(run)
    assert ours == theirs
    # the failing child is logged and skips its sibling; the halt stops the event
    assert ("b2", "request") not in ours and ("e", "request") not in ours
    assert ("c", "request (async)") in ours and ("c1", "request") in ours
    assert errors_ours == errors_theirs == (2 if twice else 1)


def test_the_memo_follows_the_chain() -> None:
    async def go() -> list:
        master = make_master(dispatch.HookDispatch)
        calls: list = []
        first = Recorder("first", calls)
        master.addons.add(first)
        f = tflow.tflow()
        await master.addons.trigger_event(HttpRequestHook(f))
        master.addons.add(Recorder("later", calls))
        await master.addons.trigger_event(HttpRequestHook(f))
        master.addons.remove(first)
        await master.addons.trigger_event(HttpRequestHook(f))
        return calls

    assert asyncio.run(go()) == [("first", "request"), ("first", "request"),
                                 ("later", "request"), ("later", "request")]


def test_a_handler_that_is_not_callable_is_logged_like_mitmproxy_does(caplog) -> None:
    async def run(cls) -> tuple:
        caplog.clear()
        master = make_master(cls)
        calls: list = []
        master.addons.add(NotCallable(), Recorder("after", calls))
        await master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        await asyncio.sleep(0)
        return calls, "not callable" in caplog.text

    with caplog.at_level(logging.ERROR):
        theirs, ours = both(run)
    assert theirs == ours == ([("after", "request")], True)


def test_install_refuses_a_master_that_already_has_addons() -> None:
    async def go() -> None:
        master = Master(Options(), with_termlog=False)
        master.addons.add(Recorder("x", []))
        dispatch.install(master)

    with pytest.raises(RuntimeError):
        asyncio.run(go())


def test_the_gate_master_dispatches_through_the_memo() -> None:
    async def go() -> tuple:
        master = gate_master()
        return type(master.addons), master.addons.handlers(hooks.UpdateHook([]))

    cls, update_handlers = asyncio.run(go())
    assert cls is dispatch.HookDispatch
    assert update_handlers == []  # no gate addon handles `update`: nothing is walked for it
