"""What the connection limits cost per event: the Guard (proxy/limits.py) around a layer.

    .venv/bin/python bench/limits_bench.py [--quick]

Every event of a client connection (bytes from either side, hook completions, wake-ups)
passes through the Guard, and every command back up. This feeds a stand-in inner layer
the event mix of one intercepted request (client bytes, a hook, provider bytes) directly
and through a Guard, and prints µs per event and per request: the proxy's whole CPU per
request (proxy_bench.py) is ~2-3 ms, so a few µs per event is what to expect.
"""

from __future__ import annotations

import argparse
import time

from mitmproxy import connection, options
from mitmproxy.proxy import commands, context, events, layer

from residency_gate.catalog.config import DEFAULTS, Limits
from residency_gate.proxy.limits import Guard

EVENTS_PER_REQUEST = 12  # head, body, hooks in and out, provider bytes: one small request


class Inner(layer.Layer):
    """Echoes one SendData per DataReceived, like a relay would."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            yield commands.SendData(event.connection, event.data)


class Owner:
    def __init__(self) -> None:
        self._limits = Limits(**DEFAULTS["limits"])

    def limits(self) -> Limits:
        return self._limits

    def hit(self, key: str, message: str) -> None:  # pragma: no cover - never fires here
        raise AssertionError(message)


def run(n: int, guarded: bool) -> float:
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2),
                               timestamp_start=0)
    ctx = context.Context(client, options.Options())
    ctx.server = connection.Server(address=("api.openai.com", 443))
    inner = Inner(ctx)
    top = Guard(inner, Owner()) if guarded else inner
    data = [events.DataReceived(client, b"x" * 512), events.DataReceived(ctx.server, b"y" * 512)]
    list(top.handle_event(events.Start()))
    if guarded:  # a request in progress: bytes count toward no head
        top.client.head_done("flow", time.monotonic())
        top.client.body_done("flow")
    t0 = time.perf_counter()
    for i in range(n):
        for _ in top.handle_event(data[i & 1]):
            pass
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    n = 50_000 if ap.parse_args().quick else 300_000
    best = {False: float("inf"), True: float("inf")}
    for _ in range(5):
        for guarded in (False, True):
            best[guarded] = min(best[guarded], run(n, guarded))
    extra = best[True] - best[False]
    print(f"{'':28}µs/event")
    print(f"{'layer alone':28}{best[False]:8.2f}")
    print(f"{'through the Guard':28}{best[True]:8.2f}")
    print(f"Guard: +{extra:.2f} µs per event, ~{extra * EVENTS_PER_REQUEST:.0f} µs per request "
          f"({EVENTS_PER_REQUEST} events)")


if __name__ == "__main__":
    main()
