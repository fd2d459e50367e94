"""Checking an audit trail against every anchor the controller published of it.

Why every anchor and not only the newest: a trail cut back and then grown again by the
controller is an intact chain, and its newest anchor may describe it exactly; only an older
anchor, whose record was replaced, still shows the rewrite. So each anchor whose seq the trail
reaches must find its own hash there, and two anchors of one trail naming different hashes for
one seq prove on their own that the trail was rewritten between them.

Why the trail's path as well: an anchor names its trail by the hash of its first record
(`trail_id`, the same in every copy of the trail), so a trail that was deleted and started
again has a new identity that no earlier anchor names. The anchors of its path still do:
anchors of the same path with another trail_id mean the trail there was replaced.

Memory grows with the number of distinct anchors, not with the trail: `verify_chain`
(controller/audit.py) streams the trail once, and each record is looked up as it passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotlab.controller.audit import VerifyResult, first_record_hash, is_hash, short_hash, verify_chain
from hotlab.controller.messages import SCHEMA_VERSION, iso_utc

ANCHOR_SCHEMA = f"hotlab.audit_anchor/{SCHEMA_VERSION}"


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A head of the trail published by the controller: record `seq` existed, with `hash`, at `time_ns`.

    `source` says where it was read (the history archive, an MQTT topic), so a verdict can name it.
    """

    trail: str
    trail_id: str
    seq: int
    hash: str
    time_ns: int
    source: str
    #: The site whose controller published it: two labs may keep their trails at the same path.
    site: str | None = None

    @classmethod
    def from_payload(cls, payload: Any, source: str) -> AuditAnchor | None:
        """The anchor in an `audit_anchor` payload, or None if it is not a well-formed one (never trusted half-read)."""
        if not isinstance(payload, dict) or payload.get("schema") != ANCHOR_SCHEMA:
            return None
        trail, trail_id, digest = payload.get("trail"), payload.get("trail_id"), payload.get("hash")
        seq, time_ns = _natural(payload.get("seq")), _natural(payload.get("time_ns"))
        if not (isinstance(trail, str) and is_hash(trail_id) and is_hash(digest)):
            return None
        if seq is None or seq < 1 or time_ns is None:
            return None
        site = payload.get("site")
        return cls(trail, trail_id, seq, digest, time_ns, source, site if isinstance(site, str) else None)

    def describe(self) -> str:
        return f"#{self.seq} {short_hash(self.hash)} of {iso_utc(self.time_ns)} from {self.source}"


@dataclass(frozen=True, slots=True)
class AnchorClash:
    """Two anchors of one trail that name different records for the same seq."""

    first: AuditAnchor
    second: AuditAnchor


@dataclass(frozen=True, slots=True)
class AnchorMismatch:
    """An anchor whose seq the trail reaches with another record there (`found` is that record's hash)."""

    anchor: AuditAnchor
    found: str


@dataclass(frozen=True, slots=True)
class Replacement:
    """Anchors of the trail's path that name another trail: the newest such anchor, and how many other
    earlier trails the path has had."""

    newest: AuditAnchor
    other_trails: int


