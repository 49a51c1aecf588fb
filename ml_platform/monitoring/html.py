"""Self-contained HTML report building blocks: status badges, inline SVG charts (reference vs
current shares per bin, a metric over days), status tables and the page around them.

Plain Python, no Dagster, no dependency: a page opens with no network (inline CSS, inline SVG
without external references, the system font stack). Every text that reaches the output is
HTML-escaped here, so callers pass raw strings (column names and categories come from user data);
only a section's body is taken as HTML, and it is meant to be built with these functions.

Over ~400 lines (about 500): the page's CSS, the badges, the two charts and the table share one
palette, one set of CSS classes and one set of SVG text/axis helpers. If it grows, the two charts
(with _text/_ticks/_legend) are the piece to move out, into a charts module that this one imports.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from html import escape as _escape_text
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ml_platform.monitoring.status import ALERT, NO_DATA, OK, PENDING, STATUSES, WARN

STATUS_COLOURS: dict[str, str] = {
    OK: "#1e9e57", WARN: "#e0a100", ALERT: "#d93025", PENDING: "#8b95a5", NO_DATA: "#a3abb8",
}
STATUS_LABELS: dict[str, str] = {
    OK: "OK", WARN: "WARN", ALERT: "ALERT", PENDING: "PENDING", NO_DATA: "NO DATA",
}
if not set(STATUS_COLOURS) == set(STATUSES) == set(STATUS_LABELS):
    raise RuntimeError(f"every status in {STATUSES} needs a colour and a label here")
_STATUS_TEXT = {WARN: "#3b2a00"}  # dark text on amber; white on the others
# the current bars take the chart's status colour, except ok: a calm blue (green is for badges)
_CURRENT_COLOURS = {**STATUS_COLOURS, OK: "#3a6fd8"}
_REFERENCE_COLOUR, _REFERENCE_LINE = "#b4bfcd", "#475467"  # reference bars, reference value
_SERIES_COLOURS = ["#3a6fd8", "#8e44ad", "#0f9bb0", "#e67e22", "#34495e", "#c2185b"]
_INK, _MUTED, _GRID, _AXIS = "#1d2330", "#667085", "#eaecf0", "#98a2b3"
FONT_STACK = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
CHART_WIDTH, CHART_HEIGHT = 560, 250
_CHAR_PX = 6.3  # rough width of one 11px character, to fit and truncate labels
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _esc(value: Any) -> str:
    return _escape_text(str(value), quote=True)


def _status(status: Any, field: str = "status") -> str:
    if status is None:
        return NO_DATA
    if not isinstance(status, str) or status not in STATUS_COLOURS:
        raise ValueError(f"{field} must be one of {STATUSES}, got {status!r}")
    return status


def status_badge(status: str) -> str:
    """A coloured pill (`<span class="badge badge-alert">ALERT</span>`); None counts as no_data."""
    status = _status(status)
    return f'<span class="badge badge-{status}">{STATUS_LABELS[status]}</span>'


# ----------------------------------------------------------------------------- values and text
def _number(value: Any, field: str) -> float | None:
    """A finite float, or None for None/NaN/inf (a gap in a chart)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{field} must be a number or None, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def _numbers(values: Sequence[Any] | None, field: str, n: int | None = None) -> list[float | None]:
    if values is None or isinstance(values, (str, bytes)):
        raise TypeError(f"{field} must be a list of numbers, got {values!r}")
    out = [_number(v, f"{field}[{i}]") for i, v in enumerate(values)]
    if n is not None and len(out) != n:
        raise ValueError(f"{field} needs one value per label ({n}), got {len(out)}")
    return out


def _clip(text: str, limit: int) -> tuple[str, bool]:
    limit = max(limit, 2)
    return (text, False) if len(text) <= limit else (text[: limit - 1] + "\u2026", True)


def _text(x: float, y: float, text: Any, *, limit: int = 60, **attrs: Any) -> str:
    """An SVG <text>, truncated to `limit` characters with the full text as its tooltip."""
    shown, clipped = _clip(str(text), limit)
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items())
    tip = f"<title>{_esc(text)}</title>" if clipped else ""
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{tip}{_esc(shown)}</text>'


