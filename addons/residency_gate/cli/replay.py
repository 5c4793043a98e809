"""`residency-gate audit replay [PATH...] -c CANDIDATE [--html FILE] [--json]`: what would
change if the candidate config (and the catalog it names) had decided the recorded requests.

Registered as a subcommand of `audit` (whose other commands live in cli/audit.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..audit.replay import CHANGES, assume_keys_present, render_html, replay
from ..audit.verify import iter_records
from ..catalog.source import InvalidSource
from .inventory import existing_paths


def register_replay(subparsers) -> None:
    """Add `replay` to the `audit` command's subcommands."""
    audit = subparsers.choices.get("audit")
    if audit is None:
        return
    sub = next(a for a in audit._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("replay", help="re-decide recorded requests under a candidate config")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="audit files or directories (default: audit.dir of the config in use)")
    p.add_argument("-c", "--candidate", required=True, metavar="FILE",
                   help="the candidate config; its `catalog:` names the candidate catalog")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=1000, metavar="N",
                   help="changes listed one by one (default 1000)")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from ..catalog.bundle import load_bundle

    paths = existing_paths(args.paths, getattr(args, "default_audit_dir", None)
                           or Path("var/audit"), "audit replay")
    if paths is None:
        return 2
    try:
        bundle = assume_keys_present(load_bundle(args.candidate))
    except InvalidSource as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    report = replay(iter_records(paths), bundle)
    sources = [str(p) for p in paths]
    if args.html:
        Path(args.html).write_text(render_html(report, sources, args.limit), encoding="utf-8")
    if args.json:
        print(json.dumps(report.to_dict(args.limit), indent=2, sort_keys=True))
        return 0
    data = report.to_dict(args.limit)
    totals = data["totals"]
    print(f"replayed {data['decisions']} decision(s) under {data['candidate']['config']} "
          f"(config {data['candidate']['revisions']['config']}, catalog "
          f"{data['candidate']['revisions']['catalog']}): {data['exact']} exactly as recorded")
    print("  " + ", ".join(f"{k.replace('_', ' ')}: {totals[k]}" for k in CHANGES))
    for c in data["changes"]:
        who = f"{c['user']}@{c['client']}" if c["user"] else c["client"]
        flag = " (uncertain: " + ", ".join(c["uncertain"]) + ")" if c["uncertain"] else ""
        print(f"  {c['change']:<18} {c['id']}  {who}  {c['method']} {c['url']}: "
              f"{c['before']} -> {c['after']}{flag}")
    if args.html:
        print(f"wrote {args.html}")
    return 0
