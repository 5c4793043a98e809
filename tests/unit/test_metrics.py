"""The dependency-free Prometheus registry and the product's metric set."""

from __future__ import annotations

import math
import re
import threading

import pytest

from residency_gate.ops.metrics import (
    CONTENT_TYPE,
    DECISION_BUCKETS,
    METRICS,
    Counter,
    Gauge,
    Histogram,
    Metrics,
    Registry,
)

# One line of the 0.0.4 text format: a comment, or name{labels} value.
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(
    rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(?:\{{{_LABEL}(?:,{_LABEL})*\}})? "
    r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[+-]Inf)$"
)
_HELP = re.compile(r"^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*$")
_TYPE = re.compile(r"^# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (counter|gauge|histogram|summary|untyped)$")


def assert_valid_exposition(text: str) -> None:
    assert text.endswith("\n")
    typed: set[str] = set()
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("# HELP"):
            assert _HELP.match(line), line
        elif line.startswith("# TYPE"):
            assert _TYPE.match(line), line
            name = line.split()[2]
            assert name not in typed, f"duplicate TYPE for {name}"
            typed.add(name)
        else:
            assert _SAMPLE.match(line), f"bad sample line: {line!r}"
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in typed or base in typed, f"sample before its TYPE: {line}"


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_counter_renders_help_type_and_labelled_samples():
    r = Registry()
    c = Counter("requests_total", "Requests.\nSecond line \\ done", ("code",), registry=r)
    c.labels(code="200").inc()
    c.labels(code="200").inc(2)
    c.labels("500").inc()
    text = r.render()
    assert text == (
        "# HELP requests_total Requests.\\nSecond line \\\\ done\n"
        "# TYPE requests_total counter\n"
        'requests_total{code="200"} 3\n'
        'requests_total{code="500"} 1\n'
    )
    assert_valid_exposition(text)


def test_unlabelled_metrics_are_exported_at_zero():
    r = Registry()
    Counter("a_total", "A.", registry=r)
    Gauge("b", "B.", registry=r)
    text = r.render()
    assert "a_total 0\n" in text and "b 0\n" in text
    assert_valid_exposition(text)


def test_label_values_are_escaped():
    r = Registry()
    c = r.counter("x_total", "X.", ("v",))
    c.labels(v='a"b\\c\nd').inc()
    text = r.render()
    assert 'x_total{v="a\\"b\\\\c\\nd"} 1\n' in text
    assert_valid_exposition(text)


def test_counter_refuses_to_decrease_and_wrong_labels():
    c = Counter("c_total", "C.", ("a", "b"))
    with pytest.raises(ValueError):
        c.labels(a="1", b="2").inc(-1)
    with pytest.raises(ValueError):
        c.labels(a="1")
    with pytest.raises(ValueError):
        c.labels(a="1", b="2", z="3")
    with pytest.raises(ValueError):
        c.labels("1")
    with pytest.raises(ValueError):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(ValueError):
        Counter("bad name", "x")
    with pytest.raises(ValueError):
        Counter("ok", "x", ("__reserved",))
    with pytest.raises(ValueError):
        Histogram("h", "x", ("le",))


def test_registry_refuses_duplicate_names():
    r = Registry()
    r.counter("dup_total", "x")
    with pytest.raises(ValueError):
        r.gauge("dup_total", "y")


def test_gauge_set_inc_dec_and_function():
    r = Registry()
    g = r.gauge("g", "G.")
    g.set(5)
    g.inc()
    g.dec(2.5)
    assert g.get() == 3.5
    assert "g 3.5\n" in r.render()
    box = {"n": 7}
    g.set_function(lambda: box["n"])
    box["n"] = 9
    assert "g 9\n" in r.render()

    def broken() -> float:
        raise RuntimeError("nope")

    g.set_function(broken)
    text = r.render()
    assert "g NaN\n" in text
    assert_valid_exposition(text)
    g.set(1)  # back to a stored value
    assert "g 1\n" in r.render()


def test_labelled_gauge_function_and_clear():
    r = Registry()
    g = r.gauge("conns", "C.", ("side",))
    g.labels(side="client").set_function(lambda: 4)
    g.labels(side="server").set(2)
    s = samples(r.render())
    assert s['conns{side="client"}'] == 4 and s['conns{side="server"}'] == 2
    g.remove(side="server")
    assert 'conns{side="server"}' not in samples(r.render())
    g.clear()
    assert r.render() == "# HELP conns C.\n# TYPE conns gauge\n"


def test_histogram_buckets_are_cumulative_le_inclusive_with_inf():
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", buckets=(0.1, 1, 0.5))
    for v in (0.05, 0.1, 0.3, 0.5, 2, 7):
        h.observe(v)
    text = r.render()
    assert text == (
        "# HELP lat_seconds Latency.\n"
        "# TYPE lat_seconds histogram\n"
        'lat_seconds_bucket{le="0.1"} 2\n'
        'lat_seconds_bucket{le="0.5"} 4\n'
        'lat_seconds_bucket{le="1"} 4\n'
        'lat_seconds_bucket{le="+Inf"} 6\n'
        "lat_seconds_sum 9.95\n"
        "lat_seconds_count 6\n"
    )
    assert_valid_exposition(text)


