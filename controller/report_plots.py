"""Figures for the QC officer's report: trends with limit bands, the linearity fit, elution yield.

Why a module of its own: the HTML and the PDF show the same figures, and plotting is the one
heavy dependency. Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
through pyplot, so no global backend or figure registry is touched (safe in a server and in
tests running side by side). Each builder takes plain payload dicts (as archived) and returns
a Figure; the caller embeds it (`png_base64`) or adds it to a PDF.

Bands come from the result's own `limit_values` (written by controller/qc/result.py), never
from defaults here: the report shows the limit that judged the result, site overrides included.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from hotlab.physics.utc_time import NS_PER_S

VERDICT_COLOURS = {"pass": "#2e7d32", "warn": "#f0a000", "fail": "#c62828"}
NEUTRAL = "#1f5fa8"
_BAND_ALPHA = 0.13
_PASS_BAND, _WARN_BAND, _FAIL_BAND = "#2e7d32", "#f0a000", "#c62828"
_HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class Fit:
    """A least-squares line over time: its slope per day and its value at the first and the last time."""

    slope_per_day: float
    first_ns: int
    first: float
    last_ns: int
    last: float


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """One judged value at one time, coloured by its verdict (None: no verdict, e.g. a raw elution)."""

    time_ns: int
    value: float
    verdict: str | None = None


def utc(time_ns: int) -> datetime:
    return datetime.fromtimestamp(time_ns / NS_PER_S, tz=UTC)


def new_figure(height: float = 3.2) -> Figure:
    """An 8-inch-wide figure with fixed margins: a constrained layout would lay every figure out twice, doubling
    the time a report over years spends drawing (the labels here are short and fit the margins)."""
    figure = Figure(figsize=(8.0, height), dpi=100)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.16 * 3.2 / height, hspace=0.1)
    return figure


def png_base64(figure: Figure) -> str:
    """The figure as a base64 PNG, for an inline `data:` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _time_axis(ax: Any, period_ns: tuple[int, int] | None, label: str) -> None:
    """UTC dates on x; spanning the report period so figures of one report line up (and one point is not a decade).

    `label` names the clock the times came from (controller/report.py CLOCKS)."""
    if period_ns is not None:
        ax.set_xlim(utc(period_ns[0]), utc(period_ns[1]))
    locator = AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))
    ax.set_xlabel(label)


def _span(values: Sequence[float], *levels: float | None) -> tuple[float, float]:
    finite = [v for v in (*values, *levels) if v is not None and math.isfinite(v)]
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.15 or abs(high) * 0.15 or 1.0
    return low - pad, high + pad


def draw_limit_bands(ax: Any, limit: Mapping[str, Any] | None, values: Sequence[float]) -> None:
    """Shade pass / warn / fail regions of a limit (tolerance, ceiling, floor or range) behind the data."""
    if not limit:
        ax.set_ylim(*_span(values))
        return
    kind = limit.get("kind")
    warn, fail = limit.get("warn"), limit.get("fail")
    if kind == "tolerance" and fail is not None:
        top = max(_span([abs(v) for v in values], fail)[1], 0.0)
        ax.set_ylim(-top, top)
        inner = warn if warn is not None else fail
        ax.axhspan(-inner, inner, color=_PASS_BAND, alpha=_BAND_ALPHA, lw=0)
        if warn is not None:
            for lo, hi in ((warn, fail), (-fail, -warn)):
                ax.axhspan(lo, hi, color=_WARN_BAND, alpha=_BAND_ALPHA, lw=0)
        for lo, hi in ((fail, top), (-top, -fail)):
            ax.axhspan(lo, hi, color=_FAIL_BAND, alpha=_BAND_ALPHA, lw=0)
        levels = [fail, -fail] + ([warn, -warn] if warn is not None else [])
    elif kind == "ceiling" and fail is not None:
        bottom, top = _span(values, 0.0, fail)
        bottom = min(bottom, 0.0) if min(values, default=0.0) < 0 else 0.0
        ax.set_ylim(bottom, top)
        inner = warn if warn is not None else fail
        ax.axhspan(bottom, inner, color=_PASS_BAND, alpha=_BAND_ALPHA, lw=0)
        if warn is not None:
            ax.axhspan(warn, fail, color=_WARN_BAND, alpha=_BAND_ALPHA, lw=0)
        ax.axhspan(fail, top, color=_FAIL_BAND, alpha=_BAND_ALPHA, lw=0)
        levels = [fail] + ([warn] if warn is not None else [])
    elif kind == "floor" and fail is not None:
        bottom, top = _span(values, fail, warn)
        ax.set_ylim(bottom, top)
        inner = warn if warn is not None else fail
        ax.axhspan(inner, top, color=_PASS_BAND, alpha=_BAND_ALPHA, lw=0)
        if warn is not None:
            ax.axhspan(fail, warn, color=_WARN_BAND, alpha=_BAND_ALPHA, lw=0)
        ax.axhspan(bottom, fail, color=_FAIL_BAND, alpha=_BAND_ALPHA, lw=0)
        levels = [fail] + ([warn] if warn is not None else [])
    elif kind == "range" and limit.get("low") is not None and limit.get("high") is not None:
        low, high = limit["low"], limit["high"]
        bottom, top = _span(values, low, high)
        ax.set_ylim(bottom, top)
        ax.axhspan(low, high, color=_PASS_BAND, alpha=_BAND_ALPHA, lw=0)
        ax.axhspan(bottom, low, color=_FAIL_BAND, alpha=_BAND_ALPHA, lw=0)
        ax.axhspan(high, top, color=_FAIL_BAND, alpha=_BAND_ALPHA, lw=0)
        levels = [low, high]
    else:
        ax.set_ylim(*_span(values))
        return
    for level in levels:
        ax.axhline(level, color="#555555", lw=0.7, ls="--")


