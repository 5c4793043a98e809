"""One self-contained HTML page: verification status, blocked flows, counts over time."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime
from html import escape

from .verify import Report

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}
.ok{color:#176f2c;font-weight:bold}.bad{color:#b00020;font-weight:bold}.warn{color:#8a5a00}
.bar{background:#5b8def;height:10px;display:inline-block}.block .bar{background:#d9534f}
code{font-size:12px}td.num{text-align:right}
"""


def _e(v) -> str:
    if isinstance(v, list):
        v = ", ".join(str(x) for x in v)
    return escape("" if v is None else str(v))


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="num">{_e(c)}</td>' if isinstance(c, int) else f"<td>{_e(c)}</td>"
            for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _counts(title: str, decisions: list[dict], key, buckets: list[str], bucket_of) -> str:
    per: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    blocked: Counter = Counter()
    for d in decisions:
        for k in key(d):
            per[k][bucket_of(d)] += 1
            totals[k] += 1
            if d.get("decision") == "block":
                blocked[k] += 1
    if not totals:
        return f"<h2>{_e(title)}</h2><p>none</p>"
    top = max(totals.values())
    rows = []
    for k, n in totals.most_common():
        bar = f'<span class="bar" style="width:{max(1, 200 * n // top)}px"></span>'
        rows.append("<tr><td>" + _e(k) + f'</td><td class="num">{n}</td>'
                    f'<td class="num">{blocked[k]}</td><td>{bar}</td>'
                    + "".join(f'<td class="num">{per[k][b] or ""}</td>' for b in buckets)
                    + "</tr>")
    head = ("<tr><th>" + _e(title.split(" by ")[-1]) + "</th><th>total</th><th>blocked</th>"
            "<th></th>" + "".join(f"<th>{_e(b)}</th>" for b in buckets) + "</tr>")
    return f"<h2>{_e(title)}</h2><table>{head}{''.join(rows)}</table>"


def render_html(report: Report, decisions: list[dict], sources: list[str]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    parts = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
             "<title>residency-gate audit report</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>residency-gate audit report</h1>",
             f"<p>Generated {now} from {_e(', '.join(sources))}.</p>"]
    # 1. verification status
    parts.append("<h2>Verification of the audit files</h2>")
    if report.ok:
        parts.append('<p class="ok">INTACT: every record verified (signature, hash chain, '
                     f'order){" with warnings" if report.warnings else ""}.</p>')
    else:
        parts.append(f'<p class="bad">FAILED: {len(report.errors)} problem(s). The records '
                     "below come from files that did not verify; do not rely on them.</p>")
    rows = []
    for o, r in report.origins.items():
        vouched = ", ".join(f"{a}-{b}" for a, b in r.vouched) or "none"
        anchored = f"0-{r.anchored_size - 1}" if r.anchored_size else "no"
        rows.append([o, len(r.files), r.records, vouched, anchored, ", ".join(r.keys)])
    parts.append(_table(["origin", "files", "records", "vouched seq", "signed checkpoint",
                         "keys"], rows))
    if report.problems:
        parts.append(_table(["severity", "verdict", "file", "line", "seq", "message"],
                            [[p.severity, p.code, p.file, p.line, p.seq, p.message]
                             for p in report.problems]))
    # 2. blocked flows first
    blocked = [d for d in decisions if d.get("decision") == "block"]
    parts.append(f"<h2>Blocked flows ({len(blocked)})</h2>")
    cols = ["ts", "id", "client", "user", "method", "url", "provider", "model", "requirement",
            "places", "reason"]
    parts.append(_table(cols, [[d.get(c) for c in cols] for d in blocked], "block")
                 if blocked else "<p>none</p>")
    # 3. counts over time
    days = sorted({str(d.get("ts", ""))[:10] for d in decisions})
    if len(days) <= 2:
        buckets = sorted({str(d.get("ts", ""))[:13] + "h" for d in decisions})
        bucket_of = lambda d: str(d.get("ts", ""))[:13] + "h"  # noqa: E731
    else:
        buckets, bucket_of = days, lambda d: str(d.get("ts", ""))[:10]
    buckets = buckets[-31:]
    c = Counter(d.get("decision") for d in decisions)
    parts.append("<h2>Decisions</h2>" + _table(
        ["allow", "block", "reroute", "total"],
        [[c.get("allow", 0), c.get("block", 0), c.get("reroute", 0), len(decisions)]]))
    parts.append(_counts("Decisions by provider", decisions,
                         lambda d: [d.get("provider") or "(unknown)"], buckets, bucket_of))
    parts.append(_counts("Decisions by requirement", decisions,
                         lambda d: d.get("requirement") or ["(none)"]
                         if isinstance(d.get("requirement"), list) or d.get("requirement") is None
                         else [d.get("requirement")], buckets, bucket_of))
    parts.append(_counts("Decisions by reason", decisions,
                         lambda d: [d.get("reason") or "(none)"], buckets, bucket_of))
    # 4. everything else
    others = [d for d in decisions if d.get("decision") != "block"]
    parts.append(f"<h2>Other decisions ({len(others)})</h2>")
    shown = others[-2000:]
    if len(others) > len(shown):
        parts.append(f"<p>Showing the last {len(shown)}.</p>")
    cols2 = ["ts", "id", "decision", "client", "provider", "model", "requirement", "places",
             "routed_to", "reason"]
    parts.append(_table(cols2, [[d.get(c) for c in cols2] for d in shown]) if shown
                 else "<p>none</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