def test_labelled_histogram_and_timer():
    r = Registry()
    h = r.histogram("op_seconds", "Op.", ("op",), buckets=(0.001, 10))
    with h.labels(op="write").time():
        pass
    h.labels(op="read").observe(20)
    s = samples(r.render())
    assert s['op_seconds_bucket{op="write",le="10"}'] == 1
    assert s['op_seconds_count{op="write"}'] == 1
    assert s['op_seconds_bucket{op="read",le="10"}'] == 0
    assert s['op_seconds_bucket{op="read",le="+Inf"}'] == 1
    assert s['op_seconds_sum{op="read"}'] == 20


def test_threadsafe_metrics_lose_no_updates():
    r = Registry()
    c = r.counter("t_total", "T.", threadsafe=True)
    h = r.histogram("t_seconds", "T.", buckets=(0.5,), threadsafe=True)
    g = r.gauge("t_gauge", "T.", threadsafe=True)
    n, threads = 20_000, 8

    def work() -> None:
        for _ in range(n):
            c.inc()
            h.observe(0.25)
            g.inc()

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s = samples(r.render())
    assert s["t_total"] == n * threads
    assert s["t_gauge"] == n * threads
    assert s["t_seconds_count"] == n * threads
    assert s['t_seconds_bucket{le="0.5"}'] == n * threads


def test_special_values_render():
    r = Registry()
    g = r.gauge("s", "S.", ("k",))
    g.labels(k="inf").set(math.inf)
    g.labels(k="ninf").set(-math.inf)
    g.labels(k="nan").set(math.nan)
    g.labels(k="small").set(1e-05)
    text = r.render()
    assert 's{k="inf"} +Inf' in text and 's{k="ninf"} -Inf' in text and 's{k="nan"} NaN' in text
    assert 's{k="small"} 1e-05' in text
    assert_valid_exposition(text)


def test_product_metrics_names_and_types():
    m = Metrics()
    text = m.render()
    assert_valid_exposition(text)
    types = dict(
        line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE")
    )
    assert types == {
        "residency_gate_decisions_total": "counter",
        "residency_gate_decision_seconds": "histogram",
        "residency_gate_audit_write_seconds": "histogram",
        "residency_gate_audit_failures_total": "counter",
        "residency_gate_audit_records_total": "counter",
        "residency_gate_catalog_info": "gauge",
        "residency_gate_config_reloads_total": "counter",
        "residency_gate_config_reload_failure": "gauge",
        "residency_gate_open_connections": "gauge",
        "residency_gate_flows_total": "counter",
    }
    s = samples(text)
    # fixed label sets exist from the start, so rate() works on the first scrape
    assert s['residency_gate_config_reloads_total{result="ok"}'] == 0
    assert s['residency_gate_config_reloads_total{result="error"}'] == 0
    assert s['residency_gate_flows_total{kind="intercepted"}'] == 0
    assert s['residency_gate_flows_total{kind="tunnelled"}'] == 0
    assert s["residency_gate_audit_failures_total"] == 0
    assert s["residency_gate_config_reload_failure"] == 0
    assert isinstance(METRICS, Metrics)


def test_decision_buckets_span_10us_to_100ms():
    assert DECISION_BUCKETS[0] == pytest.approx(1e-5)
    assert DECISION_BUCKETS[-1] == pytest.approx(0.1)
    m = Metrics()
    m.decision("openai", "block", "place", seconds=0.0004)
    m.decision("openai", "block", "place")
    m.decision("anthropic", "allow", "compliant", seconds=0.2)
    s = samples(m.render())
    assert s['residency_gate_decisions_total{provider="openai",decision="block",reason="place"}'] == 2
    assert s['residency_gate_decision_seconds_bucket{le="0.0005"}'] == 1
    assert s['residency_gate_decision_seconds_bucket{le="0.1"}'] == 1
    assert s['residency_gate_decision_seconds_bucket{le="+Inf"}'] == 2
    assert s['residency_gate_decision_seconds_bucket{le="1e-05"}'] == 0


def test_catalog_version_and_reload_helpers():
    m = Metrics()
    m.set_catalog_version("v1")
    m.set_catalog_version("v2")
    s = samples(m.render())
    assert s['residency_gate_catalog_info{version="v2"}'] == 1
    assert 'residency_gate_catalog_info{version="v1"}' not in s
    m.reload_result(False)
    s = samples(m.render())
    assert s['residency_gate_config_reloads_total{result="error"}'] == 1
    assert s["residency_gate_config_reload_failure"] == 1
    m.reload_result(True)
    s = samples(m.render())
    assert s['residency_gate_config_reloads_total{result="ok"}'] == 1
    assert s["residency_gate_config_reload_failure"] == 0


def test_content_type_is_0_0_4():
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
