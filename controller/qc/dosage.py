"""Dosage check: is the measured patient dose, carried to the administration time, the prescribed one?

10 CFR 35.63(d) forbids using a dosage that differs from the prescribed dosage by more than
20 % unless the authorized user directs otherwise; the limit is configurable per site. The
dose is measured before it is given, so the measured activity is decay-corrected forward
from the measurement time to the planned administration time before it is compared.
"""

from __future__ import annotations

from hotlab.controller.messages import iso_utc
from hotlab.controller.qc.limits import Limit
from hotlab.controller.qc.result import QcResult, judged, require_not_before, require_positive
from hotlab.physics.decay import activity_at
from hotlab.physics.nuclides import Nuclide


def dosage_check(
    nuclide: Nuclide,
    measured_bq: float,
    measured_ns: int,
    prescribed_bq: float,
    administration_ns: int,
    limit: Limit,
) -> QcResult:
    """Judge the dose at administration against the prescription (deviation in % of the prescription)."""
    measured = require_positive("measured dose activity", measured_bq)
    prescribed = require_positive("prescribed activity", prescribed_bq)
    require_not_before("administration time", administration_ns, "dose measurement time", measured_ns)
    dt_s = (administration_ns - measured_ns) / 1e9
    at_administration = float(activity_at(measured, nuclide, dt_s))
    inputs = {
        "nuclide": nuclide.name,
        "half_life_s": nuclide.half_life_s,
        "half_life_source": nuclide.source,
        "measured_bq": measured,
        "measured_time": iso_utc(measured_ns),
        "administration_time": iso_utc(administration_ns),
        "administration_ns": int(administration_ns),
        "elapsed_s": dt_s,
        "activity_at_administration_bq": at_administration,
        "prescribed_bq": prescribed,
    }
    return judged(
        "dosage",
        limit,
        measured=at_administration,
        expected=prescribed,
        unit="Bq",
        time_ns=administration_ns,
        inputs=inputs,
        detail=f"{nuclide.name} dose decay-corrected {dt_s / 60:.1f} min to administration vs the prescription",
    )
