"""The frame of retain's HTML pages: one self-contained document (inline CSS, no CDN), tables, data.

Everything that comes from a run (task names, prompts, config values) is escaped here or in the caller
with `html.escape`; data for a page's script is embedded with `json_script`, which keeps `</script>`
inside a string from ending the script element.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #4e79a7; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  margin: 0 auto; padding: 16px 24px 48px; max-width: 1280px; background: #fff; }
h1 { font-size: 22px; margin: 4px 0 2px; }
section { overflow-x: auto; }
h2 { font-size: 18px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 6px; }
nav { margin: 8px 0 4px; } nav a { margin-right: 12px; color: var(--accent); text-decoration: none; }
.sub, .note, .empty { color: var(--muted); }
.status { display: inline-block; padding: 2px 8px; border-radius: 10px; font-size: 12px;
  background: #ddf4e4; color: #1a7f37; } .status.partial { background: #fff1c2; color: #7d4e00; }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.def { color: var(--muted); max-width: 720px; }
pre { background: var(--soft); border: 1px solid var(--line); padding: 8px; overflow: auto;
  max-height: 480px; }
.chart text { font: 12px system-ui, sans-serif; fill: var(--ink); }
.chart .title { font-weight: 600; font-size: 13px; } .chart .axis { fill: var(--muted); }
.chart .grid { stroke: #eaeef2; } .chart .frame { stroke: var(--line); }
.chart .marker { stroke: #8c959f; stroke-dasharray: 4 3; }
.chart .marker-label { fill: var(--muted); font-size: 11px; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0;
  padding: 8px; background: var(--soft); border: 1px solid var(--line); }
.controls input[type=search] { width: 260px; }
#prediction-table td { max-width: 420px; white-space: pre-wrap; word-break: break-word; }
#prediction-table td.prompt { max-width: 520px; }
#prediction-table .clip { max-height: 12em; overflow: auto; }
#prediction-table tr.wrong td.score { color: #cf222e; }
#prediction-table tr.right td.score { color: #1a7f37; }
details summary { cursor: pointer; color: var(--accent); }
"""


def json_script(element_id: str, data: Any) -> str:
    """`data` as JSON in a <script type="application/json"> element that no string can break out of.

    `<`, `>` and `&` are written as JSON escapes, so `</script>` or `<!--` inside a prompt stays text;
    U+2028/U+2029 are escaped too. The page reads it back with JSON.parse(element.textContent).
    """
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{escape(element_id)}">{text}</script>'


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    numeric: Sequence[int] = (),
    classes: dict[int, str] | None = None,
    css_class: str = "",
    element_id: str = "",
) -> str:
    """An HTML table; every cell is escaped text, columns in `numeric` align right, `classes` gives
    further columns a CSS class."""
    attributes = (f' class="{escape(css_class)}"' if css_class else "") + (
        f' id="{escape(element_id)}"' if element_id else ""
    )
    column_class = {**(classes or {}), **{j: "num" for j in numeric}}
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="{column_class[j]}">{escape(str(c))}</td>'
            if j in column_class
            else f"<td>{escape(str(c))}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) pairs of nested dicts; lists of scalars stay whole."""
    if isinstance(tree, dict) and tree:
        pairs: list[tuple[str, Any]] = []
        for key, value in tree.items():
            pairs += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return pairs
    return [(prefix, tree)]


def display(value: Any) -> str:
    """A config or provenance value as a person reads it: strings bare, the rest as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def key_value_table(tree: dict, *, element_id: str = "") -> str:
    """A nested dict as a two-column table of dotted keys and values."""
    return table(["setting", "value"], [(k, display(v)) for k, v in flatten(tree)], element_id=element_id)


def page(title: str, body: str, script: str = "") -> str:
    """A complete HTML document: inline CSS, `body` as given (already escaped), then `script`."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )
