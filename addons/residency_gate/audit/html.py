"""Self-contained HTML pages people read: the block page, the inventory and replay reports.

One skeleton and one stylesheet, inline: a page opens from a file or a proxy
response without any network access, and reads at phone (390 px) and desktop
(1280 px) widths. Wide tables scroll inside their own box instead of widening
the page; numbers are right-aligned; nothing is loaded from anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2329;
background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px}
h1{font-size:1.45em;margin:.3em 0 .4em}h2{font-size:1.15em;margin:1.6em 0 .5em}
h1,h2,p,li{overflow-wrap:anywhere}
p{margin:.4em 0}code,.mono{font:13px/1.4 ui-monospace,Menlo,Consolas,monospace;
overflow-wrap:anywhere}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 16px;margin:12px 0}
.verdict{border-left:6px solid #b3261e}.verdict.ok{border-left-color:#1e7d32}
.verdict.warn{border-left-color:#b26a00}
.muted{color:#5b6670}.small{font-size:13px}
.kpis{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.kpi{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px 12px;min-width:120px;
flex:1 1 120px}
.kpi b{display:block;font-size:1.5em}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;background:#fff;border:1px solid #dde1e6;
border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.wrap{overflow-wrap:anywhere;min-width:12em}
.tag{display:inline-block;padding:0 6px;border-radius:4px;font-size:12px;font-weight:600}
.tag.block{background:#fde7e6;color:#8c1d18}.tag.allow{background:#e3f4e5;color:#185c24}
.tag.report{background:#fff1d6;color:#7a4b00}.tag.reroute{background:#e4ecfb;color:#1f4aa8}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{color:#5b6670}dd{margin:0;overflow-wrap:anywhere}
@media (max-width:600px){main{padding:10px}dl{grid-template-columns:1fr}dt{margin-top:6px}
th,td{padding:5px 7px}}
"""


def esc(value: object) -> str:
    """Text for HTML; lists joined with commas, None as empty."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return escape("" if value is None else str(value))


def page(title: str, body: str, *, lang: str = "en") -> str:
    """A whole document: viewport meta (phones render at device width), inline CSS only."""
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            '<meta name="robots" content="noindex">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *,
          numeric: Iterable[int] = (), wrap: Iterable[int] = (), raw: Iterable[int] = ()) -> str:
    """A table in its own horizontally scrolling box. Columns in `raw` are already HTML."""
    numeric, wrap, raw = set(numeric), set(wrap), set(raw)

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ' class="wrap"' if i in wrap else ""

    head = "".join(f"<th{cls(i) if i in numeric else ''}>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c if i in raw else esc(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def kpis(items: Iterable[tuple[str, object]]) -> str:
    return '<div class="kpis">' + "".join(
        f'<div class="kpi"><b>{esc(v)}</b><span class="muted small">{esc(k)}</span></div>'
        for k, v in items) + "</div>"


def tag(kind: str, text: str | None = None) -> str:
    return f'<span class="tag {esc(kind)}">{esc(text or kind)}</span>'


def definitions(items: Iterable[tuple[str, str]]) -> str:
    """A <dl>; values are already HTML."""
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"