def format_value(value: Any) -> str:
    """A table cell's text: floats compact (4 significant digits, thousands separated), missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, (bool, Integral)):
        return f"{value:,}" if not isinstance(value, bool) and abs(value) >= 10_000 else str(value)
    if isinstance(value, Real):
        v = float(value)
        if math.isnan(v):
            return "\u2013"
        if math.isinf(v):
            return "\u221e" if v > 0 else "-\u221e"
        if v == 0:
            return "0"
        if 1e4 <= abs(v) < 1e15:
            return f"{v:,.0f}"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.2e}"
    return str(value)


def _pct(value: float | None) -> str:
    if value is None:
        return "\u2013"
    return f"{value:.0%}" if value >= 0.1 else f"{value:.1%}" if value >= 0.01 else f"{value:.2%}"


def _ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(round((stop - start) / step) + 1)]


def _svg_id(*parts: Any) -> str:
    """A deterministic id for defs (inline SVGs share the page's id namespace)."""
    return "h" + hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def _svg(title: str, body: list[str], *, dot: str | None = None, height: int = CHART_HEIGHT) -> str:
    head = [f'<circle cx="17" cy="18" r="5" fill="{dot}"/>'] if dot else []
    head.append(_text(29 if dot else 12, 22, title, limit=int((CHART_WIDTH - 40) / 7.2),
                      font_size=13, font_weight=600, fill=_INK))
    return (
        f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {height}" width="{CHART_WIDTH}" height="{height}" '
        f'role="img" aria-label="{_esc(title)}" font-family="{_esc(FONT_STACK)}" font-size="11">'
        f'<rect width="{CHART_WIDTH}" height="{height}" fill="#ffffff"/>' + "".join(head + body) + "</svg>"
    )


def _placeholder(title: str, message: str, dot: str | None = None) -> str:
    return _svg(title, [_text(CHART_WIDTH / 2, CHART_HEIGHT / 2 + 10, message, text_anchor="middle",
                              fill=_MUTED, font_size=13)], dot=dot)


def _legend(items: list[str], widths: list[float], y: float, x0: float = 12) -> tuple[list[str], float]:
    """Lay out legend items (each drawn at (0, 0) in a <g>) left to right, wrapping; return them and the
    y below the last row."""
    out, x = [], x0
    for item, width in zip(items, widths, strict=True):
        if x > x0 and x + width > CHART_WIDTH - 12:
            x, y = x0, y + 16
        out.append(f'<g transform="translate({x:.1f},{y:.1f})">{item}</g>')
        x += width + 16
    return out, y + 12


def _swatch(label: str, fill: str, *, dash: str | None = None, limit: int = 30) -> tuple[str, float]:
    """A legend item and its width: a filled square, or a line sample when `dash` is given ("" solid)."""
    if dash is None:
        mark, gap = f'<rect x="0" y="-9" width="11" height="11" rx="2" fill="{fill}"/>', 16
    else:
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        mark, gap = f'<line x1="0" y1="-4" x2="16" y2="-4" stroke="{fill}" stroke-width="2"{dashes}/>', 21
    shown, _ = _clip(label, limit)
    return mark + _text(gap, 0, label, limit=limit, fill=_INK), gap + len(shown) * _CHAR_PX


def _y_axis(ticks: list[float], y_of, left: float, right: float, fmt) -> list[str]:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}" stroke="{_GRID}"/>')
        out.append(_text(left - 6, y + 4, fmt(t), text_anchor="end", fill=_MUTED))
    return out


