"""The product's Prometheus metrics, defined on ``prometheus_client``.

* Each ``Metrics()`` has its own ``CollectorRegistry``, not the library's global
  ``REGISTRY``: tests can make fresh ones, and /metrics shows exactly these series.
* Names, types, label names, buckets and help texts are part of the interface
  (dashboards, alerts, tests): change them only on purpose.
* prometheus_client adds a ``<name>_created`` series to every counter and histogram
  by default. It is switched off (``disable_created_metrics``, process-wide; nothing
  else in the proxy uses prometheus_client) so the exported series stay the same.
* prometheus_client's metrics are thread-safe: the audit writer may update them from
  its own thread.

Usage::

    from residency_gate.ops.metrics import METRICS
    METRICS.decision("openai", "block", "place", seconds=0.00042)
    METRICS.set_catalog_version("2026-11-28")
    text = METRICS.render()  # or prometheus_client.generate_latest(METRICS.registry)
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["AUDIT_WRITE_BUCKETS", "COUNTED_LIMITS", "DECISION_BUCKETS", "METRICS", "Metrics"]

prometheus_client.disable_created_metrics()

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


# limits.* keys counted in residency_gate_limit_hits_total (the request_body_* limits and
# decision_timeout_seconds refuse a request: residency_gate_decisions_total counts them by
# reason, body_too_large and decision_timeout)
COUNTED_LIMITS: tuple[str, ...] = (
    "client_header_seconds", "client_handshake_seconds", "client_idle_seconds",
    "client_body_seconds", "max_connections", "max_connections_per_client",
    "max_header_bytes", "max_header_count",
    "upstream_connect_seconds", "upstream_tls_seconds", "upstream_first_byte_seconds",
    "upstream_idle_seconds",
)


class Metrics:
    """Every metric residency-gate exports, in its own registry.

    ``reason`` in ``residency_gate_decisions_total`` is the engine's short reason code
    (compliant, no_requirement, place, ...), never the human message: a small fixed set.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter(
            "residency_gate_decisions_total",
            "Residency decisions taken, by provider, decision and short reason code.",
            ("provider", "decision", "reason"), registry=r,
        )
        self.reported = Counter(
            "residency_gate_reported_total",
            "Violations in report mode: forwarded, not enforced; by provider, the decision "
            "enforcing would have taken (block, reroute) and short reason code.",
            ("provider", "decision", "reason"), registry=r,
        )
        self.inventory_connections = Counter(
            "residency_gate_inventory_connections_total",
            "Connections to consumer AI apps tunnelled and recorded in the inventory "
            "(not intercepted), by service.",
            ("provider",), registry=r,
        )
        self.upstream_errors = Counter(
            "residency_gate_upstream_errors_total",
            "Forwarded LLM requests the provider did not answer, by provider and kind: "
            "connect, tls, timeout, reset.",
            ("provider", "kind"), registry=r,
        )
        self.decision_seconds = Histogram(
            "residency_gate_decision_seconds",
            "Time to reach a residency decision for one request, in seconds.",
            buckets=DECISION_BUCKETS, registry=r,
        )
        self.audit_write_seconds = Histogram(
            "residency_gate_audit_write_seconds",
            "Time to write (and, per audit.fsync, sync) one audit record, in seconds.",
            buckets=AUDIT_WRITE_BUCKETS, registry=r,
        )
        self.audit_failures = Counter(
            "residency_gate_audit_failures_total",
            "Audit records that could not be written (the request was refused).",
            registry=r,
        )
        self.audit_records = Counter(
            "residency_gate_audit_records_total", "Audit records written.", registry=r,
        )
        self.catalog_info = Gauge(
            "residency_gate_catalog_info",
            "The catalog version currently serving (value is always 1).",
            ("version",), registry=r,
        )
        self.config_reloads = Counter(
            "residency_gate_config_reloads_total",
            "Config and catalog reload attempts, by result.",
            ("result",), registry=r,
        )
        self.config_reload_failure = Gauge(
            "residency_gate_config_reload_failure",
            "1 when the last config/catalog reload was refused (the old version keeps serving).",
            registry=r,
        )
        self.catalog_review_age = Gauge(
            "residency_gate_catalog_review_age_days",
            "Days since the least recently reviewed catalog entry of each provider was "
            "checked against its source.",
            ("provider",), registry=r,
        )
        self.audit_writer_restarts = Counter(
            "residency_gate_audit_writer_restarts_total",
            "Audit writer processes restarted after dying (a failed write is never retried).",
            registry=r,
        )
        self.open_connections = Gauge(
            "residency_gate_open_connections", "Client connections currently open.", registry=r,
        )
        self.flows = Counter(
            "residency_gate_flows_total",
            "Client flows, by kind: intercepted (catalog host) or tunnelled (anything else).",
            ("kind",), registry=r,
        )
        self.refused_connections = Counter(
            "residency_gate_refused_connections_total",
            "Connections refused before any request: client outside access.clients, or "
            "CONNECT to a port outside access.connect_ports.",
            ("reason",), registry=r,
        )
        self.limit_hits = Counter(
            "residency_gate_limit_hits_total",
            "Times a limit fired, by its config key (limits.*): a connection closed or "
            "refused, a request refused, an upstream wait cut short.",
            ("limit",), registry=r,
        )
        # pre-create the fixed label sets so rate() works from the first scrape
        for result in ("ok", "error"):
            self.config_reloads.labels(result=result)
        for kind in ("intercepted", "tunnelled"):
            self.flows.labels(kind=kind)
        for reason in ("client", "connect_port"):
            self.refused_connections.labels(reason=reason)
        for limit in COUNTED_LIMITS:
            self.limit_hits.labels(limit=limit)

    def set_catalog_version(self, version: str) -> None:
        """Export residency_gate_catalog_info{version=...} 1 (only the current one)."""
        self.catalog_info.clear()
        self.catalog_info.labels(version=str(version)).set(1)

    def set_review_ages(self, ages: dict[str, int]) -> None:
        """Export residency_gate_catalog_review_age_days{provider} for the catalog in force."""
        self.catalog_review_age.clear()
        for provider, days in ages.items():
            self.catalog_review_age.labels(provider=provider).set(days)

    def reload_result(self, ok: bool) -> None:
        """Count a reload attempt and set the last-reload-failed gauge."""
        self.config_reloads.labels(result="ok" if ok else "error").inc()
        self.config_reload_failure.set(0 if ok else 1)

    def decision(self, provider: str, decision: str, reason: str,
                 seconds: float | None = None) -> None:
        """Count one decision (and observe its latency when given)."""
        self.decisions.labels(provider=provider, decision=decision, reason=reason).inc()
        if seconds is not None:
            self.decision_seconds.observe(seconds)

    def render(self) -> str:
        """The Prometheus text exposition format 0.0.4, as served on /metrics."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")


METRICS = Metrics()