def _scatter_by_verdict(ax: Any, points: Sequence[TrendPoint], marker: str, label: str) -> None:
    times = [utc(p.time_ns) for p in points]
    colours = [VERDICT_COLOURS.get(p.verdict or "", NEUTRAL) for p in points]
    ax.plot(times, [p.value for p in points], color="#888888", lw=0.6, zorder=2)
    ax.scatter(
        times,
        [p.value for p in points],
        c=colours,
        marker=marker,
        s=26,
        zorder=3,
        label=label,
        edgecolors="black",
        linewidths=0.3,
    )


def trend_figure(
    title: str,
    ylabel: str,
    series: Mapping[str, Sequence[TrendPoint]],
    limit: Mapping[str, Any] | None,
    period_ns: tuple[int, int] | None = None,
    *,
    xlabel: str,
    ranges: Mapping[str, Sequence[tuple[int, float, float]]] | None = None,
    marked: Sequence[TrendPoint] = (),
    fit: Fit | None = None,
) -> Figure:
    """Values over time, one marker per series (e.g. check source), on the limit's bands.

    Aggregated series come with `ranges` (per point: time, lowest, highest, drawn as a bar) and the
    results that did not pass as `marked`, drawn on top in their verdict's colour; `fit` adds the
    least-squares line with its slope in the legend.
    """
    figure = new_figure()
    ax: Any = figure.add_subplot()
    markers = "osD^vP*X"
    for index, (name, points) in enumerate(sorted(series.items())):
        if ranges and name in ranges:
            bars = ranges[name]
            ax.vlines([utc(t) for t, _, _ in bars], [lo for _, lo, _ in bars], [hi for _, _, hi in bars],
                      color="#9db3cf", lw=0.8, zorder=1)  # fmt: skip
        label = f"{name} (mean, range)" if ranges and name in ranges else name
        _scatter_by_verdict(ax, sorted(points, key=lambda p: p.time_ns), markers[index % len(markers)], label)
    if marked:
        ax.scatter(
            [utc(p.time_ns) for p in marked],
            [p.value for p in marked],
            c=[VERDICT_COLOURS.get(p.verdict or "", NEUTRAL) for p in marked],
            marker="X",
            s=34,
            zorder=4,
            label="did not pass",
            edgecolors="black",
            linewidths=0.3,
        )
    if fit is not None:
        ax.plot(
            [utc(fit.first_ns), utc(fit.last_ns)],
            [fit.first, fit.last],
            color="black",
            lw=0.9,
            ls=":",
            label=f"trend {fit.slope_per_day:+.3f} /day",
        )
    values = [p.value for points in series.values() for p in points] + [p.value for p in marked]
    values += [v for bars in (ranges or {}).values() for _, lo, hi in bars for v in (lo, hi)]
    draw_limit_bands(ax, limit, values)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    _time_axis(ax, period_ns, xlabel)
    if len(series) > 1 or marked or fit is not None:
        ax.legend(fontsize=7, loc="upper left", framealpha=0.8)
    ax.grid(alpha=0.3)
    return figure