# ----------------------------------------------------------------------------- histogram
def histogram_svg(labels: list[str], reference: list[float], current: list[float], *, title: str,
                  status: str = "ok", unseen: list[bool] | None = None) -> str:
    """Reference (grey) vs current (status colour) share per bin or category, as grouped bars with a
    legend and a percentage axis; categories never seen in the reference are hatched and marked
    "new". None/NaN shares draw no bar; the caller limits the number of categories (50+ still draw)."""
    status = _status(status)
    labels = ["(missing)" if label is None else str(label) for label in labels]
    n = len(labels)
    ref, cur = _numbers(reference, "reference", n), _numbers(current, "current", n)
    new = [False] * n if unseen is None else [bool(u) for u in unseen]
    if len(new) != n:
        raise ValueError(f"unseen needs one flag per label ({n}), got {len(new)}")
    for field, values in (("reference", ref), ("current", cur)):
        for i, v in enumerate(values):
            if v is not None and v < 0:
                raise ValueError(f"{field}[{i}] is a share and cannot be negative, got {v!r}")
    colour = _CURRENT_COLOURS[status]
    if n == 0:
        return _placeholder(title, "no bins to show", STATUS_COLOURS[status])
    hatch = _svg_id("hatch", colour)
    items = [_swatch("reference", _REFERENCE_COLOUR), _swatch("current", colour)]
    if any(new):
        items.append(_swatch("new (not in reference)", f"url(#{hatch})"))
    legend, top = _legend([i[0] for i in items], [i[1] for i in items], 42)
    top += 8
    left, right = 50.0, CHART_WIDTH - 14.0
    gw = (right - left) / n
    rotate = n > 10 or max(len(s) for s in labels) * _CHAR_PX > gw * 1.9
    bottom = CHART_HEIGHT - (74 if rotate else 34)
    values = [v for v in ref + cur if v is not None]
    peak = max(values, default=0.0)
    ticks = _ticks(0.0, peak if peak > 0 else 1.0)

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * v / ticks[-1]

    step = ticks[1] - ticks[0]
    body = [(f'<defs><pattern id="{hatch}" patternUnits="userSpaceOnUse" width="6" height="6" '
             f'patternTransform="rotate(45)"><rect width="6" height="6" fill="{colour}" fill-opacity="0.22"/>'
             f'<line x1="0" y1="0" x2="0" y2="6" stroke="{colour}" stroke-width="3"/></pattern></defs>')]
    body += legend + _y_axis(ticks, y_of, left, right, lambda t: f"{t:.0%}" if step >= 0.01 else f"{t:.1%}")
    body.append(_text(14, (top + bottom) / 2, "share", fill=_MUTED, text_anchor="middle",
                      transform=f"rotate(-90 14 {(top + bottom) / 2:.1f})"))
    bw = min(gw * 0.38, 44.0)
    every = max(1, math.ceil(n / 40))
    for i, label in enumerate(labels):
        cx = left + gw * (i + 0.5)
        tip = f"{label}: reference {_pct(ref[i])}, current {_pct(cur[i])}" + (" (new)" if new[i] else "")
        hover = (f'<rect x="{cx - gw / 2:.1f}" y="{top:.1f}" width="{gw:.1f}" height="{bottom - top:.1f}" '
                 f'fill="#ffffff" fill-opacity="0"/>')
        bars = [f"<title>{_esc(tip)}</title>", hover]
        for cls, x, v, fill in (("ref", cx - bw - 0.5, ref[i], _REFERENCE_COLOUR),
                                ("cur new" if new[i] else "cur", cx + 0.5, cur[i],
                                 f"url(#{hatch})" if new[i] else colour)):
            if v is None:
                continue
            h = max(bottom - y_of(v), 0.8 if v > 0 else 0.0)  # a tiny share stays visible
            stroke = f' stroke="{colour}" stroke-width="1"' if cls == "cur new" else ""
            bars.append(f'<rect class="{cls}" x="{x:.1f}" y="{bottom - h:.1f}" width="{bw:.1f}" '
                        f'height="{h:.1f}" fill="{fill}"{stroke}/>')
        if new[i]:
            y_new = bottom - max(bottom - y_of(cur[i] or 0.0), 0.0) - 4
            bars.append(_text(cx + 0.5 + bw / 2, y_new, "new", text_anchor="middle", fill=colour,
                              font_size=9 if n > 20 else 10, font_weight=700))
        body.append("<g>" + "".join(bars) + "</g>")
        if i % every:
            continue
        if rotate:
            body.append(_text(cx + 3, bottom + 12, label, limit=14, text_anchor="end", fill=_MUTED,
                              transform=f"rotate(-40 {cx + 3:.1f} {bottom + 12:.1f})"))
        else:
            body.append(_text(cx, bottom + 15, label, limit=int(gw / _CHAR_PX), text_anchor="middle",
                              fill=_MUTED))
    body.append(f'<line x1="{left}" y1="{bottom:.1f}" x2="{right}" y2="{bottom:.1f}" stroke="{_AXIS}"/>')
    if peak <= 0:
        body.append(_text((left + right) / 2, (top + bottom) / 2, "all shares are zero",
                          text_anchor="middle", fill=_MUTED, font_size=12))
    return _svg(title, body, dot=STATUS_COLOURS[status])


