"""The shipped Grafana dashboard and Prometheus alerts (docker/monitoring/): they load, every
query parses (promtool, Debian's `prometheus` package, installed by .ci/run), every alert
fires on the series it is meant for (promtool test rules), and every residency_gate_*
metric they name is one the proxy exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from browser import require_tool
from residency_gate.ops.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "docker" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC = re.compile(r"\bresidency_gate_[a-z_]+\b")
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "$instance": ".*"}


def exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        names.add(name)
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for group in doc["groups"] for r in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", ())]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    return exprs


def promtool() -> str:
    return require_tool(("promtool",), "prometheus")


def test_alerts_cover_what_an_admin_must_know() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    for needed in ("ResidencyGateAuditUnavailable", "ResidencyGateReloadFailing",
                   "ResidencyGateBlockRateSpike", "ResidencyGateUpstreamErrors",
                   "ResidencyGateCatalogStale"):
        assert needed in rules
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_metric_named_exists() -> None:
    exported = exported_names()
    named = {m for e in [*(r["expr"] for r in alert_rules()), *dashboard_exprs()]
             for m in METRIC.findall(e)}
    assert named, "no residency_gate metric referenced"
    assert named <= exported, f"not exported by ops/metrics.py: {sorted(named - exported)}"
    # and the dashboard shows every metric family the proxy exports
    families = {n.removesuffix("_bucket") for n in exported
                if not n.endswith(("_sum", "_count"))}
    shown = {m.removesuffix("_bucket") for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dashboard_is_importable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    tool = promtool()
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", "alerts.test.yaml"]):
        done = subprocess.run([tool, *args], cwd=MONITORING, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    tool = promtool()
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").split(",")[0]
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([tool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
