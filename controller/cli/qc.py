"""`hotlab qc ...`: run one QC rule on manually entered measurements and print the verdict.

For the checks a technician does at the bench (a constancy reading, a Mo-99 assay, a Ge-68
re-measurement two days after an elution) and for re-computing a stored verdict. The same
rule functions as the streaming engine judge the input, so the CLI and the live system can
never disagree. Exit 0 with a verdict (whatever it is), 2 on bad input or configuration
(raised as InputError/ConfigError and reported by controller/cli/main.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from hotlab.controller.cli.qc_status import register_status
from hotlab.controller.config_file import read_config_file
from hotlab.controller.messages import iso_utc
from hotlab.controller.qc import calibrator_rules, dosage, generator_rules
from hotlab.controller.qc.calibrator_rules import ReferenceSource, TimedReading
from hotlab.controller.qc.engine import parse_activity_bq, parse_time_ns
from hotlab.controller.qc.generator_rules import GeneratorSpec, generator_pair
from hotlab.controller.qc.limits import DEFAULT_PROFILE, PROFILES, YIELD_LIMIT_BY_DAUGHTER, Limit, load_limits
from hotlab.controller.qc.result import QcInputError, QcResult
from hotlab.physics.nuclides import get_nuclide
from hotlab.physics.units import format_activity

_VERDICT_STYLE = {"pass": "bold green", "warn": "bold yellow", "fail": "bold red"}
Rule = Callable[[argparse.Namespace, dict[str, Limit]], list[QcResult]]


def _time(text: str | None, what: str) -> int:
    return time.time_ns() if text is None else parse_time_ns(text, what)


def _reading(text: str) -> TimedReading:
    """`TIME=ACTIVITY`, e.g. ``2026-03-02T08:00Z=1.2GBq``."""
    when, sep, activity = text.rpartition("=")
    if not sep:
        raise QcInputError(f"reading {text!r}: expected TIME=ACTIVITY, e.g. 2026-03-02T08:00:00Z=1.2GBq")
    return TimedReading(parse_time_ns(when, "reading time"), parse_activity_bq(activity, "reading activity"))


def _labelled(text: str) -> TimedReading:
    """`LABEL@TIME=ACTIVITY`, e.g. ``10 mL syringe@2026-03-02T08:00Z=370MBq``."""
    label, sep, reading = text.partition("@")
    if not sep or not label.strip():
        raise QcInputError(
            f"reading {text!r}: expected LABEL@TIME=ACTIVITY, e.g. vial-10mL@2026-03-02T08:00:00Z=370MBq"
        )
    timed = _reading(reading)
    return TimedReading(timed.time_ns, timed.activity_bq, label.strip())


def _factor(text: str) -> tuple[str, float]:
    """`LABEL=FACTOR`, e.g. ``sleeve-3=41.7``."""
    label, sep, number = text.rpartition("=")
    try:
        factor = float(number)
    except ValueError:
        factor = math.nan
    if not sep or not label.strip() or not math.isfinite(factor) or factor <= 0:
        raise QcInputError(f"sleeve factor {text!r}: expected LABEL=FACTOR with a positive number, e.g. sleeve-3=41.7")
    return label.strip(), factor


def _source(args: argparse.Namespace) -> ReferenceSource:
    return ReferenceSource(
        args.source_id,
        get_nuclide(args.nuclide),
        parse_activity_bq(args.reference, "--reference"),
        parse_time_ns(args.reference_date, "--reference-date"),
    )


def _constancy(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    readings = [parse_activity_bq(value, "--measured") for value in args.measured]
    return [calibrator_rules.constancy(_source(args), readings, _time(args.at, "--at"), limits["constancy"])]


def _accuracy(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    readings = [parse_activity_bq(value, "--measured") for value in args.measured]
    return [calibrator_rules.accuracy(_source(args), readings, _time(args.at, "--at"), limits["accuracy"])]


def _linearity(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    series = [_reading(text) for text in args.reading]
    return [
        calibrator_rules.linearity_decay(
            get_nuclide(args.nuclide), series, limits["linearity"], normalisation_points=args.normalise_points
        )
    ]


def _elution(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    parent, daughter = generator_pair(args.parent, args.daughter)
    spec = GeneratorSpec(
        args.generator,
        parent,
        daughter,
        parse_activity_bq(args.calibration, "--calibration"),
        parse_time_ns(args.calibration_date, "--calibration-date"),
    )
    last = None if args.last_elution is None else parse_time_ns(args.last_elution, "--last-elution")
    residual = 0.0 if args.residual is None else parse_activity_bq(args.residual, "--residual")
    return [
        generator_rules.elution_yield(
            spec,
            parse_activity_bq(args.eluted, "--eluted"),
            _time(args.at, "--at"),
            limits[YIELD_LIMIT_BY_DAUGHTER[daughter.name]],
            last_elution_ns=last,
            residual_bq=residual,
        )
    ]


def _breakthrough(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    return [
        generator_rules.ge68_breakthrough(
            parse_activity_bq(args.eluate, "--eluate"),
            parse_time_ns(args.end_of_elution, "--end-of-elution"),
            parse_activity_bq(args.remeasured, "--remeasured"),
            _time(args.at, "--at"),
            limits["ge68_breakthrough"],
            background_bq=[parse_activity_bq(value, "--background", allow_zero=True) for value in args.background],
            minimum_detectable_bq=(
                0.0 if args.min_detectable is None else parse_activity_bq(args.min_detectable, "--min-detectable")
            ),
            aliquot_fraction=args.aliquot_fraction,
        )
    ]


def _mo99(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    administration = None if args.administration is None else parse_time_ns(args.administration, "--administration")
    mo99 = parse_activity_bq(args.mo99, "--mo99", allow_zero=True)
    return [
        generator_rules.mo99_breakthrough(
            mo99,
            parse_activity_bq(args.tc99m, "--tc99m"),
            _time(args.at, "--at"),
            limits["mo99_breakthrough"],
            administration_ns=administration,
        )
    ]


def _lu177m(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    use = None if args.use is None else parse_time_ns(args.use, "--use")
    return [
        generator_rules.lu177m_ratio(
            parse_activity_bq(args.lu177m, "--lu177m", allow_zero=True),
            parse_activity_bq(args.lu177, "--lu177"),
            _time(args.at, "--at"),
            limits["lu177m_ratio"],
            use_ns=use,
        )
    ]


def _strontium(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    return list(
        generator_rules.strontium_breakthrough(
            parse_activity_bq(args.rb82, "--rb82"),
            parse_time_ns(args.end_of_elution, "--end-of-elution"),
            parse_activity_bq(args.sr82, "--sr82", allow_zero=True),
            parse_activity_bq(args.sr85, "--sr85", allow_zero=True),
            _time(args.at, "--at"),
            limits["sr82_breakthrough"],
            limits["sr85_breakthrough"],
        )
    )


def _ga68_half_life(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    return [generator_rules.ga68_half_life(_reading(args.first), _reading(args.second), limits["ga68_half_life"])]


def _geometry(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    others = [_labelled(text) for text in args.reading]
    return [calibrator_rules.geometry(get_nuclide(args.nuclide), _labelled(args.reference), others, limits["geometry"])]


def _sleeve(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    factors = dict(_factor(text) for text in args.factor)
    if len(factors) < len(args.factor):
        raise QcInputError("--factor: a sleeve is given more than one factor")
    return [
        calibrator_rules.linearity_sleeve(
            get_nuclide(args.nuclide),
            factors,
            _reading(args.unshielded),
            [_labelled(text) for text in args.sleeve],
            limits["linearity_sleeve"],
            normalisation_points=args.normalise_points,
        )
    ]


def _dosage(args: argparse.Namespace, limits: dict[str, Limit]) -> list[QcResult]:
    return [
        dosage.dosage_check(
            get_nuclide(args.nuclide),
            parse_activity_bq(args.measured, "--measured"),
            _time(args.at, "--at"),
            parse_activity_bq(args.prescribed, "--prescribed"),
            parse_time_ns(args.administration, "--administration"),
            limits["dosage"],
        )
    ]


def _site_limits(path: str | None, profile: str | None) -> dict[str, Limit]:
    """The limits of `profile` (else the config's `[qc] profile`, else the default) with the config's [qc.limits].

    Only `[qc] profile` and [qc.limits] are read (and checked): the rest of the file is the service's.
    """
    qc = None if path is None else read_config_file(path).table("qc")
    if qc is None:
        return load_limits(profile=profile or DEFAULT_PROFILE)
    configured = qc.string("profile", DEFAULT_PROFILE, choices=PROFILES)
    return load_limits(qc.table("limits"), profile=profile or configured)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f} %"


def _shown(value: float, unit: str) -> str:
    return format_activity(value) if unit == "Bq" else f"{value:.6g} {unit}"


def _print_limit_reached(result: QcResult, console: Console) -> None:
    """For a ratio that grows with time, the time it reaches the limit: the product's expiry by this test."""
    reached = result.limit_reached_ns
    when = "never (none of the impurity measured)" if reached is None else iso_utc(reached)
    console.print(f"[bold]{result.test}: limit {result.limit.fail:g} {result.unit} reached {when}[/]", highlight=False)


def _print_table(results: Sequence[QcResult], console: Console) -> None:
    for result in results:
        if "limit_reached_at" in result.inputs:
            _print_limit_reached(result, console)
    table = Table(title="hotlab QC")
    for column in ("test", "verdict", "measured", "expected", "deviation"):
        table.add_column(column, no_wrap=True)
    table.add_column("limit")
    for result in results:
        table.add_row(
            result.test,
            f"[{_VERDICT_STYLE[result.verdict]}]{result.verdict.upper()}[/]",
            _shown(result.measured, result.unit),
            "–" if result.expected is None else _shown(result.expected, result.unit),
            _pct(result.deviation_pct),
            result.limit.text,
        )
    console.print(table)
    for result in results:
        console.print(f"[bold]{result.test}[/]: {result.detail}")
        console.print(f"  limit source: {result.limit.source}", highlight=False)
        if result.test == "linearity":
            _print_decay_points(result, console)


def _print_decay_points(result: QcResult, console: Console) -> None:
    """Every point of a decay series, its normalisation and the fitted half-life.

    The verdict names only the worst point; the officer needs to see where along the series the
    deviations grow (top: saturation or over-response; all points one way: the low end is off).
    """
    inputs = result.inputs
    table = Table(title=f"linearity points (limit {result.limit.text})")
    for column in ("#", "time (UTC)", "reading", "expected", "deviation", "verdict", "note"):
        table.add_column(column)
    for point in inputs["points"]:
        verdict = result.limit.judge(point["deviation_pct"])
        notes = [
            note
            for note, present in (("norm.", point["normalisation"]), ("worst", point["index"] == inputs["worst_point"]))
            if present
        ]
        table.add_row(
            str(point["index"]),
            point["time"][:16],
            format_activity(point["activity_bq"]),
            format_activity(point["expected_bq"]),
            f"{point['deviation_pct']:+.2f} %",
            f"[{_VERDICT_STYLE[verdict]}]{verdict}[/]",
            " ".join(notes),
        )
    console.print(table)
    norm = inputs["normalisation"]
    spread = "" if norm["standard_error_pct"] is None else f", standard error {norm['standard_error_pct']:.2f} %"
    console.print(
        f"  normalisation: point(s) {', '.join(str(i) for i in norm['points'])} decay-corrected to {norm['time']}"
        f" and averaged: {format_activity(norm['activity_bq'])}{spread}",
        highlight=False,
    )
    linear = inputs["linear_range_bq"]
    console.print(
        "  within the limit from the lowest reading up to: "
        + ("none (the lowest reading fails)" if linear is None else format_activity(linear[1])),
        highlight=False,
    )
    fit = inputs["half_life_fit"]
    if fit["half_life_s"] is None:  # the series does not decay: nothing to compare, the verdict stands
        console.print(f"  fitted half-life (diagnostic, not judged): none: {fit['note']}", highlight=False)
        return
    sigmas = "" if fit["difference_in_sigma"] is None else f" = {fit['difference_in_sigma']:+.1f} combined sigma"
    console.print(
        f"  fitted half-life (diagnostic, not judged): {fit['half_life_s'] / 3600:.4f} h "
        f"± {fit['fit_sigma_s'] / 3600:.4f} h (fit, k=1) vs library {inputs['half_life_s'] / 3600:.4f} h "
        f"({fit['difference_pct']:+.3f} %{sigmas}); over {fit['span_half_lives']:.1f} half-lives that is "
        f"{fit['end_to_end_deviation_pct']:+.2f} % first reading vs last",
        highlight=False,
    )


def _run(rule: Rule) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        results = rule(args, _site_limits(args.config, args.profile))
        if args.json:
            payloads = [r.to_message(args.site, args.station, args.device).payload for r in results]
            print(json.dumps(payloads, indent=2, allow_nan=False))
        else:
            _print_table(results, Console())
        return 0

    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the qc_result payload(s) as JSON")
    parser.add_argument("--config", help="lab TOML file whose [qc] profile and [qc.limits] overrides set the limits")
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help=f"jurisdiction whose limits apply (default: the config's [qc] profile, else {DEFAULT_PROFILE})",
    )
    parser.add_argument("--at", help="measurement time, ISO 8601 with offset (default: now)")
    parser.add_argument("--site", default="manual", help="site name in the JSON payload")
    parser.add_argument("--station", default="manual", help="station name in the JSON payload")
    parser.add_argument("--device", default="manual", help="device (calibrator or generator) in the JSON payload")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "qc", help="judge a manually entered QC measurement", description=__doc__.split("\n\n")[0]
    )
    tests = parser.add_subparsers(dest="qc_test", metavar="TEST", required=True)
    register_status(tests)

    def add(name: str, rule: Rule, help_text: str) -> argparse.ArgumentParser:
        sub = tests.add_parser(name, help=help_text, description=help_text)
        _common(sub)
        sub.set_defaults(func=_run(rule))
        return sub

    for name, rule, text in (
        ("constancy", _constancy, "daily constancy with a long-lived check source"),
        ("accuracy", _accuracy, "accuracy with a certified reference source"),
    ):
        sub = add(name, rule, text)
        sub.add_argument("--nuclide", required=True, help="source nuclide, e.g. Cs-137, Co-57, Ba-133")
        sub.add_argument("--reference", required=True, help="certified activity, e.g. 7.4MBq or 200uCi")
        sub.add_argument("--reference-date", required=True, help="certificate reference time (ISO 8601)")
        sub.add_argument("--measured", required=True, nargs="+", help="reading(s), e.g. 5.8MBq (several are averaged)")
        sub.add_argument("--source-id", default="manual", help="source identifier for the record")

    sub = add(
        "linearity",
        _linearity,
        "linearity by the decay method: each reading vs the known half-life, normalised at the low-activity end",
    )
    sub.add_argument("--nuclide", required=True, help="decaying source, e.g. Tc-99m or F-18")
    sub.add_argument(
        "--reading",
        required=True,
        action="append",
        metavar="TIME=ACTIVITY",
        help="one point of the series (at least 3), from the highest activity used clinically down to the "
        "lowest, e.g. 2026-03-02T08:00:00Z=30GBq",
    )
    sub.add_argument(
        "--normalise-points",
        type=int,
        default=calibrator_rules.DECAY_NORMALISATION_POINTS,
        metavar="N",
        help="how many of the last (lowest-activity) readings set the expectation "
        f"(default {calibrator_rules.DECAY_NORMALISATION_POINTS})",
    )

    sub = add("elution", _elution, "generator elution yield against the Bateman-available daughter")
    sub.add_argument("--parent", required=True, help="generator parent, e.g. Ge-68 or Mo-99")
    sub.add_argument("--daughter", help="eluted daughter (default: the parent's daughter in the library)")
    sub.add_argument("--generator", default="manual", help="generator identifier for the record")
    sub.add_argument("--calibration", required=True, help="parent activity on the generator certificate")
    sub.add_argument("--calibration-date", required=True, help="certificate reference time (ISO 8601)")
    sub.add_argument("--eluted", required=True, help="eluate activity at end of elution (--at)")
    sub.add_argument("--last-elution", help="previous elution time (default: column in equilibrium)")
    sub.add_argument("--residual", help="daughter activity left on the column by the previous elution")

    sub = add("breakthrough", _breakthrough, "Ge-68 breakthrough from a re-measurement >= 48 h after elution")
    sub.add_argument("--eluate", required=True, help="Ga-68 activity of the eluate at end of elution")
    sub.add_argument("--end-of-elution", required=True, help="end of elution (ISO 8601)")
    sub.add_argument("--remeasured", required=True, help="Ga-68 reading of the aliquot at --at")
    sub.add_argument("--aliquot-fraction", type=float, default=1.0, help="aliquot / eluate volume (default 1)")
    sub.add_argument(
        "--background",
        required=True,
        nargs="+",
        help="background reading(s) taken with the re-measurement (empty container), e.g. 2Bq 3Bq 2.5Bq; "
        "their spread sets the detectable level",
    )
    sub.add_argument("--min-detectable", help="configured minimum detectable net activity (needed with one background)")

    sub = add(
        "mo99",
        _mo99,
        "Mo-99 breakthrough (kBq Mo-99 per MBq Tc-99m): when the eluate reaches the limit, and the verdict",
    )
    sub.add_argument("--mo99", required=True, help="Mo-99 activity of the eluate, e.g. 1.85MBq")
    sub.add_argument("--tc99m", required=True, help="Tc-99m activity of the eluate, e.g. 37GBq")
    sub.add_argument("--administration", help="administration time (default: judged at the assay time, --at)")

    sub = add("lu177m", _lu177m, "Lu-177m / Lu-177 in carrier-added Lu-177, in percent, and when it reaches the limit")
    sub.add_argument("--lu177m", required=True, help="Lu-177m activity, e.g. 20kBq")
    sub.add_argument("--lu177", required=True, help="Lu-177 activity, e.g. 7.4GBq")
    sub.add_argument("--use", help="labelling or administration time (default: judged at the assay time, --at)")

    sub = add("sr82", _strontium, "Sr-82 and Sr-85 breakthrough of a Rb-82 generator (kBq per MBq Rb-82)")
    sub.add_argument("--rb82", required=True, help="Rb-82 activity of the eluate at end of elution")
    sub.add_argument("--end-of-elution", required=True, help="end of elution (ISO 8601)")
    sub.add_argument("--sr82", required=True, help="Sr-82 activity of the eluate, determined at --at")
    sub.add_argument("--sr85", required=True, help="Sr-85 activity of the eluate, determined at --at")

    sub = add("ga68-half-life", _ga68_half_life, "Ga-68 radionuclidic identity from two readings' half-life")
    sub.add_argument("--first", required=True, metavar="TIME=ACTIVITY", help="first reading")
    sub.add_argument("--second", required=True, metavar="TIME=ACTIVITY", help="second reading, later")

    sub = add("geometry", _geometry, "geometry / volume dependence against the reference container")
    sub.add_argument("--nuclide", required=True, help="nuclide of the source, e.g. Tc-99m")
    sub.add_argument(
        "--reference", required=True, metavar="LABEL@TIME=ACTIVITY", help="reading in the reference geometry"
    )
    sub.add_argument(
        "--reading",
        required=True,
        action="append",
        metavar="LABEL@TIME=ACTIVITY",
        help="the same activity in another geometry, e.g. syringe-3mL@2026-03-02T08:05:00Z=365MBq",
    )

    sub = add("sleeve", _sleeve, "linearity by shielded sleeves, with factors set up from a decay series")
    sub.add_argument("--nuclide", required=True, help="nuclide of the source, e.g. Tc-99m")
    sub.add_argument("--factor", required=True, action="append", metavar="LABEL=FACTOR", help="a sleeve's factor")
    sub.add_argument("--unshielded", required=True, metavar="TIME=ACTIVITY", help="the unshielded reading")
    sub.add_argument("--sleeve", required=True, action="append", metavar="LABEL@TIME=ACTIVITY", help="a sleeve reading")
    sub.add_argument(
        "--normalise-points",
        type=int,
        default=calibrator_rules.SLEEVE_NORMALISATION_POINTS,
        metavar="N",
        help="how many of the lowest chamber readings set the reference "
        f"(default {calibrator_rules.SLEEVE_NORMALISATION_POINTS})",
    )

    sub = add("dosage", _dosage, "patient dose at administration vs the prescribed activity")
    sub.add_argument("--nuclide", required=True, help="nuclide of the dose, e.g. F-18")
    sub.add_argument("--measured", required=True, help="measured activity at --at")
    sub.add_argument("--prescribed", required=True, help="prescribed activity at administration")
    sub.add_argument("--administration", required=True, help="administration time (ISO 8601)")
