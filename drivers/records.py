"""The typed values a driver hands to the controller, and the errors it raises.

Every driver speaks a different wire protocol, but the controller, the QC engine and the
sinks only ever see these types: activity in becquerel (float), time as UTC epoch
nanoseconds, and the raw frame kept verbatim so a reading can be audited back to the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hotlab.errors import HotlabError
from hotlab.physics.utc_time import NS_PER_S


class DriverError(HotlabError):
    """Base of every error a driver raises; the supervisor catches this and keeps running."""


class FrameError(DriverError):
    """A frame arrived but could not be parsed (garbage, wrong length, bad number, bad unit)."""

    def __init__(self, message: str, frame: bytes = b"") -> None:
        super().__init__(f"{message}: {frame!r}" if frame else message)
        self.frame = frame


class ChecksumError(FrameError):
    """A frame's checksum did not match its payload."""


class DeviceTimeout(DriverError):
    """The device did not answer within the configured time."""


class DeviceDisconnected(DriverError):
    """The transport closed or could not be opened."""


class DeviceRefused(DriverError):
    """The device answered but refused the request (error reply, Modbus exception, wrong state)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One activity measurement as read from a device.

    `raw_value` and `unit` are what the device displayed; `activity_bq` is the same value
    converted to becquerel by the driver, so downstream code never converts units again.
    """

    device: str
    nuclide: str | None
    activity_bq: float
    raw_value: float
    unit: str
    timestamp_ns: int
    raw_frame: bytes = b""
    extra: dict[str, float | str] = field(default_factory=dict)
    #: "good", or "suspect" when the value is physically implausible (set by the controller's
    #: plausibility check, `quality_reason` says why). A suspect reading is kept and published,
    #: but never used by QC, measurements or dose records.
    quality: Literal["good", "suspect"] = "good"
    quality_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ElutionRecord:
    """One finished generator elution.

    A station counts elutions, but a count can start again (a restart that loses the counter, a
    service reset, a replaced station, a roll-over), so the counter alone does not identify an
    elution: (station, generator, station serial, counter epoch, counter, end time) does.
    A driver may hand the same elution over more than once until the controller confirms
    delivery (see hotlab.drivers.elution_station), so consumers key on that identity, not on
    arrival. `parent_bq` is the station's own measurement of parent activity in the eluate at
    end of elution (Ge-68 or Mo-99 breakthrough), None when the station does not measure it.
    """

    station: str
    generator_id: str
    parent_nuclide: str
    daughter_nuclide: str
    counter: int
    activity_bq: float
    volume_ml: float
    start_ns: int
    end_ns: int
    line_dose_rate_usv_h: float | None = None
    parent_bq: float | None = None
    #: The station's serial number and when its counter last started from 0 (input registers
    #: `serial` and `counter_epoch_ns`); None where the source does not say.
    station_serial: str | None = None
    counter_epoch_ns: int | None = None
    #: Why this elution's counter does not follow the last one delivered for the generator (old
    #: and new counter, epoch or serial), for an alarm; None when it does.
    counter_reset: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / NS_PER_S
