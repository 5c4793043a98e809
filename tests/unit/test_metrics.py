"""The product's metric set on prometheus_client: names, types, labels, buckets, helpers.

The exposition is parsed with prometheus_client's own parser, so these tests pin what
dashboards see (series and values), not the byte layout of the text.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from residency_gate.ops.metrics import AUDIT_WRITE_BUCKETS, DECISION_BUCKETS, METRICS, Metrics

EXPECTED = {  # exported name -> (type, label names, help)
    "residency_gate_decisions_total": (
        "counter", ("provider", "decision", "reason"),
        "Residency decisions taken, by provider, decision and short reason code."),
    "residency_gate_reported_total": (
        "counter", ("provider", "decision", "reason"),
        "Violations in report mode: forwarded, not enforced; by provider, the decision "
        "enforcing would have taken (block, reroute) and short reason code."),
    "residency_gate_upstream_errors_total": (
        "counter", ("provider", "kind"),
        "Forwarded LLM requests the provider did not answer, by provider and kind: "
        "connect, tls, timeout, reset."),
    "residency_gate_inventory_connections_total": (
        "counter", ("provider",),
        "Connections to consumer AI apps tunnelled and recorded in the inventory "
        "(not intercepted), by service."),
    "residency_gate_decision_seconds": (
        "histogram", (), "Time to reach a residency decision for one request, in seconds."),
    "residency_gate_audit_write_seconds": (
        "histogram", (),
        "Time to write (and, per audit.fsync, sync) one audit record, in seconds."),
    "residency_gate_audit_failures_total": (
        "counter", (), "Audit records that could not be written (the request was refused)."),
    "residency_gate_audit_records_total": ("counter", (), "Audit records written."),
    "residency_gate_catalog_info": (
        "gauge", ("version",), "The catalog version currently serving (value is always 1)."),
    "residency_gate_config_reloads_total": (
        "counter", ("result",), "Config and catalog reload attempts, by result."),
    "residency_gate_config_reload_failure": (
        "gauge", (), "1 when the last config/catalog reload was refused "
        "(the old version keeps serving)."),
    "residency_gate_catalog_review_age_days": (
        "gauge", ("provider",), "Days since the least recently reviewed catalog entry of each "
        "provider was checked against its source."),
    "residency_gate_open_connections": ("gauge", (), "Client connections currently open."),
    "residency_gate_flows_total": (
        "counter", ("kind",),
        "Client flows, by kind: intercepted (catalog host) or tunnelled (anything else)."),
    "residency_gate_refused_connections_total": (
        "counter", ("reason",),
        "Connections refused before any request: client outside access.clients, or "
        "CONNECT to a port outside access.connect_ports."),
    "residency_gate_audit_writer_restarts_total": (
        "counter", (),
        "Audit writer processes restarted after dying (a failed write is never retried)."),
    "residency_gate_limit_hits_total": (
        "counter", ("limit",),
        "Times a limit fired, by its config key (limits.*): a connection closed or refused, "
        "a request refused, an upstream wait cut short."),
}


def exposition(m: Metrics) -> tuple[dict[str, tuple[str, str]], dict[tuple, float]]:
    """Parse m.render(): ({exported name: (type, help)}, {(sample, labels...): value})."""
    text = m.render()
    assert text.endswith("\n")
    types = {line.split()[2]: line.split()[3]
             for line in text.splitlines() if line.startswith("# TYPE")}
    helps = {}
    values = {}
    for fam in text_string_to_metric_families(text):
        # the parser strips a counter's _total from the family name; the TYPE line has it
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        helps[name] = fam.documentation
        for s in fam.samples:
            values[(s.name, *sorted(s.labels.items()))] = s.value
    assert set(types) == set(helps)
    return {n: (types[n], helps[n]) for n in types}, values


def sample(name: str, **labels: str) -> tuple:
    return (name, *sorted(labels.items()))


def test_names_types_help_and_no_extra_series():
    m = Metrics()
    m.decision("openai", "block", "place", seconds=0.001)
    m.set_catalog_version("v1")
    families, values = exposition(m)
    assert families == {n: (t, h) for n, (t, _, h) in EXPECTED.items()}
    # no _created (or any other) series beyond the metrics themselves
    for name, *_ in values:
        assert name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") \
            in EXPECTED, name
    assert not any(name.endswith("_created") for name, *_ in values)
    assert isinstance(METRICS, Metrics)
    assert isinstance(m.registry, CollectorRegistry)
    assert m.registry is not Metrics().registry  # fresh registries, not the global one


def test_label_names():
    m = Metrics()
    m.decision("openai", "block", "place")
    m.reported.labels(provider="openai", decision="block", reason="unknown_place").inc()
    m.inventory_connections.labels(provider="chatgpt").inc()
    m.upstream_errors.labels(provider="openai", kind="timeout").inc()
    m.set_catalog_version("v1")
    m.set_review_ages({"openai": 1})
    m.audit_failures.inc()
    _, values = exposition(m)
    seen: dict[str, set[str]] = {}
    for name, *labels in values:
        base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        seen.setdefault(base, set()).update(k for k, _ in labels if k != "le")
    assert seen == {n: set(labels) for n, (_, labels, _) in EXPECTED.items()}


def test_fixed_label_sets_exist_from_the_start():
    _, s = exposition(Metrics())
    # so rate() works on the first scrape
    assert s[sample("residency_gate_config_reloads_total", result="ok")] == 0
    assert s[sample("residency_gate_config_reloads_total", result="error")] == 0
    assert s[sample("residency_gate_flows_total", kind="intercepted")] == 0
    assert s[sample("residency_gate_flows_total", kind="tunnelled")] == 0
    assert s[sample("residency_gate_audit_failures_total")] == 0
    assert s[sample("residency_gate_config_reload_failure")] == 0
    # labelled by value: nothing until the first decision
    assert not any(k[0] == "residency_gate_decisions_total" for k in s)


def test_buckets():
    assert DECISION_BUCKETS[0] == pytest.approx(1e-5)
    assert DECISION_BUCKETS[-1] == pytest.approx(0.1)
    assert AUDIT_WRITE_BUCKETS[0] == pytest.approx(1e-4)
    assert AUDIT_WRITE_BUCKETS[-1] == pytest.approx(2.5)
    _, s = exposition(Metrics())
    for name, buckets in (("residency_gate_decision_seconds", DECISION_BUCKETS),
                          ("residency_gate_audit_write_seconds", AUDIT_WRITE_BUCKETS)):
        les = [dict(labels)["le"] for n, *labels in s if n == f"{name}_bucket"]
        assert [float(le) for le in les] == [*buckets, float("inf")]


def test_decisions_and_latency_le_inclusive():
    m = Metrics()
    m.decision("openai", "block", "place", seconds=0.0004)
    m.decision("openai", "block", "place")
    m.decision("anthropic", "allow", "compliant", seconds=0.2)
    m.audit_write_seconds.observe(0.005)  # == a bound: counted in that bucket
    _, s = exposition(m)
    key = sample("residency_gate_decisions_total", provider="openai", decision="block",
                 reason="place")
    assert s[key] == 2
    assert s[sample("residency_gate_decision_seconds_bucket", le="1e-05")] == 0
    assert s[sample("residency_gate_decision_seconds_bucket", le="0.0005")] == 1
    assert s[sample("residency_gate_decision_seconds_bucket", le="0.1")] == 1
    assert s[sample("residency_gate_decision_seconds_bucket", le="+Inf")] == 2
    assert s[sample("residency_gate_decision_seconds_count")] == 2
    assert s[sample("residency_gate_decision_seconds_sum")] == pytest.approx(0.2004)
    assert s[sample("residency_gate_audit_write_seconds_bucket", le="0.005")] == 1
    assert s[sample("residency_gate_audit_write_seconds_bucket", le="0.0025")] == 0


def test_catalog_version_and_reload_helpers():
    m = Metrics()
    m.set_catalog_version("v1")
    m.set_catalog_version("v2")
    _, s = exposition(m)
    assert s[sample("residency_gate_catalog_info", version="v2")] == 1
    assert sample("residency_gate_catalog_info", version="v1") not in s
    m.reload_result(False)
    _, s = exposition(m)
    assert s[sample("residency_gate_config_reloads_total", result="error")] == 1
    assert s[sample("residency_gate_config_reload_failure")] == 1
    m.reload_result(True)
    _, s = exposition(m)
    assert s[sample("residency_gate_config_reloads_total", result="ok")] == 1
    assert s[sample("residency_gate_config_reload_failure")] == 0


def test_connections_flows_audit_counters():
    m = Metrics()
    m.open_connections.inc()
    m.open_connections.inc()
    m.open_connections.dec()
    m.flows.labels(kind="tunnelled").inc()
    m.audit_records.inc()
    m.audit_failures.inc()
    _, s = exposition(m)
    assert s[sample("residency_gate_open_connections")] == 1
    assert s[sample("residency_gate_flows_total", kind="tunnelled")] == 1
    assert s[sample("residency_gate_audit_records_total")] == 1
    assert s[sample("residency_gate_audit_failures_total")] == 1


def test_label_values_are_escaped():
    m = Metrics()
    m.set_catalog_version('a"b\\c\nd')
    _, s = exposition(m)
    assert s[sample("residency_gate_catalog_info", version='a"b\\c\nd')] == 1
