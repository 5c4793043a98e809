"""mitmproxy's addon manager with each hook's handlers looked up once, not on every event.

For every event (five to eight a request, each followed by an `update` event), mitmproxy's
`AddonManager.trigger_event` walks the whole addon tree: a coroutine and a `safecall`
context per top-level addon, a generator per subtree, a `getattr` per addon, whether or not
any of them handles the hook. That walk was ~8% of the proxy's CPU per request (py-spy,
bench/profile_bench.py). `HookDispatch` keeps the same order and the same error handling
(each top-level addon and its sub-addons in one `safecall`, so a failing handler skips the
rest of its subtree and is logged, `AddonHalt` stops the event) but remembers, per hook
name, which top-level addons have handlers and what they are. The memo is dropped whenever
the chain changes (add, register, remove, clear).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager, safecall

Handlers = list[tuple[Any, tuple[Callable[..., Any], ...]]]


class HookDispatch(AddonManager):
    """An AddonManager whose `trigger_event` uses a per-hook memo of handlers."""

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._handlers: dict[str, Handlers] = {}

    # any change to the tree: forget what was looked up
    def register(self, addon: Any) -> Any:
        self._handlers.clear()
        return super().register(addon)

    def add(self, *addons: Any) -> None:
        self._handlers.clear()
        super().add(*addons)
        self._handlers.clear()

    def remove(self, addon: Any) -> None:
        self._handlers.clear()
        super().remove(addon)
        self._handlers.clear()

    def clear(self) -> None:
        self._handlers.clear()
        super().clear()

    def handlers(self, event: hooks.Hook) -> Handlers:
        """Per top-level addon (in chain order), the handlers of `event` in it and below it."""
        found = self._handlers.get(event.name)
        if found is None:
            found = []
            for addon in self.chain:
                funcs = tuple(func for _a, func in self._iter_hooks(addon, event))
                if funcs:
                    found.append((addon, funcs))
            self._handlers[event.name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        try:
            handlers = self.handlers(event)
        except exceptions.AddonManagerError:  # a handler that is no function: mitmproxy's
            await super().trigger_event(event)  # walk logs it, addon by addon, every time
            return
        if not handlers:
            return
        args = event.args()
        for _addon, funcs in handlers:
            try:
                with safecall():
                    for func in funcs:
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return


def install(master: Any) -> HookDispatch:
    """Give a freshly made Master (no addons yet) a HookDispatch in place of its manager."""
    if master.addons.chain:
        raise RuntimeError("install the hook dispatch before adding addons")
    # (the old, empty manager stays subscribed to option changes: a no-op)
    master.addons = HookDispatch(master)
    return master.addons
