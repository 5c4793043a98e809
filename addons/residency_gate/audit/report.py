"""The audit report: one self-contained HTML page a security lead can trust at a glance.

Built while the verifier walks the log (:meth:`ReportBuilder.on_record` is its callback),
so it reads each record once and keeps only aggregates: counts by provider, requirement,
reason code, client and day, the top blocked flows, the latest blocked decisions, and the
records that did not verify. The page stays small (well under 2 MB) whatever the log size.

Order of the page: the verification verdict (also in the title), then what vouched for the
records (keys, checkpoints, anchor), then blocked flows, then counts. A record that did not
verify is listed as such and counted nowhere else. No scripts, no external resources.
"""

from __future__ import annotations

import shlex
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape

from .verdict import ERROR, WARNING, Report

TOP = 20            # rows per count table
TOP_FLOWS = 10      # blocked flow groups listed
LATEST = 25         # latest blocked decisions listed in full
MAX_KEYS = 20_000   # distinct values counted per dimension (the rest: "(other)")
MAX_UNVERIFIED = 100
MAX_PROBLEMS_SHOWN = 50

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;
max-width:1200px;padding:12px 16px;color:#1d1d1f;background:#fff}
h1{font-size:1.35em;margin:.2em 0 .6em}h2{font-size:1.1em;margin:1.8em 0 .4em;
border-bottom:1px solid #ccc;padding-bottom:.2em}
.verdict{border-radius:6px;padding:12px 16px;margin:0 0 1em;font-size:1.05em}
.verdict strong{font-size:1.25em;display:block;margin-bottom:.2em}
.v-ok{background:#e6f4ea;border:2px solid #1e7e34;color:#0f4d1f}
.v-bad{background:#fdecea;border:3px solid #b00020;color:#6d0012}
.v-warn{background:#fff4e0;border:2px solid #b26a00;color:#5c3700}
.wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.4em 0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:4px 6px;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600;white-space:nowrap}
td{overflow-wrap:break-word;max-width:28em}
td.num,th.num{text-align:right;white-space:nowrap}
td.t{white-space:nowrap}
code{font-size:12px;overflow-wrap:anywhere}
details summary{cursor:pointer}
details p{margin:.3em 0 .3em 1em;max-width:60em}
.bar{display:inline-block;height:9px;background:#4a78d0;vertical-align:middle}
.bar.block{background:#c62828}
.tag{display:inline-block;padding:0 6px;border-radius:3px;font-size:12px;font-weight:600}
.s-block{background:#fdecea;color:#b00020}.s-allow{background:#e6f4ea;color:#1e6b2f}
.s-reroute{background:#e8f0fe;color:#1a4fb0}.s-report{background:#fff4e0;color:#8a5a00}
.bad{color:#b00020;font-weight:600}.muted{color:#666}
p.note{color:#444;margin:.3em 0}
@media (max-width:640px){body{padding:8px}
table.r,table.r tbody,table.r tr,table.r td{display:block;width:100%;max-width:none}
table.r tr.h{display:none}table.r tr{border-bottom:1px solid #ccc;padding:6px 0}
table.r td{border:none;padding:1px 0;text-align:left!important;white-space:normal}
table.r td[data-label]::before{content:attr(data-label) ": ";font-weight:600;color:#555}
table.r td.nolabel::before{content:none}.hide-sm{display:none!important}}
"""


def _e(v) -> str:
    if isinstance(v, list):
        v = ", ".join(str(x) for x in v)
    return escape("" if v is None else str(v))


def _n(v: int) -> str:
    return f"{v:,}"


def _table(head: list[tuple[str, str]], rows: list[list[tuple[str, str]]]) -> str:
    """A table that becomes one card per row on a phone: (label, css class) per column,
    (html, css class) per cell; cells carry their column's label for the card view."""
    out = ['<div class="wrap"><table class="r"><tr class="h">']
    out += [f'<th class="{c}">{_e(h)}</th>' for h, c in head]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>")
        for (label, hc), (html, cls) in zip(head, row, strict=True):
            cls = " ".join(x for x in (cls, hc) if x)
            attr = f' data-label="{_e(label)}"' if label else ""
            out.append(f'<td class="{cls}"{attr}>{html}</td>')
        out.append("</tr>")
    out.append("</table></div>")
    return "".join(out)


class _Capped:
    """A Counter of at most MAX_KEYS distinct keys; later new keys count as "(other)"."""

    def __init__(self) -> None:
        self.total: Counter = Counter()
        self.blocked: Counter = Counter()

    def add(self, key: str, blocked: bool) -> None:
        if key not in self.total and len(self.total) >= MAX_KEYS:
            key = "(other)"
        self.total[key] += 1
        if blocked:
            self.blocked[key] += 1


@dataclass
class _Flow:
    count: int = 0
    last_ts: str = ""
    last_id: str = ""
    status: Counter = field(default_factory=Counter)


def _client(rec: dict) -> str:
    client = rec.get("client") or "?"
    return f"{rec['user']}@{client}" if rec.get("user") else str(client)


def _verdict(rec: dict) -> str:
    d = rec.get("decision")
    if d == "block" and rec.get("enforced") is False:
        return "report"  # would have been blocked; forwarded (report mode)
    return str(d)


class ReportBuilder:
    """Aggregates of the records the verifier vouched for (``select``: the CLI's filters)."""

    def __init__(self, select: Callable[[dict], bool] | None = None) -> None:
        self.select = select
        self.decisions = 0
        self.by_verdict: Counter = Counter()
        self.dims = {name: _Capped() for name in
                     ("provider", "requirement", "code", "client", "day", "status")}
        self.flows: dict[tuple, _Flow] = {}
        self.flows_other = 0
        self.latest: deque[dict] = deque(maxlen=LATEST)
        self.blocked = 0
        self.unverified: list[dict] = []
        self.unverified_count = 0
        self.unverified_decisions = 0
        self.configs: deque[dict] = deque(maxlen=10)
        self.config_count = 0
        self.first_ts: str | None = None
        self.last_ts: str | None = None
        self.kinds: Counter = Counter()

    # ------------------------------------------------------------------ feeding

    def on_record(self, file: str, line: int, rec: dict, authentic: bool) -> None:
        kind = rec.get("kind")
        if not authentic:
            self.unverified_count += 1
            if kind == "decision":
                self.unverified_decisions += 1
            if len(self.unverified) < MAX_UNVERIFIED:
                self.unverified.append({"file": file, "line": line, "seq": rec.get("seq"),
                                        "kind": kind, "ts": rec.get("ts"),
                                        "decision": rec.get("decision"),
                                        "code": rec.get("code"), "id": rec.get("id")})
            return
        self.kinds[kind] += 1
        if kind == "config":
            self.config_count += 1
            self.configs.append(rec)
            return
        if kind != "decision" or (self.select is not None and not self.select(rec)):
            return
        self.decisions += 1
        ts = str(rec.get("ts") or "")
        if self.first_ts is None or ts < self.first_ts:
            self.first_ts = ts
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        verdict = _verdict(rec)
        self.by_verdict[verdict] += 1
        blocked = verdict == "block"
        d = self.dims
        d["provider"].add(str(rec.get("provider") or "(unknown)"), blocked)
        for r in rec.get("requirement") or ["(none)"]:
            d["requirement"].add(str(r), blocked)
        d["code"].add(str(rec.get("code") or "(none)"), blocked)
        d["client"].add(_client(rec), blocked)
        d["day"].add(ts[:10] or "?", blocked)
        d["status"].add(str(rec.get("status") or "forwarded"), blocked)
        if blocked:
            self.blocked += 1
            key = (str(rec.get("code")), str(rec.get("provider") or "(unknown)"),
                   ",".join(rec.get("requirement") or []) or "(none)", _client(rec))
            flow = self.flows.get(key)
            if flow is None:
                if len(self.flows) >= MAX_KEYS:
                    self.flows_other += 1
                    flow = None
                else:
                    flow = self.flows[key] = _Flow()
            if flow is not None:
                flow.count += 1
                flow.last_ts, flow.last_id = ts, str(rec.get("id") or "")
                flow.status[str(rec.get("status"))] += 1
            self.latest.append({k: rec.get(k) for k in (
                "ts", "id", "client", "user", "method", "host", "provider", "model",
                "requirement", "places", "code", "status", "reason", "enforced")})

    # ------------------------------------------------------------------ the page

    def render(self, report: Report, sources: list[str], trusted: list[str],
               show_cmd: str) -> str:
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        ok = report.ok
        title = ("VERIFICATION FAILED" if not ok else "Verified") + " \u2014 residency-gate audit report"
        parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
                 '<meta name="viewport" content="width=device-width, initial-scale=1">',
                 f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"]
        parts.append(self._verdict_box(report))
        parts.append("<h1>residency-gate audit report</h1>")
        span = (f"decisions from {_e(self.first_ts[:19].replace('T', ' '))} to "
                f"{_e((self.last_ts or '')[:19].replace('T', ' '))} UTC"
                if self.first_ts else "no decisions")
        parts.append(f'<p class="note">Generated {now} from {_e(", ".join(sources))}; '
                     f"{span}; verification mode: {_e(report.mode)}.</p>")
        parts.append(self._problems(report))
        parts.append(self._vouching(report, trusted))
        parts.append(self._blocked(show_cmd))
        parts.append(self._counts())
        parts.append(self._unverified())
        parts.append(self._configs())
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def _verdict_box(self, report: Report) -> str:
        errors = len(report.errors) + (report.problems_not_listed if report._unlisted_errors
                                       else 0)
        warnings = len(report.warnings)
        records = sum(o.records for o in report.origins.values())
        if not report.ok:
            codes = Counter(p.code for p in report.errors)
            what = ", ".join(f"{c} \u00d7{n}" if n > 1 else c for c, n in codes.most_common(6))
            return (f'<div class="verdict v-bad" role="alert"><strong>VERIFICATION FAILED'
                    f"</strong>{_n(errors)} problem(s): {_e(what)}. "
                    f"{_n(self.unverified_count)} record(s) did not verify: they are listed "
                    "below and excluded from every count. Do not rely on this trail until "
                    "the problems are explained.</div>")
        cls = "v-warn" if warnings else "v-ok"
        warn = f" {_n(warnings)} warning(s), listed below." if warnings else ""
        return (f'<div class="verdict {cls}"><strong>Verified: the audit trail is intact'
                f"</strong>{_n(records)} record(s): each is chained to the one before and "
                f"vouched for by a signed checkpoint or its own signature.{warn}</div>")

    def _problems(self, report: Report) -> str:
        if not report.problems:
            return ""
        rows = []
        for p in report.problems[:MAX_PROBLEMS_SHOWN]:
            sev = '<span class="bad">error</span>' if p.severity == ERROR else "warning"
            loc = (p.file or "-") + (f":{p.line}" if p.line is not None else "")
            rows.append([(sev, ""), (f"<code>{_e(p.code)}</code>", ""), (_e(p.seq), "num"),
                         (f"<code>{_e(loc)}</code>", ""),
                         (f"<details><summary>why</summary><p>{_e(p.message)}</p></details>",
                          "nolabel")])
        more = len(report.problems) - MAX_PROBLEMS_SHOWN + report.problems_not_listed
        tail = (f'<p class="note">{_n(more)} more: run <code>residency-gate audit verify'
                "</code> for the full list.</p>" if more > 0 else "")
        return ("<h2>Verification problems</h2>" + _table(
            [("severity", ""), ("verdict", ""), ("seq", "num"), ("where", ""),
             ("details", "")], rows) + tail)

    def _vouching(self, report: Report, trusted: list[str]) -> str:
        rows = []
        for o, r in report.origins.items():
            vouched = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in r.vouched[:10])
            if len(r.vouched) > 10:
                vouched += f" \u2026 ({len(r.vouched)} ranges)"
            cps = (f"{_n(r.checkpoints_verified)} signed checkpoint(s) in the chain, each "
                   "vouching for the records before it; "
                   f"{_n(r.signatures_checked)} signature(s) checked record by record")
            ext = (f"seq 0-{r.anchored_size - 1}" if r.anchored_size else "none")
            if report.anchor is None:
                anchor = ('<span class="bad">no anchor given</span>: deleting the newest '
                          "records would only shorten the vouched range")
            elif r.anchor_size:
                anchor = f"covers seq 0-{r.anchor_size - 1}"
            else:
                anchor = '<span class="bad">covers nothing of this log</span>'
            start = "seq 0"
            if r.start:
                start = (f"seq {r.start['size']}, from {_e(r.start['source'])}"
                         + (f" (prune record seq {r.start['prune_seq']})"
                            if r.start.get("prune_seq") is not None
                            and "prune" not in str(r.start["source"]) else ""))
            rows.append([(_e(o), ""), (_n(r.records), "num"), (_e(vouched or "none"), ""),
                         (f"<code>{_e(', '.join(r.keys))}</code>", ""), (cps, ""), (ext, ""),
                         (anchor, ""), (start, "")])
        keys = ", ".join(trusted) or "(none)"
        return ("<h2>What vouches for these records</h2>"
                f'<p class="note">Trusted keys: <code>{_e(keys)}</code>. Anchor: '
                f"<code>{_e(report.anchor or 'none')}</code>.</p>" + _table(
                    [("origin", ""), ("records", "num"), ("vouched seq", ""),
                     ("signed by", ""), ("how", ""), ("signed checkpoint files", ""),
                     ("anchor", ""), ("verified from", "")], rows))

    def _blocked(self, show_cmd: str) -> str:
        out = [f"<h2>Blocked flows ({_n(self.blocked)})</h2>"]
        if not self.blocked:
            out.append("<p>none</p>")
            return "".join(out)
        flows = sorted(self.flows.items(), key=lambda kv: -kv[1].count)[:TOP_FLOWS]
        top = flows[0][1].count if flows else 1
        rows = []
        for (code, provider, req, client), f in flows:
            status = ", ".join(f"{s} \u00d7{n}" if n > 1 else s
                               for s, n in f.status.most_common(3))
            bar = f'<span class="bar block" style="width:{max(2, 80 * f.count // top)}px"></span>'
            rows.append([(_n(f.count), "num"), (bar, "hide-sm"), (f"<code>{_e(code)}</code>", ""),
                         (_e(status), ""), (_e(provider), ""), (_e(req), ""), (_e(client), ""),
                         (_e(f.last_ts[:19].replace("T", " ")), "t"),
                         (f"<code>{_e(f.last_id)}</code>", "")])
        out.append("<p class=\"note\">Most frequent blocked flows (same reason code, provider, "
                   "requirement and client):</p>")
        out.append(_table([("count", "num"), ("", ""), ("reason code", ""), ("status", ""),
                           ("provider", ""), ("requirement", ""), ("client", ""),
                           ("latest", ""), ("latest id", "")], rows))
        if len(self.flows) > TOP_FLOWS or self.flows_other:
            out.append(f'<p class="note">{_n(len(self.flows) - len(flows) + self.flows_other)}'
                       " more flow group(s) not shown.</p>")
        rows = []
        for d in reversed(self.latest):
            verdict = "report" if d.get("enforced") is False else "block"
            rows.append([
                (_e(str(d.get("ts") or "")[:19].replace("T", " ")), "t"),
                (f'<span class="tag s-{verdict}">{_e(d.get("status"))}</span>', ""),
                (f"<details><summary><code>{_e(d.get('code'))}</code></summary>"
                 f"<p>{_e(d.get('reason'))}</p></details>", ""),
                (_e(_client(d)), ""), (_e(d.get("provider")), ""), (_e(d.get("model")), ""),
                (_e(d.get("requirement")), ""), (_e(d.get("places")), ""),
                (f"<code>{_e(d.get('id'))}</code>", "")])
        out.append(f"<h2>Latest blocked decisions ({_n(len(self.latest))} of "
                   f"{_n(self.blocked)})</h2>")
        out.append(_table([("time (UTC)", ""), ("status", ""), ("reason code", ""),
                           ("client", ""), ("provider", ""), ("model", ""),
                           ("requirement", ""), ("places", ""), ("audit id", "")], rows))
        if self.blocked > len(self.latest):
            out.append(f'<p class="note">The other {_n(self.blocked - len(self.latest))} '
                       f"blocked decisions: <code>{_e(show_cmd)}</code></p>")
        return "".join(out)

    def _counts(self) -> str:
        v = self.by_verdict
        heads = ("allow", "block", "reroute", "report (not enforced)", "total")
        out = [f"<h2>Decisions ({_n(self.decisions)})</h2>", _table(
            [(h, "num") for h in heads],
            [[(_n(v.get(k, 0)), "num") for k in ("allow", "block", "reroute", "report")]
             + [(_n(self.decisions), "num")]])]
        titles = {"provider": "provider", "requirement": "requirement",
                  "code": "reason code", "status": "status", "client": "client",
                  "day": "day (UTC)"}
        for dim in ("provider", "requirement", "code", "status", "client", "day"):
            out.append(self._dim(f"Decisions by {titles[dim]}", titles[dim], self.dims[dim],
                                 by_key=dim == "day"))
        return "".join(out)

    def _dim(self, title: str, head: str, c: _Capped, by_key: bool = False) -> str:
        if not c.total:
            return f"<h2>{_e(title)}</h2><p>none</p>"
        items = (sorted(c.total.items())[-31:] if by_key else c.total.most_common(TOP))
        top = max(n for _k, n in items)
        rows = []
        for k, n in items:
            b = c.blocked[k]
            width = max(1, 120 * n // top)
            bw = width * b // n if n else 0
            bar = (f'<span class="bar block" style="width:{bw}px"></span>' if bw else "") + (
                f'<span class="bar" style="width:{width - bw}px"></span>' if width > bw else "")
            rows.append([(_e(k), ""), (_n(n), "num"), (_n(b), "num bad" if b else "num"),
                         (bar, "hide-sm")])
        rest = len(c.total) - len(items)
        note = (f'<p class="note">{_n(rest)} more not shown'
                + (" (older days)" if by_key else "") + ".</p>") if rest > 0 else ""
        return (f"<h2>{_e(title)}</h2>" + _table(
            [(head, ""), ("total", "num"), ("blocked", "num"), ("", "")], rows) + note)

    def _unverified(self) -> str:
        if not self.unverified_count:
            return ""
        rows = [[('<span class="bad">did not verify</span>', ""), (_e(u["seq"]), "num"),
                 (_e(u["kind"]), ""), (_e(u["decision"]), ""),
                 (f"<code>{_e(u['code'])}</code>", ""),
                 (f"<code>{_e(u['file'])}:{_e(u['line'])}</code>", "")]
                for u in self.unverified]
        more = self.unverified_count - len(self.unverified)
        return (f"<h2>Records that did not verify ({_n(self.unverified_count)})</h2>"
                '<p class="note">What these records claim is not counted anywhere in this '
                "report: their content cannot be trusted.</p>" + _table(
                    [("status", ""), ("seq", "num"), ("kind", ""), ("claims decision", ""),
                     ("claims code", ""), ("where", "")], rows)
                + (f'<p class="note">{_n(more)} more not listed.</p>' if more > 0 else ""))

    def _configs(self) -> str:
        if not self.config_count:
            return ""
        rows = []
        for c in reversed(self.configs):
            revs = c.get("revisions") if isinstance(c.get("revisions"), dict) else {}
            rows.append([(_e(str(c.get("ts") or "")[:19].replace("T", " ")), "t"),
                         (_e(c.get("seq")), "num"), (_e(c.get("reason")), ""),
                         (f"<code>{_e(', '.join(f'{k} {v}' for k, v in sorted(revs.items())))}"
                          "</code>", ""), (_e(c.get("config_file")), "")])
        return (f"<h2>Configuration in force ({_n(self.config_count)} config record(s))</h2>"
                + _table([("time (UTC)", ""), ("seq", "num"), ("why", ""), ("revisions", ""),
                          ("config file", "")], rows))


def show_command(paths: list[str]) -> str:
    return "residency-gate audit show --decision block " + " ".join(shlex.quote(p)
                                                                       for p in paths)


__all__ = ["WARNING", "ReportBuilder", "show_command"]
