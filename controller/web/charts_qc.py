"""The QC page's trend charts, read from the archive: constancy per setting, yield over a generator's life,
Ge-68 breakthrough.

Each chart plots what its rule judged (`value_judged` of the archived qc_result: the deviation
from this chamber's baseline for constancy, the yield itself, the breakthrough ratio) and draws
the limit levels of the newest result of the chart, with that result's limit text and source:
the chart shows the limit that judged the results, site overrides included (controller/qc/limits.py),
never a default from here. Results written before results carried `value_judged` are not plotted.

Blocking (SQLite): call from a worker thread. At most MAX_POINTS results are read per chart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hotlab.controller import archive_reads as reads
from hotlab.controller.archive import HistoryArchive, TimeRange
from hotlab.controller.archive_reads import Scope
from hotlab.controller.messages import iso_utc
from hotlab.controller.web.charts_svg import Level, Point, SvgChart, chart
from hotlab.physics.utc_time import NS_PER_S, parse_utc_ns

#: Results read for one chart at most; a longer period shows its first MAX_POINTS and says so.
MAX_POINTS = 2000
_DAY_NS = 86_400 * NS_PER_S
#: The two Ge-68 results judged by the Ge-68 limit: the re-measurement after 48 h and the station's own figure.
GE68_SERIES = {"ge68_breakthrough": "re-measured", "ge68_breakthrough_station": "station-reported"}


@dataclass(frozen=True, slots=True)
class QcChart:
    chart: SvgChart
    #: True when the chart's period held more than MAX_POINTS results (only the first are drawn).
    truncated: bool


def qc_charts(archive: HistoryArchive, site: str, period: TimeRange, now_ns: int, device: str | None) -> list[QcChart]:
    """Every chart of the period (`device`: only those of this calibrator or generator), in reading order."""
    span = (float(period.start_ns), float(min(period.end_ns, now_ns)))
    return [
        *_constancy(archive, site, period, span, device),
        *_yields(archive, site, period, device),
        *_breakthrough(archive, site, period, span, device),
    ]


def _judged(results: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in results if isinstance(r.get("value_judged"), (int, float)) and r.get("limit_values")]


def _read(archive: HistoryArchive, site: str, period: TimeRange | None, **where: Any) -> tuple[list[Any], bool]:
    found = archive.query("qc_result", period, site=site, limit=MAX_POINTS + 1, **where)
    return _judged(found[:MAX_POINTS]), len(found) > MAX_POINTS


def _group(
    results: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], object]
) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        groups.setdefault(str(key(result)), []).append(result)
    return dict(sorted(groups.items()))


def _levels(limit: Mapping[str, Any]) -> tuple[list[Level], tuple[float | None, float | None] | None]:
    """The lines to draw for a limit (controller/qc/limits.py LimitKind) and the range that passes;
    no line for a level the limit does not have."""
    kind, unit = limit.get("kind"), limit.get("unit", "")
    warn, fail, low, high = (_number(limit.get(name)) for name in ("warn", "fail", "low", "high"))
    edge = warn if warn is not None else fail
    levels: list[Level] = []
    if kind == "range":
        if low is None or high is None:
            return [], None
        levels += [Level(low, "fail", f"fail below {low:g} {unit}"), Level(high, "fail", f"fail above {high:g} {unit}")]
        return levels, (low, high)
    if fail is None or edge is None:
        return [], None
    if kind == "tolerance":
        for severity, level in (("fail", fail), ("warn", warn)):
            if level is not None:
                levels += [
                    Level(sign * level, severity, f"{severity} beyond {sign * level:+g} {unit}") for sign in (1, -1)
                ]
        return levels, (-edge, edge)
    above = kind == "ceiling"  # else a floor
    for severity, level in (("fail", fail), ("warn", warn)):
        if level is not None:
            levels.append(Level(level, severity, f"{severity} {'above' if above else 'below'} {level:g} {unit}"))
    return levels, (None, edge) if above else (edge, None)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _chart(
    key: str,
    title: str,
    results: Sequence[Mapping[str, Any]],
    *,
    truncated: bool,
    x_of: Callable[[Mapping[str, Any]], float],
    time_axis: bool,
    x_label: str,
    y_label: str,
    x_span: tuple[float, float] | None,
    series_of: Callable[[Mapping[str, Any]], str] = lambda r: "",
) -> QcChart:
    newest = results[-1]
    limit = newest["limit_values"]
    levels, passing = _levels(limit)
    unit = limit.get("unit", "")
    points = [
        Point(
            x_of(r),
            float(r["value_judged"]),
            str(r.get("verdict")),
            f"{iso_utc(int(r['time_ns']))[:16]} · {float(r['value_judged']):.4g} {unit} · {r.get('verdict')}",
            series_of(r),
        )
        for r in results
    ]
    drawn = chart(
        key,
        title,
        points=points,
        levels=levels,
        passing=passing,
        time_axis=time_axis,
        x_label=x_label,
        y_label=y_label,
        limit_text=str(newest.get("limit") or ""),
        limit_source=str(newest.get("limit_source") or ""),
        x_span=x_span,
        y_floor=None if limit.get("kind") == "tolerance" else 0.0,
    )
    return QcChart(drawn, truncated)


def _time(result: Mapping[str, Any]) -> float:
    return float(result["time_ns"])


def _constancy(
    archive: HistoryArchive, site: str, period: TimeRange, span: tuple[float, float], device: str | None
) -> list[QcChart]:
    """One chart per calibrator and nuclide setting: the deviation from this chamber's baseline on that setting."""
    results, truncated = _read(archive, site, period, device=device, test="constancy")
    by_setting = _group(results, lambda r: (r.get("device"), (r.get("inputs") or {}).get("setting") or "?"))
    charts = []
    for group in by_setting.values():
        first = group[0]
        calibrator, setting = first.get("device"), (first.get("inputs") or {}).get("setting") or "?"
        charts.append(
            _chart(
                f"constancy-{calibrator}-{setting}",
                f"Constancy of {calibrator} on the {setting} setting",
                group,
                truncated=truncated,
                x_of=_time,
                time_axis=True,
                x_label="time (UTC)",
                y_label="deviation from this chamber's decay-corrected baseline (%)",
                x_span=span,
            )
        )
    return charts


