"""Inline SVG charts for the HTML reports: an annotated heatmap, line charts and a scatter plot.

Plain strings, no plotting library and no script: a page that embeds them opens offline and shows its
charts even with JavaScript off. Every text that reaches the markup goes through `html.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

# Viridis at 9 evenly spaced points (matplotlib's colormap, the one accuracy_matrix.png uses).
_VIRIDIS = (
    (68, 1, 84),
    (71, 45, 123),
    (59, 82, 139),
    (44, 114, 142),
    (33, 145, 140),
    (40, 174, 128),
    (94, 201, 98),
    (170, 220, 50),
    (253, 231, 37),
)
# Colours that stay apart for up to ten lines (Tableau 10).
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_CHAR_WIDTH = 7.0  # average width of a 12px sans-serif character, to size margins for labels
_MAX_LABEL = 40  # longer labels are cut (the full text stays in a tooltip)


def viridis(value: float) -> str:
    """The viridis colour of `value` in [0, 1] (clamped), as #rrggbb."""
    position = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    low = min(int(position), len(_VIRIDIS) - 2)
    weight = position - low
    rgb = [round(a + (b - a) * weight) for a, b in zip(_VIRIDIS[low], _VIRIDIS[low + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _label(text: str) -> str:
    """An escaped label, cut to _MAX_LABEL characters."""
    return escape(text if len(text) <= _MAX_LABEL else text[: _MAX_LABEL - 1] + "…")


def _text_width(text: str) -> float:
    return min(len(text), _MAX_LABEL) * _CHAR_WIDTH


def _number(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".") if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def heatmap(
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    values: Sequence[Sequence[float] | None],
    *,
    title: str = "",
    cell_width: int | None = None,
    cell_height: int = 32,
    max_width: int = 1200,
) -> str:
    """Scores in [0, 1] as a grid of viridis cells showing their percentage; a None row is drawn as
    "not evaluated yet" cells. Cells are as wide as the longest column label, within 64 to 140 pixels,
    and narrower (down to 44) when that makes the grid wider than `max_width`."""
    left = 12 + max((_text_width(t) for t in row_labels), default=0)
    if cell_width is None:
        longest = max((len(name) for name in column_labels), default=0)
        cell_width = int(min(max(64, longest * _CHAR_WIDTH + 12), 140))
        cell_width = max(44, min(cell_width, int((max_width - left) / max(len(column_labels), 1))))
    top = 24 + (20 if title else 0)
    width = left + cell_width * len(column_labels) + 12
    height = top + cell_height * len(row_labels) + 8
    parts = [
        f'<svg class="chart heatmap" role="img" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height}" viewBox="0 0 {width:.0f} {height}">'
    ]
    if title:
        parts.append(f'<text x="4" y="16" class="title">{escape(title)}</text>')
    for j, name in enumerate(column_labels):
        x = left + cell_width * (j + 0.5)
        # Column labels get a cell's width; longer ones are cut, with the full name as a tooltip.
        fits = max(3, int(cell_width / _CHAR_WIDTH))
        shown = name if len(name) <= fits else name[: fits - 1] + "…"
        parts.append(
            f'<text x="{x:.1f}" y="{top - 8}" text-anchor="middle"><title>{escape(name)}</title>'
            f"{escape(shown)}</text>"
        )
    for i, (label, row) in enumerate(zip(row_labels, values, strict=True)):
        y = top + cell_height * i
        parts.append(
            f'<text x="{left - 8:.1f}" y="{y + cell_height / 2 + 4:.1f}" text-anchor="end">'
            f"<title>{escape(label)}</title>{_label(label)}</text>"
        )
        for j, name in enumerate(column_labels):
            x = left + cell_width * j
            value = None if row is None else row[j]
            fill = "#e6e6e6" if value is None else viridis(value)
            ink = "#222" if value is None or value > 0.6 else "#fff"
            shown = "—" if value is None else f"{100 * value:.1f}"
            tip = f"{label}, {name}: " + ("not evaluated yet" if value is None else f"{shown}%")
            # The ink is a style, not a fill attribute: the page's CSS for chart text would override that.
            parts.append(
                f'<g class="cell"><title>{escape(tip)}</title>'
                f'<rect x="{x:.1f}" y="{y}" width="{cell_width - 2}" height="{cell_height - 2}" '
                f'fill="{fill}"/><text x="{x + cell_width / 2 - 1:.1f}" y="{y + cell_height / 2 + 4:.1f}" '
                f'text-anchor="middle" style="fill:{ink}">{shown}</text></g>'
            )
    parts.append("</svg>")
    return "".join(parts)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


Series = tuple[str, Sequence[tuple[float, float]]]


def _scales(
    left: float, top: float, plot_w: float, plot_h: float, xs: tuple[float, float], ys: tuple[float, float]
) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """Data -> pixel maps for a plot area whose top-left corner is (left, top); y grows upwards."""
    (x_low, x_high), (y_low, y_high) = xs, ys

    def sx(x: float) -> float:
        return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y_low) / ((y_high - y_low) or 1.0)) * plot_h

    return sx, sy


def _chart_start(kind: str, width: int, height: int, title: str) -> list[str]:
    """The opening <svg> tag of a chart of class `kind`, and its title."""
    parts = [
        f'<svg class="chart {kind}" role="img" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">'
    ]
    if title:
        parts.append(f'<text x="4" y="16" class="title">{escape(title)}</text>')
    return parts


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    y_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
    markers: Sequence[tuple[float, str]] = (),
    x_ticks: Sequence[tuple[float, str]] | None = None,
    width: int = 720,
    height: int = 280,
    points: bool | None = None,
) -> str:
    """Lines through (x, y) points, one colour per series, with a legend; `markers` are dashed vertical
    lines with a label (task boundaries); `x_ticks` replaces the numeric x ticks with labelled ones;
    `y_range` and `x_range` fix the axes (by default they span the data)."""
    xs = [x for _, pts in series for x, _ in pts] + [x for x, _ in markers]
    ys = [y for _, pts in series for _, y in pts]
    if not ys:
        return '<p class="empty">nothing to plot yet</p>'
    y_low, y_high = y_range if y_range else (min(ys), max(ys))
    y_ticks = nice_ticks(y_low, y_high)
    y_low, y_high = (y_low, y_high) if y_range else (y_ticks[0], y_ticks[-1])
    x_low, x_high = x_range if x_range else (min(xs), max(xs))
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    left, right, top = 56, 16, 28 if title else 12
    legend_rows = math.ceil(len(series) / 4)
    bottom = 48 + 18 * legend_rows
    plot_w, plot_h = width - left - right, height - top - bottom

    sx, sy = _scales(left, top, plot_w, plot_h, (x_low, x_high), (y_low, y_high))
    parts = _chart_start("line", width, height, title)
    for tick in y_ticks:
        if y_low - 1e-12 <= tick <= y_high + 1e-12:
            y = sy(tick)
            parts.append(
                f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>'
            )
    labelled = x_ticks if x_ticks is not None else [(t, _number(t)) for t in nice_ticks(x_low, x_high, 8)]
    for x, text in labelled:
        if x_low <= x <= x_high:
            parts.append(
                f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_label(text)}</text>'
            )
    parts.append(f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none"/>')
    for x, text in markers:
        px = sx(x)
        parts.append(
            f'<line class="marker" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + plot_h}"/>'
            f'<text class="marker-label" x="{px + 3:.1f}" y="{top + 11}">{_label(text)}</text>'
        )
    show_points = points if points is not None else max((len(p) for _, p in series), default=0) <= 30
    for k, (name, pts) in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<g class="series"><title>{escape(name)}</title>'
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
        )
        if show_points:
            parts += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(name)}: {_number(y)} at {_number(x)}</title></circle>"
                for x, y in pts
            ]
        parts.append("</g>")
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 32}" text-anchor="middle" class="axis">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'class="axis">{escape(y_label)}</text>'
    )
    parts += _legend([name for name, _ in series], left, top + plot_h + 54, plot_w)
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: Sequence[str], left: float, top: float, width: float) -> list[str]:
    column = width / 4
    parts = []
    for k, name in enumerate(names):
        x = left + column * (k % 4)
        y = top + 18 * (k // 4)
        parts.append(
            f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="14" height="4" fill="{PALETTE[k % len(PALETTE)]}"/>'
            f'<text x="{x + 18:.1f}" y="{y - 4:.1f}"><title>{escape(name)}</title>{_label(name)}</text>'
        )
    return parts


def scatter(
    points: Sequence[dict],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    width: int = 560,
    height: int = 380,
) -> str:
    """Labelled points; each dict has "label", "x", "y" and optional "x_err", "y_err" (low, high) bars."""
    if not points:
        return '<p class="empty">nothing to plot</p>'
    xs = [v for p in points for v in (p["x"], *(p.get("x_err") or ()))]
    ys = [v for p in points for v in (p["y"], *(p.get("y_err") or ()))]
    # 5% room on each side, so that no point sits on the frame.
    x_pad, y_pad = 0.05 * (max(xs) - min(xs) or 1.0), 0.05 * (max(ys) - min(ys) or 1.0)
    x_ticks = nice_ticks(min(xs) - x_pad, max(xs) + x_pad)
    y_ticks = nice_ticks(min(ys) - y_pad, max(ys) + y_pad)
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    # The right margin leaves room for the label of a point at the right edge.
    left, right, top, bottom = 56, 90, 28 if title else 12, 44
    plot_w, plot_h = width - left - right, height - top - bottom

    sx, sy = _scales(left, top, plot_w, plot_h, (x_low, x_high), (y_low, y_high))
    parts = _chart_start("scatter", width, height, title)
    for tick in y_ticks:
        y = sy(tick)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>'
        )
    for tick in x_ticks:
        x = sx(tick)
        parts.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_number(tick)}</text>'
        )
    parts.append(f'<rect class="frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none"/>')
    for k, point in enumerate(points):
        colour = PALETTE[k % len(PALETTE)]
        x, y = sx(point["x"]), sy(point["y"])
        tip = escape(f"{point['label']}: {y_label} {_number(point['y'])}, {x_label} {_number(point['x'])}")
        parts.append(f'<g class="point"><title>{tip}</title>')
        if point.get("x_err"):
            a, b = (sx(v) for v in point["x_err"])
            parts.append(f'<line x1="{a:.1f}" x2="{b:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}"/>')
        if point.get("y_err"):
            a, b = (sy(v) for v in point["y_err"])
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{a:.1f}" y2="{b:.1f}" stroke="{colour}"/>')
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>'
            f'<text x="{x + 8:.1f}" y="{y - 6:.1f}">{_label(str(point["label"]))}</text></g>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'class="axis">{escape(y_label)}</text></svg>'
    )
    return "".join(parts)
