"""Where a lab's records are when nobody says: the folders `hotlab run` and `hotlab demo` write.

Why: a QC officer who ran the demo and then types `hotlab report` or `hotlab audit verify` must
get that demo's records, not an error about a file the demo never writes. Each command that
reads records takes an explicit path first; without one, it takes the lab whose records were
written last, among the known layouts, and says which one it took.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class LabRecords:
    """One lab's archive and audit trail, relative to the working directory."""

    what: str
    archive: Path
    audit: Path


#: The layouts hotlab writes by default, in order of preference when none has records yet.
KNOWN_LABS = (
    LabRecords(
        "the simulated lab of `hotlab run`",
        Path("var/simulated-lab/history.sqlite3"),
        Path("var/simulated-lab/state/audit.jsonl"),
    ),
    LabRecords("the demo (`hotlab demo`)", Path("var/demo/history.sqlite3"), Path("var/demo/audit.jsonl")),
    LabRecords(
        "a configured lab (the [history] and [service] defaults)", Path("var/history.sqlite3"), Path("var/audit.jsonl")
    ),
)


def latest_lab(record: str, command: str) -> LabRecords:
    """The known lab whose `record` ("archive" or "audit") was written last; the first if none exists.

    When more than one exists, one line on stderr says which was taken and how to choose another.
    """
    existing = [lab for lab in KNOWN_LABS if getattr(lab, record).is_file()]
    if not existing:
        return KNOWN_LABS[0]
    chosen = max(existing, key=lambda lab: getattr(lab, record).stat().st_mtime_ns)
    if len(existing) > 1:
        option = "--archive" if record == "archive" else "--path"
        print(
            f"hotlab {command}: reading {getattr(chosen, record)}, {chosen.what}, the newest of "
            f"{len(existing)} found here; {option} chooses another",
            file=sys.stderr,
        )
    return chosen