def linearity_figure(title: str, inputs: Mapping[str, Any], limit: Mapping[str, Any] | None) -> Figure | None:
    """Decay-method linearity: activity on a log axis with the decay-law expectation, and each point's deviation.

    The expectation is the library half-life carried from the normalisation at the low-activity end
    (controller/qc/calibrator_rules.py `linearity_decay`), so the plot shows what was judged, not a
    fit. Needs `inputs["points"]` with time_ns, activity_bq and expected_bq; returns None when a
    result does not carry them, and the report then shows the table only.
    """
    points = inputs.get("points")
    half_life_s = inputs.get("half_life_s")
    if not isinstance(points, list) or len(points) < 2 or not isinstance(half_life_s, (int, float)):
        return None
    try:
        t_ns = np.array([int(p["time_ns"]) for p in points])
        measured = np.array([float(p["activity_bq"]) for p in points])
        expected = np.array([float(p["expected_bq"]) for p in points])
        normalising = np.array([bool(p.get("normalisation")) for p in points])
    except (KeyError, TypeError, ValueError):
        return None
    hours = (t_ns - t_ns[0]) / NS_PER_S / _HOUR_S
    deviation = (measured / expected - 1.0) * 100.0
    figure = new_figure(height=4.6)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    dense = np.linspace(hours[0], hours[-1], 200)
    curve = expected[0] * np.exp2(-(dense - hours[0]) * _HOUR_S / half_life_s)
    top.semilogy(dense, curve / 1e6, color=NEUTRAL, lw=1.2, label=f"expected, T½ = {half_life_s / _HOUR_S:.4g} h")
    top.semilogy(hours[~normalising], measured[~normalising] / 1e6, "o", color="black", ms=4, label="measured")
    top.semilogy(
        hours[normalising], measured[normalising] / 1e6, "s", color="black", mfc="none", ms=6, label="normalisation"
    )
    top.set_ylabel("activity (MBq)")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=7)
    top.grid(alpha=0.3, which="both")
    bottom.scatter(
        hours,
        deviation,
        c=[_point_colour(d, limit) for d in deviation],
        s=22,
        zorder=3,
        edgecolors="black",
        linewidths=0.3,
    )
    draw_limit_bands(bottom, limit, list(deviation))
    bottom.set_ylabel("deviation from decay law (%)")
    bottom.set_xlabel("hours since first reading")
    bottom.grid(alpha=0.3)
    return figure


def _point_colour(deviation: float, limit: Mapping[str, Any] | None) -> str:
    if not limit or limit.get("kind") != "tolerance" or limit.get("fail") is None:
        return NEUTRAL
    size = abs(deviation)
    if size > limit["fail"]:
        return VERDICT_COLOURS["fail"]
    if limit.get("warn") is not None and size > limit["warn"]:
        return VERDICT_COLOURS["warn"]
    return VERDICT_COLOURS["pass"]


#: Characters per line that fit a landscape A4 page at the table font size (DejaVu Sans Mono, 0.6 em).
TEXT_PAGE_COLUMNS = 190


def text_pages(title: str, lines: Iterable[str], lines_per_page: int = 64) -> Iterator[tuple[Figure, bool]]:
    """Monospaced landscape A4 pages for the PDF's tables, made one at a time as `lines` yields them; a long
    table continues on further pages. With each page: whether all its text fits the PDF's built-in Courier
    (cp1252), which writes ~50 times faster than an embedded font (controller/report.py `write_pdf`)."""
    remaining = iter(lines)
    number = 0
    while True:
        chunk = list(islice(remaining, lines_per_page))
        if number and not chunk:
            return
        number += 1
        heading = title if number == 1 else f"{title} (continued)"
        page = Figure(figsize=(11.69, 8.27), dpi=100)
        FigureCanvasAgg(page)
        core_font = _fits_courier(heading, *chunk)
        weight = "medium" if core_font else "normal"  # medium: the built-in Courier's one weight
        page.text(0.04, 0.96, heading, fontsize=11, weight="bold", va="top")
        page.text(0.04, 0.92, "\n".join(chunk), fontsize=6.2, family="monospace", va="top", weight=weight)
        yield page, core_font
        if len(chunk) < lines_per_page:
            return


def _fits_courier(*texts: str) -> bool:
    try:
        for text in texts:
            text.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True
