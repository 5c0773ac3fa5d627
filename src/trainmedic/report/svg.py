"""Small static SVG charts (lines with event markers, bars) for the self-contained HTML report.

Plain SVG with `<title>` tooltips keeps the report readable offline, in any browser, with no
JavaScript. Axes use "nice" round ticks so a reader can compare charts at a glance.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 58, 16, 28, 34


@dataclass
class Line:
    """One series: `values` may hold None (or non-finite numbers) where nothing was logged."""

    label: str
    steps: Sequence[float]
    values: Sequence[float | None]
    color: str
    dots: bool = False  # mark every point: for sparse series such as eval loss


@dataclass
class Marker:
    """A vertical event mark at `step`, placed on the first line's curve, with a tooltip."""

    step: float
    tooltip: str
    color: str
    css_class: str = "event"


@dataclass
class Scale:
    """Linear map from a data domain to pixel range."""

    d0: float
    d1: float
    r0: float
    r1: float

    def __call__(self, v: float) -> float:
        half_span = self.d1 / 2 - self.d0 / 2  # halves: no overflow near the float limits
        if half_span == 0:
            return (self.r0 + self.r1) / 2
        return self.r0 + (v / 2 - self.d0 / 2) / half_span * (self.r1 - self.r0)


@dataclass
class Axis:
    lo: float
    hi: float
    ticks: list[float] = field(default_factory=list)
    step: float = 1.0


def _finite(v: object) -> bool:
    t = type(v)
    if t is float:
        return v - v == 0  # type: ignore[operator]  # false for NaN and +-inf
    if t is int:
        return -1e300 < v < 1e300  # type: ignore[operator]
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def nice_axis(lo: float, hi: float, target: int = 5, integer: bool = False) -> Axis:
    """Round ticks (1, 2, 2.5, 5 x 10^k) covering [lo, hi]; a flat range is widened around it."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Axis(0.0, 1.0, [0.0, 1.0], 1.0)
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        if math.isfinite(lo - pad) and math.isfinite(hi + pad):
            lo, hi = lo - pad, hi + pad
        if integer and abs(lo) < 2**52 and abs(hi) < 2**52:
            lo, hi = math.floor(lo), math.ceil(hi)
    try:
        axis = _round_axis(lo, hi, target, integer)
    except (OverflowError, ValueError, ZeroDivisionError):
        axis = None
    if axis is None or not all(map(math.isfinite, (axis.lo, axis.hi, axis.step))) or axis.hi <= axis.lo:
        # Values near the float limits: plain end ticks rather than arithmetic that overflows.
        return Axis(lo, hi, [lo] if lo == hi else [lo, hi], hi / 2 - lo / 2)
    return axis


def _round_axis(lo: float, hi: float, target: int, integer: bool) -> Axis | None:
    span = hi - lo
    mag = 10.0 ** math.floor(math.log10(span / target))
    if not mag > 0:
        return None
    step = mag
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        step = m * mag
        if span / step <= target:
            break
    if integer:
        step = max(1.0, float(round(step)))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    if last - first > 4 * target:
        return None
    ticks = [i * step for i in range(first, last + 1)]
    return Axis(ticks[0], ticks[-1], ticks, step)


def tick_label(v: float, step: float) -> str:
    """Short label: 12k / 1.5M for large numbers, enough decimals to tell ticks apart."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 and step >= 1:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if a >= div:
                digits = f"{v / div:.{_decimals(step / div)}f}"
                return (digits.rstrip("0").rstrip(".") if "." in digits else digits) + suffix
    if step < 1e-3 or a >= 1e9:
        return f"{v:.3g}"
    return f"{v:.{_decimals(step)}f}"


def _decimals(step: float) -> int:
    if step >= 1:
        return 0 if float(step).is_integer() else 1  # 2.5-steps: 2.5, 7.5, never "2", "8"
    d = -math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10**-d
    return d + (1 if abs(mantissa - round(mantissa)) > 1e-6 else 0)


