"""A tiny, dependency-free Prometheus registry and the product's metrics.

Design:

* Everything runs on one asyncio loop, so the hot path is lock-free: a labelled
  metric keeps its children in a dict keyed by the tuple of label values, and an
  increment is that dict lookup plus a float add.
* A metric that is also updated from another thread (the audit writer) is
  created with ``threadsafe=True``: its children then take a small lock around
  each update, so concurrent updates are never lost and a histogram's buckets,
  sum and count are always consistent with each other when rendered.
* ``Registry.render()`` produces the Prometheus text exposition format 0.0.4.

Usage::

    from residency_gate.ops.metrics import METRICS
    METRICS.decisions.labels(provider="openai", decision="block", reason="place").inc()
    METRICS.decision_seconds.observe(0.00042)
    METRICS.set_catalog_version("2026-11-28")
    text = METRICS.registry.render()
"""

from __future__ import annotations

import math
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "AUDIT_WRITE_BUCKETS",
    "CONTENT_TYPE",
    "DECISION_BUCKETS",
    "METRICS",
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "Registry",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# 10 µs .. 100 ms: a decision is CPU work on an in-memory catalog.
DECISION_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005,
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
# 100 µs .. 2.5 s: an audit write includes (group) fsync.
AUDIT_WRITE_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def _fmt(value: float) -> str:
    """A sample value as Prometheus expects it (Go's strconv 'g'-like)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _label_str(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


# ---------------------------------------------------------------------------
# children: the per-label-set value holders


class _CounterChild:
    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter can only increase")
        self._value += amount

    def get(self) -> float:
        return self._value


class _LockedCounterChild(_CounterChild):
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter can only increase")
        with self._lock:
            self._value += amount


class _GaugeChild:
    __slots__ = ("_fn", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._fn: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self._fn = None
        self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        self._value -= amount

    def set_function(self, fn: Callable[[], float] | None) -> None:
        """Compute the value at render time (None goes back to a stored value)."""
        self._fn = fn

    def get(self) -> float:
        fn = self._fn
        if fn is None:
            return self._value
        try:
            return float(fn())
        except Exception:
            return math.nan


class _LockedGaugeChild(_GaugeChild):
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds  # finite upper bounds, sorted
        self._counts = [0] * (len(bounds) + 1)  # last slot: above the last bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # le semantics: a value equal to a bound falls into that bound's bucket
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        return list(self._counts), self._sum

    def time(self) -> _Timer:
        """``with hist.time(): ...`` observes the elapsed seconds."""
        return _Timer(self)


class _LockedHistogramChild(_HistogramChild):
    __slots__ = ("_lock",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__(bounds)
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


class _Timer:
    __slots__ = ("_child", "_start")

    def __init__(self, child: _HistogramChild) -> None:
        self._child = child
        self._start = 0.0

    def __enter__(self) -> _Timer:
        from time import perf_counter

        self._start = perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        from time import perf_counter

        self._child.observe(perf_counter() - self._start)


# ---------------------------------------------------------------------------
# metric families


class _Metric:
    type_name = ""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        registry: Registry | None = None,
        threadsafe: bool = False,
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        labelnames = tuple(labelnames)
        for ln in labelnames:
            if not _LABEL_NAME.match(ln) or ln.startswith("__"):
                raise ValueError(f"invalid label name {ln!r}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names in {labelnames!r}")
        self.name = name
        self.help = help
        self.labelnames: tuple[str, ...] = labelnames
        self.threadsafe = threadsafe
        self._children: dict[tuple[str, ...], object] = {}
        self._create_lock = threading.Lock()
        # an unlabelled metric is its own single child, always exported
        self._default = self._new_child() if not labelnames else None
        if registry is not None:
            registry.register(self)

    def _new_child(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def labels(self, *values: str, **kv: str):
        """The child for one set of label values (created on first use)."""
        if kv:
            if values:
                raise ValueError("pass label values either positionally or by name")
            try:
                key = tuple([str(kv[n]) for n in self.labelnames])
            except KeyError as e:
                raise ValueError(f"{self.name}: missing label {e.args[0]!r}") from None
            if len(kv) != len(self.labelnames):
                extra = set(kv) - set(self.labelnames)
                raise ValueError(f"{self.name}: unknown labels {sorted(extra)}")
        else:
            key = tuple([str(v) for v in values])
            if len(key) != len(self.labelnames):
                raise ValueError(
                    f"{self.name}: expected {len(self.labelnames)} label values, got {len(key)}"
                )
        child = self._children.get(key)
        if child is None:
            if not self.labelnames:
                raise ValueError(f"{self.name} has no labels")
            with self._create_lock:
                child = self._children.get(key)
                if child is None:
                    child = self._new_child()
                    self._children[key] = child
        return child

    def remove(self, *values: str, **kv: str) -> None:
        """Forget one label set (it disappears from the exposition)."""
        key = tuple(str(kv[n]) for n in self.labelnames) if kv else tuple(str(v) for v in values)
        with self._create_lock:
            self._children.pop(key, None)

    def clear(self) -> None:
        """Forget every label set."""
        with self._create_lock:
            self._children = {}

    def _samples(self) -> list[tuple[tuple[str, ...], object]]:
        if self._default is not None:
            return [((), self._default)]
        return sorted(self._children.items())

    def render(self) -> list[str]:
        lines = [
            f"# HELP {self.name} {_escape_help(self.help)}",
            f"# TYPE {self.name} {self.type_name}",
        ]
        for values, child in self._samples():
            lines.extend(self._render_child(values, child))
        return lines

    def _render_child(self, values: tuple[str, ...], child) -> list[str]:
        return [f"{self.name}{_label_str(self.labelnames, values)} {_fmt(child.get())}"]


class Counter(_Metric):
    """A monotonically increasing value. ``c.inc()`` or ``c.labels(...).inc()``."""

    type_name = "counter"

    def _new_child(self):
        return _LockedCounterChild() if self.threadsafe else _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def get(self) -> float:
        return self._only().get()

    def _only(self) -> _CounterChild:
        if self._default is None:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._default  # type: ignore[return-value]


class Gauge(_Metric):
    """A value that goes up and down, or is computed at render time (set_function)."""

    type_name = "gauge"

    def _new_child(self):
        return _LockedGaugeChild() if self.threadsafe else _GaugeChild()

    def _only(self) -> _GaugeChild:
        if self._default is None:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._default  # type: ignore[return-value]

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)

    def set_function(self, fn: Callable[[], float] | None) -> None:
        self._only().set_function(fn)

    def get(self) -> float:
        return self._only().get()


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with _sum and _count."""

    type_name = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DECISION_BUCKETS,
        *,
        registry: Registry | None = None,
        threadsafe: bool = False,
    ) -> None:
        bounds = sorted({float(b) for b in buckets if not math.isinf(float(b))})
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket")
        if any(math.isnan(b) for b in bounds):
            raise ValueError("NaN bucket bound")
        self.buckets: tuple[float, ...] = tuple(bounds)
        if "le" in tuple(labelnames):
            raise ValueError("'le' is reserved for histogram buckets")
        super().__init__(name, help, labelnames, registry=registry, threadsafe=threadsafe)

    def _new_child(self):
        if self.threadsafe:
            return _LockedHistogramChild(self.buckets)
        return _HistogramChild(self.buckets)

    def _only(self) -> _HistogramChild:
        if self._default is None:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._default  # type: ignore[return-value]

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def time(self) -> _Timer:
        return self._only().time()

    def snapshot(self) -> tuple[list[int], float]:
        """(per-bucket counts incl. the +Inf slot, sum) of the unlabelled histogram."""
        return self._only().snapshot()

    def _render_child(self, values: tuple[str, ...], child) -> list[str]:
        counts, total = child.snapshot()
        lines = []
        cumulative = 0
        names = self.labelnames
        for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
            cumulative += n
            le = 'le="' + _fmt(bound) + '"'
            lines.append(f"{self.name}_bucket{_label_str(names, values, le)} {cumulative}")
        labels = _label_str(names, values)
        lines.append(f"{self.name}_sum{labels} {_fmt(total)}")
        lines.append(f"{self.name}_count{labels} {cumulative}")
        return lines