# ----------------------------------------------------------------------------- line chart
def line_chart_svg(x: list[str], series: dict[str, list[float | None]], *, title: str,
                   threshold: float | None = None, threshold_label: str = "",
                   bad_side: str | None = None, y_format: str = "{:.2f}",
                   reference: float | None = None) -> str:
    """A metric over days: one line per series (broken where a value is None/NaN), the threshold as a
    dashed line with the alert region (`bad_side` "above"/"below" it) shaded and the points there in
    red, the champion's reference value as a dotted line. The legend shows each series' last value."""
    if bad_side not in (None, "above", "below"):
        raise ValueError(f"bad_side must be 'above', 'below' or None, got {bad_side!r}")
    threshold, reference = _number(threshold, "threshold"), _number(reference, "reference")
    if bad_side is not None and threshold is None:
        raise ValueError(f"bad_side={bad_side!r} needs a threshold")
    try:
        y_format.format(1.0)
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ValueError(f"y_format must format one number, got {y_format!r}: {exc}") from None
    if not isinstance(series, Mapping):
        raise TypeError(f"series must be a dict of name -> values, got {type(series).__name__}")
    xs = [str(v) for v in x]
    n = len(xs)
    lines = {str(name): _numbers(values, f"series[{name!r}]", n) for name, values in series.items()}
    values = [v for vs in lines.values() for v in vs if v is not None]
    if n == 0 or not values:
        return _placeholder(title, "no values yet")

    def fmt(v: float) -> str:
        return y_format.format(v)

    def bad(v: float) -> bool:
        return bad_side == "above" and v > threshold or bad_side == "below" and v < threshold

    alert = STATUS_COLOURS[ALERT]
    colours = {name: _SERIES_COLOURS[i % len(_SERIES_COLOURS)] for i, name in enumerate(lines)}
    items = []
    for name, vs in lines.items():
        last = next((v for v in reversed(vs) if v is not None), None)
        items.append(_swatch(name if last is None else f"{name} (last {fmt(last)})", colours[name], dash=""))
    if threshold is not None:
        items.append(_swatch(threshold_label or f"threshold {fmt(threshold)}", alert, dash="5 3"))
    if reference is not None:
        items.append(_swatch(f"reference {fmt(reference)}", _REFERENCE_LINE, dash="1.5 2.5"))
    legend, top = _legend([i[0] for i in items], [i[1] for i in items], 42)
    top += 10
    extra = [v for v in (threshold, reference) if v is not None]
    lo, hi = min(values + extra), max(values + extra)
    pad = (hi - lo) * 0.08
    for count in (4, 3, 2, 1):  # coarser ticks until y_format tells them apart ("{:.0f}" on 0..0.6)
        ticks = _ticks(0.0 if lo >= 0 > lo - pad else lo - pad, hi + pad, count)
        if len({fmt(t) for t in ticks}) == len(ticks):
            break
    left = 14 + max(len(fmt(t)) for t in ticks) * _CHAR_PX
    right, bottom = CHART_WIDTH - 16.0, CHART_HEIGHT - 30.0

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * (v - ticks[0]) / (ticks[-1] - ticks[0])

    def x_of(i: int) -> float:
        return (left + right) / 2 if n == 1 else left + (right - left) * i / (n - 1)

    body = list(legend)
    if bad_side is not None:
        yt = y_of(threshold)
        y0, y1 = (top, yt) if bad_side == "above" else (yt, bottom)
        body.append(f'<rect x="{left:.1f}" y="{y0:.1f}" width="{right - left:.1f}" height="{y1 - y0:.1f}" '
                    f'fill="{alert}" fill-opacity="0.07" class="bad-region"/>')
    body += _y_axis(ticks, y_of, left, right, fmt)
    body.append(f'<line x1="{left:.1f}" y1="{bottom:.1f}" x2="{right:.1f}" y2="{bottom:.1f}" '
                f'stroke="{_AXIS}"/>')
    same_year = all(_DATE.match(s) for s in xs) and len({s[:4] for s in xs}) == 1
    shown = [s[5:] if same_year else s for s in xs]
    every = max(1, math.ceil(n / max(1, int((right - left) / (max(map(len, shown)) * _CHAR_PX + 14)))))
    ticks_x = [i for i in range(n) if i % every == 0]
    if ticks_x[-1] != n - 1:  # the last day always gets its label; a too-close one before it gives way
        if len(ticks_x) > 1 and n - 1 - ticks_x[-1] < every * 0.75:
            ticks_x.pop()
        ticks_x.append(n - 1)
    for i in ticks_x:
        body.append(f'<line x1="{x_of(i):.1f}" y1="{bottom:.1f}" x2="{x_of(i):.1f}" y2="{bottom + 4:.1f}" '
                    f'stroke="{_AXIS}"/>')
        body.append(_text(x_of(i), bottom + 16, shown[i], limit=12, text_anchor="middle", fill=_MUTED))
    if threshold is not None:
        yt = y_of(threshold)
        body.append(f'<line x1="{left:.1f}" y1="{yt:.1f}" x2="{right:.1f}" y2="{yt:.1f}" stroke="{alert}" '
                    f'stroke-width="1.5" stroke-dasharray="5 3" class="threshold"/>')
    if reference is not None:
        yr = y_of(reference)
        body.append(f'<line x1="{left:.1f}" y1="{yr:.1f}" x2="{right:.1f}" y2="{yr:.1f}" '
                    f'stroke="{_REFERENCE_LINE}" stroke-width="1.5" stroke-dasharray="1.5 2.5" '
                    f'class="reference"/>')
    radius = 3.0 if n <= 45 else 2.0
    for name, vs in lines.items():
        run: list[str] = []
        for i, v in enumerate([*vs, None]):
            if v is not None:
                run.append(f"{x_of(i):.1f},{y_of(v):.1f}")
            elif run:
                if len(run) > 1:
                    body.append(f'<polyline class="line" points="{" ".join(run)}" fill="none" '
                                f'stroke="{colours[name]}" stroke-width="2" stroke-linejoin="round"/>')
                run = []
        for i, v in enumerate(vs):
            if v is None:
                continue
            is_bad = threshold is not None and bad_side is not None and bad(v)
            body.append(f'<circle class="{"pt bad" if is_bad else "pt"}" cx="{x_of(i):.1f}" '
                        f'cy="{y_of(v):.1f}" r="{radius + (1 if is_bad else 0)}" '
                        f'fill="{alert if is_bad else colours[name]}" '
                        f'stroke="#ffffff" stroke-width="1">'
                        f"<title>{_esc(f'{name} {xs[i]}: {fmt(v)}')}</title></circle>")
    return _svg(title, body)