def _yields(archive: HistoryArchive, site: str, period: TimeRange, device: str | None) -> list[QcChart]:
    """One chart per generator eluted in the period: the yield of each elution over the generator's life (days since
    its calibration). Only generators of the period: a lab that changes its Mo-99 generator weekly has hundreds."""
    eluted = reads.grouped(archive, "qc_result", Scope(period, site), ("device",), extra="test = 'elution_yield'")
    generators = [str(g) for g, _n in eluted if device in (None, g)]
    charts = []
    for generator in generators:
        found, truncated = _read(archive, site, None, device=generator, test="elution_yield")
        results = [r for r in found if (r.get("inputs") or {}).get("calibration_time")]
        if not results:
            continue

        def age_days(result: Mapping[str, Any]) -> float:
            calibrated = parse_utc_ns(str((result.get("inputs") or {})["calibration_time"]))
            return (int(result["time_ns"]) - calibrated) / _DAY_NS

        charts.append(
            _chart(
                f"yield-{generator}",
                f"Elution yield of generator {generator} over its life",
                results,
                truncated=truncated,
                x_of=age_days,
                time_axis=False,
                x_label="days since the generator's calibration",
                y_label="elution yield (% of the Bateman-available daughter)",
                x_span=None,
            )
        )
    return charts


def _breakthrough(
    archive: HistoryArchive, site: str, period: TimeRange, span: tuple[float, float], device: str | None
) -> list[QcChart]:
    """One chart per generator: every Ge-68 result (re-measured and station-reported) against the Ge-68 limit."""
    results: list[Mapping[str, Any]] = []
    truncated = False
    for test in GE68_SERIES:
        found, more = _read(archive, site, period, test=test)
        results += found
        truncated = truncated or more

    def generator_of(result: Mapping[str, Any]) -> str:
        return str((result.get("inputs") or {}).get("generator") or result.get("device"))

    chosen = [r for r in results if device in (None, generator_of(r), r.get("device"))]
    chosen.sort(key=lambda r: (int(r["time_ns"]), str(r["msg_id"])))
    return [
        _chart(
            f"ge68-{generator}",
            f"Ge-68 breakthrough of generator {generator}",
            group,
            truncated=truncated,
            x_of=_time,
            time_axis=True,
            x_label="time (UTC)",
            y_label="Ge-68 as % of the Ga-68 at end of elution",
            x_span=span,
            series_of=lambda r: GE68_SERIES[str(r.get("test"))],
        )
        for generator, group in _group(chosen, generator_of).items()
    ]