@dataclass(frozen=True, slots=True)
class AnchoredResult:
    """The chain's verdict and the anchors' verdict on one trail; `summary` names the worst problem."""

    chain: VerifyResult
    trail_id: str | None
    #: The anchor of this trail with the highest seq: the one a truncation is measured against.
    newest: AuditAnchor | None
    #: Distinct anchors of this trail whose seq the intact chain reached.
    checked: int
    clash: AnchorClash | None
    mismatch: AnchorMismatch | None
    replaced: Replacement | None

    @property
    def missing(self) -> int:
        """Records the newest anchor proves existed and the intact trail does not hold: its end was cut off."""
        if self.newest is None or self.chain.broken is not None:
            return 0
        return max(0, self.newest.seq - self.chain.records)

    @property
    def rewritten(self) -> bool:
        return self.clash is not None or self.mismatch is not None

    @property
    def ok(self) -> bool:
        return self.chain.ok and self.replaced is None and not self.rewritten and self.missing == 0

    def summary(self) -> str:
        path = self.chain.path
        if self.chain.broken is not None:
            return self.chain.summary()
        if self.replaced is not None:
            return self._replaced_text(self.replaced)
        if self.clash is not None:
            first, second = self.clash.first, self.clash.second
            return (
                f"audit trail {path} is BROKEN: two anchors of record #{first.seq} name different records, "
                f"{short_hash(first.hash)} from {first.source} and {short_hash(second.hash)} from {second.source}: "
                "the trail was rewritten after that record was anchored"
            )
        if self.mismatch is not None:
            anchor = self.mismatch.anchor
            return (
                f"audit trail {path} is BROKEN: record #{anchor.seq} has hash {short_hash(self.mismatch.found)}, "
                f"but the anchor from {anchor.source} says {short_hash(anchor.hash)}: the trail was rewritten"
            )
        if self.newest is None:
            return self.chain.summary()
        if self.missing:
            return (
                f"audit trail {path} is TRUNCATED: {self.missing} record(s) missing at its end; it holds "
                f"{self.chain.records} record(s), but the anchor from {self.newest.source} shows record "
                f"#{self.newest.seq} existed"
            )
        details = [f"{self.checked} anchors checked, all match"] if self.checked > 1 else []
        newer = self.chain.records - self.newest.seq
        if newer:
            details.append(f"{newer} later record(s) not covered by an anchor yet")
        text = f"{self.chain.summary()}; record #{self.newest.seq} matches the anchor"
        return text + (f" ({'; '.join(details)})" if details else "")

    def _replaced_text(self, replaced: Replacement) -> str:
        old = replaced.newest
        now = f"begins with record {short_hash(self.trail_id)}" if self.trail_id is not None else "is empty"
        text = (
            f"audit trail at {old.trail} was REPLACED: anchors name trail_id {short_hash(old.trail_id)} up to "
            f"#{old.seq} (newest from {old.source}), but the trail there now {now}: the earlier trail was "
            "deleted or moved and a new one started"
        )
        return text + (f"; {replaced.other_trails} other earlier trail(s) there too" if replaced.other_trails else "")


class AnchorCheck:
    """The anchors of one trail, looked up record by record while `verify_chain` streams the trail past.

    `trail_id` is the hash of the trail's first record (None for a trail without one: then every
    anchor given is its own, found by its path). The caller gives the anchors that name either that
    id or the trail's path; those of the path with another id are the replaced trail's.
    """

    def __init__(self, anchors: Iterable[AuditAnchor], trail_id: str | None) -> None:
        self.trail_id = trail_id
        own: dict[tuple[str, int], AuditAnchor] = {}
        foreign: dict[str, AuditAnchor] = {}
        self.newest: AuditAnchor | None = None
        self.clash: AnchorClash | None = None
        for anchor in sorted(anchors, key=lambda a: (a.seq, a.time_ns)):
            if trail_id is not None and anchor.trail_id != trail_id:
                foreign[anchor.trail_id] = anchor  # in order of seq: the newest of that trail stays
                continue
            self.newest = anchor
            seen = own.setdefault((anchor.trail_id, anchor.seq), anchor)
            if seen.hash != anchor.hash and self.clash is None:
                self.clash = AnchorClash(seen, anchor)
        #: What the record at each seq must be; only looked up when the trail has records, i.e. one trail_id.
        self._expected = {seq: anchor for (_, seq), anchor in own.items()}
        replaced = max(foreign.values(), key=lambda a: a.time_ns, default=None)
        self.replaced = None if replaced is None else Replacement(replaced, len(foreign) - 1)
        self.checked = 0
        self.mismatch: AnchorMismatch | None = None

    def passing(self, seq: int, record_hash: str) -> None:
        """The intact chain holds `record_hash` at `seq` (verify_chain's `on_record`)."""
        anchor = self._expected.get(seq)
        if anchor is None:
            return
        self.checked += 1
        if anchor.hash != record_hash and self.mismatch is None:
            self.mismatch = AnchorMismatch(anchor, record_hash)

    def result(self, chain: VerifyResult) -> AnchoredResult:
        return AnchoredResult(chain, self.trail_id, self.newest, self.checked, self.clash, self.mismatch, self.replaced)


def verify_anchored(path: str | Path, key: bytes | None, anchors: Sequence[AuditAnchor]) -> AnchoredResult:
    """Verify the chain of the trail at `path` and check it against `anchors` in the same single pass."""
    check = AnchorCheck(anchors, first_record_hash(path))
    return check.result(verify_chain(path, key, check.passing))


def _natural(value: Any) -> int | None:
    """`value` if it is a non-negative integer (a bool is not one), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