def value_label(v: float | None) -> str:
    """A data value for a tooltip: four significant digits."""
    if v is None or not _finite(v):
        return "no value"
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def _frame(width: int, height: int, title: str, css_class: str) -> list[str]:
    return [
        f'<svg class="chart {css_class}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{_PAD_LEFT}" y="16">{escape(title)}</text>',
    ]


def _y_axis(parts: list[str], axis: Axis, y: Scale, x0: float, x1: float) -> None:
    for t in axis.ticks:
        py = y(t)
        parts.append(f'<line class="grid" x1="{x0:.1f}" x2="{x1:.1f}" y1="{py:.1f}" y2="{py:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{x0 - 6:.1f}" y="{py + 4:.1f}" text-anchor="end">'
            f"{escape(tick_label(t, axis.step))}</text>"
        )


def _points(line: Line) -> list[tuple[float, float] | None]:
    """The line's (step, value) pairs as floats, None where either is missing or non-finite."""
    out: list[tuple[float, float] | None] = []
    for s, v in zip(line.steps, line.values, strict=False):
        out.append((float(s), float(v)) if _finite(s) and _finite(v) else None)  # type: ignore[arg-type]
    return out


def _segments(
    points: list[tuple[float, float] | None], x: Scale, y: Scale
) -> list[list[tuple[float, float]]]:
    """Pixel points split at gaps, so a missing value breaks the line instead of bridging it."""
    segs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is not None:
            segs[-1].append((x(p[0]), y(p[1])))
        elif segs[-1]:
            segs.append([])
    return [seg for seg in segs if seg]


def _nearest(points: list[tuple[float, float]], step: float) -> float | None:
    """The value at the logged step nearest to `step` (`points` sorted by step)."""
    if not points:
        return None
    i = bisect.bisect_left(points, (step, -math.inf))
    near = [points[j] for j in (i - 1, i) if 0 <= j < len(points)]
    return min(near, key=lambda p: abs(p[0] - step))[1]


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    width: int = 720,
    height: int = 260,
    markers: Sequence[Marker] = (),
    css_class: str = "lines",
    x_range: tuple[float, float] | None = None,
) -> str:
    """An SVG line chart with a legend; '' when there is nothing at all to draw. `x_range` makes
    the step axis cover at least that range (every chart of one run shares its steps)."""
    cleaned = [_points(ln) for ln in lines]
    finite = [p for pts in cleaned for p in pts if p is not None]
    xs = [p[0] for p in finite] + [float(m.step) for m in markers if _finite(m.step)]
    if xs and x_range is not None and all(map(_finite, x_range)):
        xs += [float(x_range[0]), float(x_range[1])]
    ys = [p[1] for p in finite]
    if not xs:
        return ""
    x0, x1 = _PAD_LEFT, width - _PAD_RIGHT
    y0, y1 = height - _PAD_BOTTOM, _PAD_TOP  # pixel y grows downwards
    x_axis = nice_axis(min(xs), max(xs), target=6, integer=True)
    y_axis = nice_axis(min(ys), max(ys), target=5) if ys else Axis(0.0, 1.0, [], 1.0)
    x, y = Scale(x_axis.lo, x_axis.hi, x0, x1), Scale(y_axis.lo, y_axis.hi, y0, y1)

    parts = _frame(width, height, title, css_class)
    _y_axis(parts, y_axis, y, x0, x1)
    for t in x_axis.ticks:
        px = x(t)
        parts.append(f'<line class="axis" x1="{px:.1f}" x2="{px:.1f}" y1="{y0}" y2="{y0 + 4}"/>')
        parts.append(
            f'<text class="tick" x="{px:.1f}" y="{y0 + 16}" text-anchor="middle">'
            f"{escape(tick_label(t, x_axis.step))}</text>"
        )
    parts.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}"/>')
    parts.append(f'<text class="axis-label" x="{x1}" y="{height - 4}" text-anchor="end">step</text>')

    for ln, points in zip(lines, cleaned, strict=True):
        color = escape(ln.color)
        for seg in _segments(points, x, y):
            if len(seg) == 1 and not ln.dots:
                px, py = seg[0]
                parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{color}"/>')
                continue
            pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in seg)
            parts.append(f'<polyline class="series" fill="none" stroke="{color}" points="{pts}"/>')
            if ln.dots:
                parts.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>' for px, py in seg)

    anchor = sorted(p for p in cleaned[0] if p is not None) if cleaned else []
    for m in markers:
        if not _finite(m.step):
            continue
        px = x(float(m.step))
        vy = _nearest(anchor, float(m.step))
        py = y(vy) if vy is not None and ys else y1 + 4
        color = escape(m.color)
        parts.append(
            f'<g class="{escape(m.css_class)}"><title>{escape(m.tooltip)}</title>'
            f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{y1}" y2="{y0}" stroke="{color}" '
            f'stroke-dasharray="3 3" stroke-opacity="0.6"/>'
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{color}" stroke="white"/></g>'
        )

    _legend(parts, [(ln.label, ln.color) for ln in lines], x1)
    parts.append("</svg>")
    return "".join(parts)