# ----------------------------------------------------------------------------- table and page
def table_html(rows: list[dict], columns: list[str] | None = None, *, status_key: str = "status") -> str:
    """An HTML table: the `status_key` column as badges (its rows tinted when warn/alert), numbers
    right-aligned and compact, long texts truncated with the full text as a tooltip."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}] must be a dict, got {type(row).__name__}")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not rows or not columns:
        return '<p class="empty">No rows.</p>'

    def numeric(col: str) -> bool:
        cells = [r.get(col) for r in rows if r.get(col) is not None]
        return bool(cells) and all(isinstance(c, Real) and not isinstance(c, bool) for c in cells)

    nums = {col: numeric(col) and col != status_key for col in columns}
    head = "".join(f'<th{" class=num" if nums[c] else ""}>{_esc(c)}</th>' for c in columns)
    out = ['<div class="table-wrap"><table><thead><tr>', head, "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        status = _status(row.get(status_key), f"rows[{i}][{status_key!r}]") if status_key in row else None
        out.append(f'<tr class="row-{status}">' if status else "<tr>")
        for col in columns:
            if col == status_key and status:
                out.append(f'<td class="status">{status_badge(status)}</td>')
                continue
            value = row.get(col)
            text = format_value(value)
            shown, clipped = _clip(text, 80)
            cls = " class=num" if nums[col] else (" class=missing" if text == "\u2013" else "")
            tip = f' title="{_esc(text)}"' if clipped else ""
            out.append(f"<td{cls}{tip}>{_esc(shown)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def grid_html(items: list[str]) -> str:
    """Small multiples: the given charts (or any block) in a responsive grid of tiles."""
    return '<div class="grid">' + "".join(f"<div>{item}</div>" for item in items) + "</div>"


def tiles_html(tiles: list[tuple[str, Any, str | None]]) -> str:
    """Key figures as cards: (label, value, status or None), the value large, the status as a colour band."""
    out = ['<div class="tiles">']
    for i, (label, value, status) in enumerate(tiles):
        colour = STATUS_COLOURS[_status(status, f"tiles[{i}] status")] if status else _GRID
        out.append(f'<div class="tile" style="border-left-color:{colour}"><div class="l">{_esc(label)}</div>'
                   f'<div class="v">{_esc(format_value(value))}</div></div>')
    return "".join(out) + "</div>"


def _css() -> str:
    badges = "".join(f".badge-{s}{{background:{c};color:{_STATUS_TEXT.get(s, '#fff')}}}"
                     for s, c in STATUS_COLOURS.items())
    rows = ".row-alert td{background:#fdf1f0}.row-warn td{background:#fff9e8}"
    return f"""*{{box-sizing:border-box}}
