"""A trend chart as the panel draws it: the geometry of one inline SVG, computed here, laid out by a template.

Why on the server and without a chart library: the panel works on a closed lab network with a
Content-Security-Policy that loads nothing but its own files, and a chart must read the same on
a bench tablet as in a test. So this module turns points and limit levels into pixel
coordinates (a plain linear map of each axis onto the plot area), and templates/qc_chart.html
only writes them out as SVG elements: no script, no inline style, no external asset.

Each limit level is drawn where its value falls on the y axis, from the numbers the QC rule
judged with (the results' `limit_values`), and its label carries the rule's source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hotlab.physics.utc_time import NS_PER_S

WIDTH, HEIGHT = 760, 280
#: The plot area inside the SVG: room on the left for the y ticks, below for the x ticks and the x axis's name
#: (the y axis is named in the caption above, where a long name can wrap).
LEFT, RIGHT, TOP, BOTTOM = 56, WIDTH - 16, 16, HEIGHT - 44
#: About this many ticks on each axis.
TICKS = 5
#: Values and levels keep this fraction of the axis span as a margin from the plot's edges.
MARGIN = 0.12


@dataclass(frozen=True, slots=True)
class Point:
    """One judged value: `x` in the axis unit (epoch ns on a time axis, days on a day axis)."""

    x: float
    y: float
    #: pass, warn or fail: the dot's colour.
    verdict: str
    #: What a reader sees on hovering or long-pressing the dot (SVG <title>).
    label: str
    #: The series the point belongs to, e.g. "re-measured" or "station-reported"; its marker shape.
    series: str = ""


@dataclass(frozen=True, slots=True)
class Level:
    """A limit level as the rule states it, e.g. value 8.0 for "fail beyond +8 %"."""

    value: float
    #: warn or fail: its line's colour.
    severity: str
    label: str


@dataclass(frozen=True, slots=True)
class DrawnLevel:
    value: float
    severity: str
    label: str
    y: float


#: Marker shapes by series in order of appearance; any further series share the last (the template draws each).
MARKERS = ("circle", "square")


@dataclass(frozen=True, slots=True)
class Dot:
    x: float
    y: float
    verdict: str
    label: str
    marker: str


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True, slots=True)
class SvgChart:
    """Everything the template writes out; y grows downwards as in SVG."""

    key: str
    title: str
    y_label: str
    x_label: str
    #: The limit as the rule words it, and the text it comes from.
    limit_text: str
    limit_source: str
    y_min: float
    y_max: float
    dots: tuple[Dot, ...]
    levels: tuple[DrawnLevel, ...]
    #: The band of values that pass (between two levels, or from one level to the plot's edge), as y pixels.
    pass_band: tuple[float, float] | None
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    #: (series name, marker) in order of appearance, explained under the chart when there are several.
    series: tuple[tuple[str, str], ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM


def chart(
    key: str,
    title: str,
    *,
    points: Sequence[Point],
    levels: Sequence[Level],
    passing: tuple[float | None, float | None] | None,
    time_axis: bool,
    x_label: str,
    y_label: str,
    limit_text: str,
    limit_source: str,
    x_span: tuple[float, float] | None = None,
    y_floor: float | None = None,
) -> SvgChart:
    """Lay out `points` and the limit `levels` on one chart.

    `passing` is the passing range (low, high), None for an open side; `x_span` fixes the x axis
    (a report period) instead of fitting the points; `y_floor` keeps the y axis from going below
    a value no result can take (0 for a yield or a ratio).
    """
    xs = [p.x for p in points]
    ys = [p.y for p in points] + [level.value for level in levels]
    x_low, x_high = x_span if x_span is not None else _padded(xs or [0.0, 1.0], 0.03)
    y_low, y_high = _padded(ys or [0.0, 1.0], MARGIN)
    if y_floor is not None and y_low < y_floor <= min(ys or [y_floor]):
        y_low = y_floor

    def x_map(x: float) -> float:
        return _map(x, x_low, x_high, LEFT, RIGHT)

    def y_map(y: float) -> float:
        return _map(y, y_low, y_high, BOTTOM, TOP)

    names = list(dict.fromkeys(p.series for p in points))
    marker = {name: MARKERS[min(i, len(MARKERS) - 1)] for i, name in enumerate(names)}
    band = None
    if passing is not None:
        low, high = passing
        band = (y_map(y_high if high is None else high), y_map(y_low if low is None else low))
    return SvgChart(
        key=key,
        title=title,
        y_label=y_label,
        x_label=x_label,
        limit_text=limit_text,
        limit_source=limit_source,
        y_min=y_low,
        y_max=y_high,
        dots=tuple(Dot(x_map(p.x), y_map(p.y), p.verdict, p.label, marker[p.series]) for p in points),
        levels=tuple(DrawnLevel(lv.value, lv.severity, lv.label, y_map(lv.value)) for lv in levels),
        pass_band=band,
        x_ticks=tuple(Tick(x_map(at), label) for at, label in _x_ticks(x_low, x_high, time_axis)),
        y_ticks=tuple(Tick(y_map(at), f"{at:g}") for at in _nice_ticks(y_low, y_high)),
        series=tuple((name, marker[name]) for name in names if name),
    )


def _map(value: float, low: float, high: float, to_low: float, to_high: float) -> float:
    return to_low + (value - low) / (high - low) * (to_high - to_low)


def _padded(values: Sequence[float], margin: float) -> tuple[float, float]:
    """The values' range widened by `margin` of it on each side; a single value gets a span of its own."""
    low, high = min(values), max(values)
    span = high - low or abs(high) or 1.0
    return low - span * margin, high + span * margin


def _nice_step(span: float) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about TICKS ticks over `span`."""
    raw = span / TICKS
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _nice_ticks(low: float, high: float) -> list[float]:
    step = _nice_step(high - low)
    first = math.ceil(low / step)
    # Rounded to the step's own precision, so 0.30000000000000004 is written 0.3.
    digits = max(0, -math.floor(math.log10(step)) + 1)
    return [round(i * step, digits) for i in range(first, math.floor(high / step) + 1)]


def _x_ticks(low: float, high: float, time_axis: bool) -> list[tuple[float, str]]:
    if not time_axis:
        return [(at, f"{at:g}") for at in _nice_ticks(low, high)]
    day_ns = 86_400 * NS_PER_S
    span_days = (high - low) / day_ns
    step_days = max(1, math.ceil(span_days / TICKS))
    first = math.ceil(low / day_ns)
    fmt = "%m-%d" if span_days < 300 else "%Y-%m-%d"
    return [
        (day * day_ns, datetime.fromtimestamp(day * 86_400, tz=UTC).strftime(fmt))
        for day in range(first, math.floor(high / day_ns) + 1, step_days)
    ]