def _legend(parts: list[str], items: list[tuple[str, str]], right: float) -> None:
    px = right
    for label, color in reversed(items):
        px -= 8 * len(label) + 22
        parts.append(
            f'<rect x="{px:.0f}" y="7" width="12" height="4" fill="{escape(color)}"/>'
            f'<text class="legend" x="{px + 16:.0f}" y="13">{escape(label)}</text>'
        )


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float | None],
    *,
    title: str,
    highlight: Sequence[int] = (),
    width: int = 720,
    height: int = 200,
    x_label: str = "layer",
) -> str:
    """An SVG bar chart; bars at the indices in `highlight` stand out. '' when there is nothing."""
    if not labels:
        return ""
    vals = [float(v) if _finite(v) else None for v in values]  # type: ignore[arg-type]
    finite = [v for v in vals if v is not None]
    axis = (
        nice_axis(min([0.0, *finite]), max([0.0, *finite]), target=4) if finite else Axis(0.0, 1.0, [], 1.0)
    )
    x0, x1 = _PAD_LEFT, width - _PAD_RIGHT
    y0, y1 = height - _PAD_BOTTOM, _PAD_TOP
    y = Scale(axis.lo, axis.hi, y0, y1)
    slot = (x1 - x0) / len(labels)
    bar_w = max(1.0, slot * 0.8)
    label_every = max(1, math.ceil(len(labels) / 32))
    flagged = set(highlight)

    parts = _frame(width, height, title, "bars")
    _y_axis(parts, axis, y, x0, x1)
    base = y(0.0)
    for i, (label, v) in enumerate(zip(labels, vals, strict=False)):
        bx = x0 + i * slot + (slot - bar_w) / 2
        tip = f"{x_label} {label}: {value_label(v)}" + (" (flagged)" if i in flagged else "")
        cls = "bar flagged" if i in flagged else "bar"
        if v is None:
            parts.append(
                f'<g class="bar missing"><title>{escape(tip)}</title><text x="{bx + bar_w / 2:.1f}" '
                f'y="{base - 3:.1f}" text-anchor="middle" class="tick">×</text></g>'
            )
        else:
            top, bottom = sorted((y(v), base))
            parts.append(
                f'<rect class="{cls}" x="{bx:.1f}" y="{top:.1f}" width="{bar_w:.1f}" '
                f'height="{max(bottom - top, 0.5):.1f}"><title>{escape(tip)}</title></rect>'
            )
        if i % label_every == 0:
            parts.append(
                f'<text class="tick" x="{bx + bar_w / 2:.1f}" y="{y0 + 14}" text-anchor="middle">'
                f"{escape(label)}</text>"
            )
    parts.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{base:.1f}" y2="{base:.1f}"/>')
    parts.append(
        f'<text class="axis-label" x="{x1}" y="{height - 4}" text-anchor="end">{escape(x_label)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)
