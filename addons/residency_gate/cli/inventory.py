"""`residency-gate inventory [PATH...] [--since T] [--html FILE] [--json]`: which AI services
are used, by whom, how much, where they process, and what the configured requirements
would do: the "document your current state" report, from the audit trail alone."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..audit.inventory import build_inventory, render_html
from ..audit.verify import iter_records
from ..catalog.source import InvalidSource


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inventory", help="AI usage by service, client network and user, from the audit trail")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="audit files or directories (default: audit.dir of the config)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="config in use (client networks, compliant alternatives)")
    p.add_argument("--since", metavar="TIME", help="RFC 3339, YYYY-MM-DD, or an age: 2h, 7d")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inventory)


def existing_paths(given: list[str], default: Path, command: str) -> list[Path] | None:
    """The audit files or directories to read (default: the config's audit.dir); None,
    said on stderr, when one does not exist."""
    paths = [Path(p) for p in given] or [Path(default)]
    for p in paths:
        if not p.exists():
            print(f"residency-gate {command}: {p}: no such file or directory", file=sys.stderr)
            return None
    return paths


def advisor(bundle):
    """What would serve a service's users within a requirement: its placed alternatives
    and the private endpoints inside the requirement."""
    regions, policy = bundle.regions, bundle.policy
    endpoints = {e.key: e for e in [*bundle.catalog.endpoints,
                                    *bundle.catalog.services.endpoints]}

    def advise(provider: str, endpoint: str | None, places: list[str] | None,
               model: str | None) -> list[str]:
        found = endpoints.get(f"{provider}/{endpoint}")
        if found is None or not places:
            return []
        wanted = frozenset().union(*(regions.expand(p) for p in places if regions.knows(p)))
        out = [o.advice for o in policy.compliant_options(found, wanted)[:3]]
        out += [f"private endpoint {p.name} ({p.scheme}://{p.host}:{p.port}{p.path})"
                for p in policy.private if p.places <= wanted and p.serves(model)]
        return out

    return advise


def cmd_inventory(args: argparse.Namespace) -> int:
    from ..catalog.bundle import load_bundle
    from ..cli.audit import UsageError, parse_time

    try:
        bundle = load_bundle(args.config)
    except InvalidSource as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    paths = existing_paths(args.paths, bundle.config.audit.dir, "inventory")
    if paths is None:
        return 2
    try:
        since = parse_time(args.since) if args.since else None
    except UsageError as e:
        print(f"residency-gate inventory: {e}", file=sys.stderr)
        return 2
    networks = [r.network for r in bundle.config.clients if r.network is not None]
    inv = build_inventory(iter_records(paths), since=since, networks=networks,
                          advise=advisor(bundle))
    sources = [str(p) for p in paths]
    if args.html:
        Path(args.html).write_text(render_html(inv, sources), encoding="utf-8")
    if args.json:
        print(json.dumps(inv.to_dict(), indent=2, sort_keys=True))
        return 0
    totals = inv.totals()
    print(f"{totals['providers']} AI service(s), {totals['requests']} API request(s), "
          f"{totals['connections']} app connection(s); {totals['would_block']} would be "
          f"blocked ({totals['blocked']} refused, {totals['reported']} reported)")
    cols = ("SERVICE", "NETWORK", "USER", "REQ", "CONN", "BLOCK", "REPORT", "WOULD", "BYTES",
            "PROCESSED IN")
    print("  ".join(cols))
    for u in inv.sorted_rows():
        print("  ".join(str(v) for v in (
            f"{u.provider}/{u.endpoint}", u.network, u.user, u.requests, u.connections,
            u.blocked, u.reported, u.would_block, u.bytes_up + u.bytes_down, u.where)))
    if args.html:
        print(f"wrote {args.html}")
    return 0