body{{margin:0;background:#f2f4f7;color:{_INK};font:14px/1.45 {FONT_STACK}}}
header{{background:#fff;border-top:6px solid var(--status);border-bottom:1px solid #e4e7ec;
 padding:18px 32px;display:flex;align-items:center;gap:20px}}
header h1{{margin:0;font-size:22px;font-weight:650}} header .sub{{color:{_MUTED};margin-top:3px}}
header .overall{{margin-left:auto;text-align:right;color:{_MUTED};font-size:12px}}
header .overall .badge{{font-size:16px;padding:6px 18px;margin-top:4px;display:block}}
main{{max-width:1240px;margin:0 auto;padding:22px 32px 8px}}
.card{{background:#fff;border:1px solid #e4e7ec;border-radius:10px;padding:16px 20px 18px;margin-bottom:18px;
 box-shadow:0 1px 2px rgba(16,24,40,.05)}}
.card h2{{margin:0 0 12px;font-size:15px;font-weight:650;color:{_INK}}}
.badge{{display:inline-block;min-width:58px;text-align:center;padding:2px 10px;border-radius:999px;
 font-size:11.5px;font-weight:700;letter-spacing:.04em;white-space:nowrap}}{badges}
.table-wrap{{overflow-x:auto}} table{{border-collapse:collapse;width:100%;font-size:13px}}
th{{text-align:left;color:{_MUTED};font-weight:600;border-bottom:2px solid #e4e7ec;padding:7px 10px;
 white-space:nowrap}}
td{{border-bottom:1px solid #eef0f3;padding:6px 10px;max-width:420px;overflow:hidden;text-overflow:ellipsis}}
.num{{text-align:right;font-variant-numeric:tabular-nums}} td.missing{{color:{_AXIS}}}{rows}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px}}
.grid>div{{border:1px solid #eef0f3;border-radius:8px;padding:4px;min-width:0}}
svg.chart{{width:100%;height:auto;display:block}} .empty{{color:{_MUTED};font-style:italic;margin:0}}
.tiles{{display:flex;flex-wrap:wrap;gap:12px}} .tile{{flex:1 1 170px;border:1px solid #e4e7ec;
 border-left:6px solid;border-radius:8px;padding:10px 14px}} .tile .l{{color:{_MUTED};font-size:12px}}
.tile .v{{font-size:22px;font-weight:700;font-variant-numeric:tabular-nums}}
footer{{color:{_AXIS};font-size:12px;text-align:center;padding:4px 0 24px}}"""


def page_html(title: str, sections: list[tuple[str, str]], *, subtitle: str = "",
              status: str | None = None) -> str:
    """A full self-contained page: a header with the title, subtitle and overall status, then each
    (heading, body HTML) section as a card. Headings are escaped; bodies are HTML from this module."""
    colour = STATUS_COLOURS[_status(status)] if status is not None else "#d0d5dd"
    overall = f'<div class="overall">overall{status_badge(status)}</div>' if status is not None else ""
    sub = f'<div class="sub">{_esc(subtitle)}</div>' if subtitle else ""
    cards = "".join(f'<section class="card"><h2>{_esc(heading)}</h2>{body}</section>'
                    for heading, body in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_css()}</style></head>"
            f'<body><header style="--status:{colour}"><div><h1>{_esc(title)}</h1>{sub}</div>{overall}'
            f"</header><main>{cards}</main><footer>Self-contained report: opens without network.</footer>"
            f"</body></html>\n")


def write_report(path: str | os.PathLike, html: str) -> Path:
    """Write `html` to `path` atomically (a temp file in the same folder, then os.replace), creating
    the parent folders; returns the path."""
    if not isinstance(html, str):
        raise TypeError(f"html must be a str, got {type(html).__name__}")
    from ml_platform.atomic_files import write_text_atomic

    return write_text_atomic(path, html)
