"""`residency-gate audit ...`: verify, show, report, rotate-key."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address, ip_network
from pathlib import Path

from ..audit.chain import parse_ts
from ..audit.keys import AuditKeyError, default_public_keys, load_public_keys, rotate_key
from ..audit.segments import iter_records
from ..audit.verify import Report, load_start, verify

SHOW_WINDOW = 10_000  # selected decisions held back waiting for their outcome, at most


class UsageError(Exception):
    """Bad input: reported as one line, exit 2."""


def _audit_dir(args) -> Path:
    return Path(getattr(args, "default_audit_dir", None) or "var/audit")


def _certs_dir(args) -> Path:
    return Path(getattr(args, "default_certs_dir", None) or "certs")


def _paths(args) -> list[Path]:
    paths = [Path(p) for p in (args.paths or [])] or [_audit_dir(args)]
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
    return paths


_REL = re.compile(r"^(\d+)\s*([smhdw])$")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """RFC 3339, a date (YYYY-MM-DD, UTC midnight), or a relative age like 15m, 2h, 7d."""
    now = now or datetime.now(UTC)
    t = text.strip()
    m = _REL.match(t)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        secs = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit] * n
        return now - timedelta(seconds=secs)
    try:
        return parse_ts(t)
    except ValueError:
        raise UsageError(f"bad time {text!r}: use RFC 3339 (2026-11-28T07:00:00Z), "
                         "a date (2026-11-28) or an age (15m, 2h, 7d)") from None


def _trusted_keys(args) -> dict:
    try:
        if args.pubkey:
            return load_public_keys([Path(p) for p in args.pubkey])
        keys = default_public_keys(_certs_dir(args))
    except AuditKeyError as exc:
        raise UsageError(str(exc)) from None
    if not keys:
        raise UsageError(f"no audit public key in {_certs_dir(args)}: pass --pubkey FILE")
    return keys


def _run_verify(args, on_record=None, keys: dict | None = None) -> Report:
    paths = _paths(args)
    anchor = getattr(args, "anchor", None)
    if anchor and not Path(anchor).is_file():
        raise UsageError(f"{anchor}: no such anchor file")
    start = None
    if getattr(args, "from_checkpoint", None):
        try:
            start = load_start(args.from_checkpoint)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--from-checkpoint: {exc}") from None
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1")
    try:
        return verify(paths, keys if keys is not None else _trusted_keys(args),
                      Path(anchor) if anchor else None,
                      thorough=getattr(args, "thorough", False), jobs=jobs, start=start,
                      on_record=on_record)
    except OSError as exc:
        raise UsageError(f"{getattr(exc, 'filename', '') or ''}: {exc.strerror or exc}") from None


def _ranges(r) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in r) or "none"


def cmd_verify(args) -> int:
    report = _run_verify(args)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            print(p.text())
        if report.problems_not_listed:
            print(f"... and {report.problems_not_listed} more problem(s) not listed")
        for origin, o in report.origins.items():
            anchored = (f", signed checkpoint covers seq 0-{o.anchored_size - 1}"
                        if o.anchored_size else ", no signed checkpoint covers it")
            start = f", verified from seq {o.start['size']}" if o.start else ""
            print(f"origin {origin}: {o.records} records in {len(o.files)} file(s), "
                  f"vouched seq {_ranges(o.vouched)}{anchored}{start}")
        n_err, n_warn = len(report.errors), len(report.warnings)
        how = ("every record's signature checked" if report.mode == "thorough"
               else "hash chain and signed checkpoints; --thorough checks every signature")
        print("verified: intact" + (f" ({n_warn} warning(s))" if n_warn else "")
              + f" [{how}]" if report.ok else f"verification FAILED: {n_err} problem(s)")
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------ show


def _client_matches(rec: dict, want: str) -> bool:
    vals = [str(rec.get("client") or ""), str(rec.get("user") or "")]
    if "/" in want:
        try:
            net = ip_network(want, strict=False)
        except ValueError:
            raise UsageError(f"bad --client network {want!r}") from None
        for v in vals:
            try:
                if ip_address(v.split("%")[0]) in net:
                    return True
            except ValueError:
                continue
        return False
    return want in vals


def _as_list(v) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def decision_filter(args) -> Callable[[dict], bool]:
    """The --decision/--provider/--requirement/--client/--since/--until filters."""
    since = parse_time(args.since) if getattr(args, "since", None) else None
    until = parse_time(args.until) if getattr(args, "until", None) else None
    if getattr(args, "client", None) and "/" in args.client:
        _client_matches({}, args.client)  # a bad network is a usage error now, not later

    def keep(rec: dict) -> bool:
        if args.decision and rec.get("decision") != args.decision:
            return False
        if args.provider and rec.get("provider") != args.provider:
            return False
        if args.requirement and args.requirement not in _as_list(rec.get("requirement")):
            return False
        if args.client and not _client_matches(rec, args.client):
            return False
        if since or until:
            try:
                ts = parse_ts(rec["ts"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return False
            if (since and ts < since) or (until and ts >= until):
                return False
        return True
    return keep


_OUTCOME = ("status", "bytes_in", "bytes_out", "duration_ms", "error")


def iter_decisions(records: Iterable[tuple[str, int, dict]], args,
                   window: int = SHOW_WINDOW, late: list[int] | None = None,
                   waiting: dict[str, dict] | None = None) -> Iterator[dict]:
    """The selected decisions in chain order, each with its outcome merged in, streaming.

    A decision waits for its outcome while fewer than ``window`` selected decisions queue
    behind it; past that it goes out without (counted in ``late``), so memory stays bounded
    whatever the log size. ``waiting`` (decision id -> row) is shared with a caller that
    reads only the outcomes someone waits for (see _show_wanted)."""
    keep = decision_filter(args)
    queue: deque[dict] = deque()
    waiting = {} if waiting is None else waiting
    for _file, _line, rec in records:
        kind = rec.get("kind")
        if kind == "outcome":
            row = waiting.pop(str(rec.get("decision_id")), None)
            if row is not None:
                row["outcome"] = {k: rec.get(k) for k in _OUTCOME}
        elif kind == "decision" and keep(rec):
            row = {**rec, "outcome": None}
            queue.append(row)
            waiting[str(rec.get("id"))] = row
            if len(queue) > window:
                head = queue.popleft()
                if waiting.pop(str(head.get("id")), None) is not None and late is not None:
                    late[0] += 1
                yield head
        while queue and str(queue[0].get("id")) not in waiting:
            yield queue.popleft()
    yield from queue


def _show_wanted(args, waiting: dict[str, dict]) -> Callable[[bytes], bool]:
    """Which lines `show` needs parsed: decisions that hold the values asked for
    (--decision, --provider; the filters decide again on the parsed record), and outcomes
    of decisions that wait for one. A line laid out otherwise is parsed."""
    needles = [json.dumps(v, ensure_ascii=False).encode()
               for v in (args.decision, args.provider) if v]

    def wanted(raw: bytes) -> bool:
        if b'"kind":"decision"' in raw:
            return all(x in raw for x in needles)
        if b'"kind":"outcome"' in raw:
            i = raw.find(b'"decision_id":"')
            return i < 0 or raw[i + 15:raw.find(b'"', i + 15)].decode(
                "utf-8", "replace") in waiting
        return b',"kind":"' not in raw  # another kind of record; else: look
    return wanted


def select_decisions(records, args) -> list[dict]:
    """iter_decisions() as a list (small logs, tests)."""
    return list(iter_decisions(records, args))


def _cell(v, width: int) -> str:
    s = ",".join(_as_list(v)) if isinstance(v, list) else ("" if v is None else str(v))
    return s if len(s) <= width else s[: width - 1] + "…"


def cmd_show(args) -> int:
    paths = _paths(args)
    late = [0]
    waiting: dict[str, dict] = {}
    errors: list[str] = []
    records = iter_records(paths, _show_wanted(args, waiting), errors)
    rows = iter_decisions(records, args, late=late, waiting=waiting)
    n = 0
    if args.json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False, sort_keys=True))
            n += 1
        _show_late(late[0], errors)
        return 0
    cols = [("TIME", 19), ("ID", 16), ("DECISION", 8), ("CLIENT", 15), ("PROVIDER", 12),
            ("MODEL", 18), ("REQUIRE", 10), ("PLACES", 16), ("STATUS", 6), ("CODE", 24),
            ("REASON", 60)]
    print("  ".join(n.ljust(w) for n, w in cols).rstrip())
    for r in rows:
        n += 1
        status = (r.get("outcome") or {}).get("status") or r.get("status")
        client = r.get("client") or ""
        if r.get("user"):
            client = f"{r['user']}@{client}"
        decision = r.get("decision")
        if decision == "block" and r.get("enforced") is False:
            decision = "report"
        vals = [str(r.get("ts", ""))[:19].replace("T", " "), r.get("id"), decision,
                client, r.get("provider"), r.get("model"), r.get("requirement"),
                r.get("places"), status, r.get("code"), r.get("reason")]
        print("  ".join(_cell(v, w).ljust(w) for v, (_n, w) in zip(vals, cols, strict=True))
              .rstrip())
    print(f"{n} decision(s)", file=sys.stderr)
    _show_late(late[0], errors)
    return 0


def _show_late(n: int, errors: list[str]) -> None:
    for e in errors:
        print(f"residency-gate audit show: {e}", file=sys.stderr)
    if n:
        print(f"{n} decision(s) shown without their outcome: it came more than "
              f"{SHOW_WINDOW} selected decisions later (narrow with --since/--until)",
              file=sys.stderr)


# ------------------------------------------------------------------------------ report


def cmd_report(args) -> int:
    from ..audit.report import ReportBuilder, show_command

    builder = ReportBuilder(decision_filter(args))
    keys = _trusted_keys(args)
    report = _run_verify(args, on_record=builder.on_record, keys=keys)
    sources = [str(p) for p in _paths(args)]
    page = builder.render(report, sources, sorted(keys), show_command(sources))
    try:
        Path(args.html).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{args.html}: {exc.strerror or exc}") from None
    print(f"wrote {args.html}: {builder.decisions} decision(s), {builder.blocked} blocked, "
          f"{builder.unverified_count} record(s) did not verify, "
          f"verification {'intact' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------ rotate-key


def cmd_rotate_key(args) -> int:
    certs = Path(args.certs) if args.certs else _certs_dir(args)
    try:
        old, new = rotate_key(certs)
    except AuditKeyError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{certs}: {exc.strerror or exc}") from None
    old_hex = old.key_id.split(":", 1)[1]
    print(f"audit signing key rotated: {old.key_id} -> {new.key_id}")
    print(f"old key kept as {certs}/audit-signing-key.{old_hex}.pem (+ .pub.pem)")
    print("restart the proxy: it writes a key_rotation record signed with the old key, then "
          "signs with the new one. Once `audit verify` shows the hand-over, the old private "
          "key may be removed; keep the old .pub.pem.")
    return 0


# ------------------------------------------------------------------------------ wiring


def _guard(func):
    def run(args) -> int:
        try:
            return func(args)
        except UsageError as exc:
            print(f"residency-gate audit: error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            return 0
    run.__name__ = func.__name__
    return run


def _verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pubkey", action="append", metavar="FILE",
                   help="trusted public key (repeatable); default: the keys in certs_dir")
    p.add_argument("--anchor", metavar="FILE", help="checkpoints kept off the host")
    p.add_argument("--thorough", action="store_true",
                   help="also check every record's own signature (spread over the cores)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="worker processes for --thorough (default: the number of cores)")
    p.add_argument("--from-checkpoint", metavar="CHECKPOINT",
                   help="verify from a signed checkpoint you trust (a file of checkpoint "
                        "lines, e.g. the anchor, or one line) when old segments are gone")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decision", choices=["allow", "block", "reroute"])
    p.add_argument("--provider")
    p.add_argument("--requirement", metavar="R", help="requirement name (region/zone/tag)")
    p.add_argument("--client", metavar="C", help="client IP, network (CIDR) or proxy user")
    p.add_argument("--since", metavar="TIME", help="RFC 3339, YYYY-MM-DD, or an age: 2h, 7d")
    p.add_argument("--until", metavar="TIME")


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="verify, list and report on audit files")
    sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)

    v = sub.add_parser("verify", help="verify signatures, chain and checkpoints")
    v.add_argument("paths", nargs="*", metavar="PATH", help="files or directories")
    _verify_options(v)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_guard(cmd_verify))

    s = sub.add_parser("show", help="list decisions")
    s.add_argument("paths", nargs="*", metavar="PATH")
    _filters(s)
    s.add_argument("--json", action="store_true", help="JSON lines")
    s.set_defaults(func=_guard(cmd_show))

    r = sub.add_parser("report", help="self-contained HTML report")
    r.add_argument("paths", nargs="*", metavar="PATH")
    r.add_argument("--html", required=True, metavar="FILE")
    _verify_options(r)
    _filters(r)
    r.set_defaults(func=_guard(cmd_report))

    k = sub.add_parser("rotate-key", help="retire the audit signing key and create a new one")
    k.add_argument("--certs", metavar="DIR", help="default: certs_dir from the config")
    k.set_defaults(func=_guard(cmd_rotate_key))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="residency-gate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
