"""`residency-gate catalog list [--json]`: every provider endpoint, where it processes,
its source and review date: the security team's record of what the proxy believes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..core.locate import (
    AzureLocator,
    BodyLocator,
    ConstantLocator,
    HostLocator,
    ModelPrefixLocator,
    PathLocator,
    UnconfirmedLocator,
)


def register(subparsers) -> None:
    cat = subparsers.add_parser("catalog", help="what the catalog knows (list)")
    cat_sub = cat.add_subparsers(dest="catalog_command", metavar="{list}")
    cat_sub.required = True
    lst = cat_sub.add_parser("list", help="every provider endpoint: places, source, review date")
    lst.add_argument("-c", "--config", metavar="FILE",
                     help="config file (its extra catalogs are listed too)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list)


def where(endpoint, regions) -> dict[str, Any]:
    """How the endpoint's places are found, with the places each value stands for."""
    loc, names = endpoint.locator, regions.region_list

    def table(values) -> dict[str, Any]:
        return {k: {"processing": names(v.processing), "storage": names(v.storage)}
                if v.processing != v.storage else names(v.processing) for k, v in values.items()}

    if isinstance(loc, ConstantLocator):
        return {"by": "constant", "places": table({"*": loc.spec})["*"]}
    if isinstance(loc, UnconfirmedLocator):
        return {"by": "unconfirmed", "places": None}
    if isinstance(loc, (HostLocator, PathLocator)):
        return {"by": loc.kind, "values": table(loc.table.values), "cloud": loc.table.cloud}
    if isinstance(loc, ModelPrefixLocator):
        return {"by": "model_prefix", "prefixes": table(loc.prefixes), "cloud": loc.table.cloud}
    if isinstance(loc, BodyLocator):
        return {"by": "body", "field": loc.field_name, "values": table(loc.values),
                "default": table({"*": loc.default})["*"]}
    if isinstance(loc, AzureLocator):
        return {"by": "azure", "deployment_types": dict(loc.deployment_types)}
    return {"by": loc.kind}


def short(w: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return f"{'+'.join(v['processing'])} (stored {'+'.join(v['storage'])})"
        return "+".join(v) if v else "?"

    if w["by"] == "constant":
        return fmt(w["places"])
    if w["by"] == "unconfirmed":
        return "unconfirmed (satisfies no requirement)"
    if w["by"] == "azure":
        return "from azure.resources (region + deployment type)"
    table = w.get("values") or w.get("prefixes") or {}
    parts = [f"{k}: {fmt(v)}" for k, v in list(table.items())[:4]]
    more = f", +{len(table) - 4} more" if len(table) > 4 else ""
    cloud = f"; any {w['cloud']} region by its country" if w.get("cloud") else ""
    return f"by {w['by']}: " + ", ".join(parts) + more + cloud


def cmd_list(args: argparse.Namespace) -> int:
    from .main import _bundle_or_exit

    bundle = _bundle_or_exit(args.config)
    catalog = bundle.catalog
    rows = []
    for e in catalog.endpoints:
        rows.append({"provider": e.provider.id, "provider_name": e.provider.name,
                     "endpoint": e.id, "name": e.name, "hosts": list(e.hosts), "api": e.api.id,
                     "places": where(e, catalog.regions), "source": e.source,
                     "reviewed": e.reviewed, "reroute": e.reroute.strategy,
                     "file": e.provider.file})
    if args.json:
        json.dump({"catalog_revision": catalog.revision, "endpoints": rows}, sys.stdout,
                  indent=2)
        print()
        return 0
    print(f"catalog {catalog.revision}: {len(catalog.providers)} providers, "
          f"{len(rows)} endpoints")
    for r in rows:
        print(f"\n{r['provider']}/{r['endpoint']}  {r['name']}")
        print(f"  hosts:    {', '.join(r['hosts'])}")
        print(f"  places:   {short(r['places'])}")
        print(f"  source:   {r['source']}  (reviewed {r['reviewed']})")
    return 0
