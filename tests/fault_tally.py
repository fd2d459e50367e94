"""What the fault suite counted, printed as one table when the test run ends.

Why: each fault test asserts its own case (zero loss, nothing corrupt taken as valid, nothing run
twice), but a reviewer wants the totals in one place: readings produced against what each sink
received, suspect readings flagged, elutions executed against archived, commands replayed against
refused, audit truncations detected. A test adds its counts with `tally(row, column=count, ...)`;
tests/conftest.py prints the table in pytest's summary, and README.md quotes the latest one.
"""

from __future__ import annotations

from collections import Counter, defaultdict

#: row -> column -> count, over the whole run.
_COUNTS: defaultdict[str, Counter[str]] = defaultdict(Counter)


def tally(row: str, **counts: int) -> None:
    """Add `counts` (column name -> number) to `row` of the fault-suite table."""
    _COUNTS[row].update(counts)


def counts() -> dict[str, dict[str, int]]:
    """Everything counted so far, as plain data (a parallel worker sends it to the main process)."""
    return {row: dict(columns) for row, columns in _COUNTS.items()}


def table() -> list[str]:
    """The table as Markdown lines, one row per fault kind in the order first counted; empty if nothing was."""
    if not _COUNTS:
        return []
    lines = ["| what | counted |", "| --- | --- |"]
    for row, counts in _COUNTS.items():
        cells = ", ".join(f"{column.replace('_', ' ')} {count:,}" for column, count in counts.items())
        lines.append(f"| {row} | {cells} |")
    return lines
