"""One result of `hotlab doctor`: a status, what was checked (and where), and what was found."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: ok: checked and fine; warn: could not be decided, or only some setups need it; FAIL: the lab would hit it.
Status = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    #: What was checked, and where: `clock`, `device vik-1 (/dev/ttyUSB0)`, `mqtt`.
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.subject}: {self.detail}"
