"""`residency-gate` command line: run, check, explain, audit, ca, catalog, inventory.

Exit codes: 0 success (explain: allowed or rerouted), 1 invalid input or a
blocked request (explain) or a damaged audit log (audit verify), 2 usage errors.
No command prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ..catalog.source import InvalidSource


def _bundle_or_exit(config: str | None):
    from ..catalog.bundle import load_bundle

    try:
        return load_bundle(config)
    except InvalidSource as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from None


def _valid_bundle_or_exit(config: str | None):
    """The bundle, also checked by mitmproxy itself: `check` and `run` refuse the same."""
    from ..ops.embed import option_problems

    bundle = _bundle_or_exit(config)
    problems = option_problems(bundle)
    if problems:
        where = bundle.config.path or "<defaults>"
        for problem in problems:
            print(f"{where}:1: mitmproxy refuses the options: {problem}", file=sys.stderr)
        raise SystemExit(1)
    return bundle


def cmd_check(args: argparse.Namespace) -> int:
    from ..catalog.freshness import stale

    bundle = _valid_bundle_or_exit(args.config)
    catalog, config = bundle.catalog, bundle.config
    for review, age in stale(catalog, config.catalog_max_age):
        print(f"{review.file}:{review.line}: warning: {review.what} was reviewed "
              f"{review.reviewed}, {age} days ago (catalog_max_age: {config.catalog_max_age}); "
              "check it against its source", file=sys.stderr)
    print(
        f"ok: config {config.path or '(built-in defaults)'} ({config.revision}); catalog "
        f"{catalog.revision}: {len(catalog.providers)} providers, {len(catalog.endpoints)} "
        f"endpoints, {len(catalog.regions.names)} region names"
    )
    return 0


def request_from_args(args: argparse.Namespace):
    """Turn `explain` arguments into the Request the proxy would build: the path exactly as
    given (the decision normalises it, as the proxy's does), the body's bytes untouched
    unless --model adds a missing `model`."""
    from ..core.request import Request
    from ..core.strict_json import BodyError, parse

    url = args.url if "://" in args.url else f"https://{args.url}"
    parts = urlsplit(url)
    if not parts.hostname or not re.fullmatch(r"[a-z0-9.\-\[\]:]+", parts.hostname):
        raise ValueError(f"not a URL: {args.url!r}")
    after_authority = url.split("://", 1)[1].partition("#")[0]
    slash, query = after_authority.find("/"), after_authority.find("?")
    start = slash if slash >= 0 and (query < 0 or slash < query) else -1
    path = after_authority[start:] if start >= 0 else "/" + (
        after_authority[query:] if query >= 0 else "")
    body: bytes | None = None
    if args.body is not None:
        raw = Path(args.body[1:]).read_bytes() if args.body.startswith("@") else args.body.encode()
        body = raw
        if args.model:
            try:
                ok = isinstance(parse(raw), dict)  # an object; else decide reports the body
            except BodyError:
                ok = False
            data = json.loads(raw) if ok else None
            if isinstance(data, dict) and "model" not in data:
                data["model"] = args.model
                body = json.dumps(data).encode()
    elif args.model:
        body = json.dumps({"model": args.model}).encode()
    return Request(
        method=args.method.upper(),
        scheme=parts.scheme,
        host=parts.hostname,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        path=path,
        tag_values=tuple(args.tag or ()),
        body=body,
        client_ip=args.client,
        user=args.user,
    )


def cmd_explain(args: argparse.Namespace) -> int:
    from ..audit.record import decision_fields
    from ..core.explain import render_text

    bundle = _bundle_or_exit(args.config)
    try:
        req = request_from_args(args)
    except (ValueError, OSError) as e:
        print(f"residency-gate explain: {e}", file=sys.stderr)
        return 2
    decision = bundle.decide(req)
    if args.json:  # the decision record the proxy would write, and the evaluation's trace
        out = decision_fields(decision, req, bundle.regions, bundle.revisions)
        out["trace"] = list(decision.trace)
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(render_text(bundle.regions, req, decision))
    return 1 if decision.disposition == "block" else 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..ops.run import run
    from ..ops.worker import worker_index
    from ..ops.workers import supervise

    bundle = _valid_bundle_or_exit(args.config)
    try:
        worker = worker_index()
    except ValueError as e:
        print(f"residency-gate run: {e}", file=sys.stderr)
        return 2
    n = args.workers if args.workers is not None else bundle.config.workers
    if worker is None and n > 1:
        return supervise(bundle, args.config, n)
    return run(bundle, config_arg=args.config)


def _workers_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("between 1 and 256")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="residency-gate",
        description="Egress proxy that keeps LLM API traffic inside the places it may go.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", metavar="FILE",
                       help="config file (default ./residency-gate.yaml, else built-in defaults)")
        return p

    run = with_config(sub.add_parser("run", help="start the proxy in the foreground"))
    run.add_argument("--workers", type=_workers_arg, metavar="N",
                     help="N proxy processes sharing the listen port (SO_REUSEPORT), "
                          "worker i on admin port + i; overrides `workers:` (default 1)")
    run.set_defaults(func=cmd_run)
    check = with_config(sub.add_parser("check", help="validate config and catalog"))
    check.set_defaults(func=cmd_check)

    explain = with_config(sub.add_parser(
        "explain", help="the decision the proxy would take for a request, without sending it"))
    explain.add_argument("url", help="e.g. https://api.openai.com/v1/chat/completions")
    explain.add_argument("--tag", action="append", metavar="T",
                         help="residency tag, as in the header (repeat or comma-separate)")
    explain.add_argument("--model", metavar="M", help="model ID (put in the body's `model`)")
    explain.add_argument("--body", metavar="JSON", help="request body as JSON, or @file")
    explain.add_argument("--method", default="POST")
    explain.add_argument("--client", metavar="IP", help="client address, for client rules")
    explain.add_argument("--user", metavar="U", help="proxy-auth user, for user rules")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_explain)

    for module in ("residency_gate.cli.audit", "residency_gate.cli.ca", "residency_gate.cli.catalog",
                   "residency_gate.cli.inventory"):
        try:
            registrar = __import__(module, fromlist=["register"]).register
        except ImportError:
            continue
        registrar(sub)
    from .replay import register_replay

    register_replay(sub)  # `audit replay`, beside the audit commands of cli/audit.py
    return parser


def _late_defaults(args: argparse.Namespace) -> None:
    """Subcommands that read files default to the config's directories."""
    if getattr(args, "command", None) not in ("audit", "ca"):
        return
    from ..catalog.config import find_config, load_config

    try:
        config = load_config(find_config(getattr(args, "config", None)))
    except InvalidSource:
        return
    args.default_audit_dir = config.audit.dir
    args.default_certs_dir = config.certs_dir
    args.default_ca_names = config.ca

    def patterns() -> list[str]:
        from ..catalog.compile import load_catalog

        return load_catalog(config.catalog).host_patterns()

    args.catalog_host_patterns = patterns


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _late_defaults(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
