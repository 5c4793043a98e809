"""The catalog as a record: every entry sourced and reviewed, stale reviews warned about,
`catalog list` showing what the proxy believes, review ages in /metrics."""

from __future__ import annotations

import json
from datetime import date

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import shipped_catalog
from residency_gate.catalog.freshness import oldest_by_provider, stale
from residency_gate.ops.metrics import Metrics
from test_check import run

STALE = """\
provider: acme
name: Acme
api: openai
source: https://acme.example/docs
reviewed: 2025-01-01
endpoints:
  - id: api
    name: Acme API
    hosts: [api.acme.example]
    places: [eu]
    source: https://acme.example/docs/regions
    reviewed: 2025-01-01
"""


def test_every_entry_is_sourced_and_reviewed():
    catalog = shipped_catalog()
    for e in catalog.endpoints:
        assert e.source.startswith(("http", "the ")) and e.reviewed, e.key
        date.fromisoformat(e.reviewed)
    assert {r.what for r in catalog.reviews} >= {e.key for e in catalog.endpoints}


@pytest.mark.parametrize("missing", ["source", "reviewed"])
def test_an_entry_without_source_or_review_is_refused(tmp_path, missing):
    text = "\n".join(line for line in STALE.splitlines()
                     if not line.strip().startswith(f"{missing}:") or not line.startswith("    "))
    (tmp_path / "acme.yaml").write_text(text + "\n")
    (tmp_path / "cfg.yaml").write_text(f"catalog: [{tmp_path / 'acme.yaml'}]\n")
    r = run("check", "-c", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 1 and f"'{missing}' is a required property" in r.stderr, r.stderr


def test_stale_reviews_are_warnings_with_their_line(tmp_path):
    (tmp_path / "acme.yaml").write_text(STALE)
    (tmp_path / "cfg.yaml").write_text(f"catalog: [{tmp_path / 'acme.yaml'}]\n"
                                       "catalog_max_age: 90\n")
    r = run("check", "-c", str(tmp_path / "cfg.yaml"))
    assert r.returncode == 0, r.stderr  # a warning, not an error
    assert f"{tmp_path / 'acme.yaml'}:5: warning: acme was reviewed 2025-01-01" in r.stderr
    assert f"{tmp_path / 'acme.yaml'}:12: warning: acme/api was reviewed 2025-01-01" in r.stderr
    assert "catalog_max_age: 90" in r.stderr
    assert "acme.yaml" not in run("check").stderr  # the shipped catalog alone is fresh


def test_freshness_arithmetic():
    catalog = shipped_catalog()
    assert stale(catalog, 180, date(2026, 12, 1)) == []
    later = stale(catalog, 180, date(2027, 12, 1))
    assert later and later[0][1] >= later[-1][1]
    ages = oldest_by_provider(catalog, date(2026, 12, 1))
    assert set(ages) == set(catalog.providers) and all(a >= 1 for a in ages.values())


def test_review_age_metric():
    m = Metrics()
    m.set_review_ages({"openai": 3, "acme": 200})
    m.set_review_ages({"openai": 4})  # a reload: only the catalog in force
    fam = {f.name: f for f in text_string_to_metric_families(m.render())}
    samples = {s.labels["provider"]: s.value
               for s in fam["residency_gate_catalog_review_age_days"].samples}
    assert samples == {"openai": 4.0}


def test_catalog_list(tmp_path):
    r = run("catalog", "list", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    rows = {f"{e['provider']}/{e['endpoint']}": e for e in data["endpoints"]}
    assert set(rows) == {e.key for e in shipped_catalog().endpoints}
    assert rows["mistral/global"]["places"] == {"by": "constant", "places": ["global"]}
    assert rows["openai/regional"]["places"]["values"]["eu"] == ["eea_ch"]
    assert all(e["source"] and e["reviewed"] for e in data["endpoints"])
    text = run("catalog", "list", cwd=tmp_path).stdout
    assert "api.scaleway.ai" in text and "unconfirmed" in text


def test_docs_providers_lists_every_endpoint():
    """docs/providers.md is what people read: it must not drift from the catalog."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "providers.md").read_text()
    catalog = shipped_catalog()
    assert f"{len(catalog.providers)} providers, {len(catalog.endpoints)} endpoints" in text
    for e in catalog.endpoints:
        assert f"| `{e.provider.id}` |" in text and f"| `{e.id}` |" in text, e.key