class Registry:
    """A set of metrics, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> _Metric:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} already registered")
            self._metrics[metric.name] = metric
        return metric

    def unregister(self, metric: _Metric) -> None:
        with self._lock:
            self._metrics.pop(metric.name, None)

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)

    def __iter__(self):
        return iter(list(self._metrics.values()))

    def counter(self, name: str, help: str, labelnames: Iterable[str] = (), **kw) -> Counter:
        return Counter(name, help, labelnames, registry=self, **kw)

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = (), **kw) -> Gauge:
        return Gauge(name, help, labelnames, registry=self, **kw)

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = DECISION_BUCKETS,
        **kw,
    ) -> Histogram:
        return Histogram(name, help, labelnames, buckets, registry=self, **kw)

    def render(self) -> str:
        """The Prometheus text exposition format 0.0.4 (ends with a newline)."""
        lines: list[str] = []
        for metric in list(self._metrics.values()):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------
# the product's metrics

# Short, stable reason codes for residency_gate_decisions_total{reason}. The lead's
# engine may use others, but keep them a small fixed set: never the human message.
REASON_CODES: tuple[str, ...] = (
    "no_requirement",  # allowed: nothing required
    "compliant",  # allowed: every processing place inside the requirement
    "place",  # blocked: a processing/storage place outside the requirement
    "unknown_place",  # blocked: processing place unknown / unconfirmed
    "unknown_tag",  # refused 400: unknown tag value
    "rerouted",  # sent to a compliant endpoint
    "no_compliant_route",  # reroute wanted but nothing complies
    "internal_error",  # fail closed
)


class Metrics:
    """Every metric residency-gate exports, in its own registry."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.decisions = r.counter(
            "residency_gate_decisions_total",
            "Residency decisions taken, by provider, decision and short reason code.",
            ("provider", "decision", "reason"),
        )
        self.decision_seconds = r.histogram(
            "residency_gate_decision_seconds",
            "Time to reach a residency decision for one request, in seconds.",
            buckets=DECISION_BUCKETS,
        )
        self.audit_write_seconds = r.histogram(
            "residency_gate_audit_write_seconds",
            "Time to write (and, per audit.fsync, sync) one audit record, in seconds.",
            buckets=AUDIT_WRITE_BUCKETS,
            threadsafe=True,
        )
        self.audit_failures = r.counter(
            "residency_gate_audit_failures_total",
            "Audit records that could not be written (the request was refused).",
            threadsafe=True,
        )
        self.audit_records = r.counter(
            "residency_gate_audit_records_total",
            "Audit records written.",
            threadsafe=True,
        )
        self.catalog_info = r.gauge(
            "residency_gate_catalog_info",
            "The catalog version currently serving (value is always 1).",
            ("version",),
        )
        self.config_reloads = r.counter(
            "residency_gate_config_reloads_total",
            "Config and catalog reload attempts, by result.",
            ("result",),
        )
        self.config_reload_failure = r.gauge(
            "residency_gate_config_reload_failure",
            "1 when the last config/catalog reload was refused (the old version keeps serving).",
        )
        self.open_connections = r.gauge(
            "residency_gate_open_connections",
            "Client connections currently open.",
        )
        self.flows = r.counter(
            "residency_gate_flows_total",
            "Client flows, by kind: intercepted (catalog host) or tunnelled (anything else).",
            ("kind",),
        )
        # pre-create the fixed label sets so rate() works from the first scrape
        for result in ("ok", "error"):
            self.config_reloads.labels(result=result)
        for kind in ("intercepted", "tunnelled"):
            self.flows.labels(kind=kind)

    # conveniences for the lead's code -------------------------------------

    def set_catalog_version(self, version: str) -> None:
        """Export residency_gate_catalog_info{version=...} 1 (only the current one)."""
        self.catalog_info.clear()
        self.catalog_info.labels(version=str(version)).set(1)

    def reload_result(self, ok: bool) -> None:
        """Count a reload attempt and set the last-reload-failed gauge."""
        self.config_reloads.labels(result="ok" if ok else "error").inc()
        self.config_reload_failure.set(0 if ok else 1)

    def decision(self, provider: str, decision: str, reason: str, seconds: float | None = None):
        """Count one decision (and observe its latency when given)."""
        self.decisions.labels(provider=provider, decision=decision, reason=reason).inc()
        if seconds is not None:
            self.decision_seconds.observe(seconds)

    def render(self) -> str:
        return self.registry.render()


METRICS = Metrics()
