"""Rendezvous placement: which live member holds each precise candidate (see docs/architecture.md §5).

The precise candidates of the address book (tier precise or auto), highest rank first, each go to the live
member with capacity whose rendezvous score `hash(member, address)` is highest among those with quota left.
Quotas are proportional to precise slots and rounded up (bounded-load rendezvous), so N addresses spread
evenly and a member's departure moves only what it held plus a few for balance. Every instance computes the
same placement from the same book and membership; when they briefly disagree (reload skew), the leases
arbitrate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import msgspec

from hl_monitor.domain.address import WatchedAddress, rank

__all__ = ["LeaseValue", "Member", "place", "rendezvous_score"]


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """One instance as it registers in the membership bucket."""

    id: str
    incarnation: str  # random per process start: a restarted instance never mistakes old leases for its own
    precise_slots: int
    tape_role: str = "active"
    server_id: int | None = None
    started_ms: int = 0
    http: str = ""


class LeaseValue(msgspec.Struct, frozen=True, kw_only=True):
    """The value of a lease key. Expiry is NATS's (bucket TTL); `renewed_ms` is informational."""

    member: str
    incarnation: str
    renewed_ms: int


def rendezvous_score(member_id: str, address: str) -> int:
    """Highest-random-weight score: stable across processes and Python versions (no `hash()` salt)."""
    digest = hashlib.blake2b(f"{member_id}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(candidates: Iterable[WatchedAddress], members: Iterable[Member]) -> dict[str, str]:
    """Address → member id for every candidate the live members can hold precisely (the rest: unplaced).

    Bounded-load rendezvous: member m may take ⌈N·slots(m)/Σslots⌉ addresses (at most its slots); each
    address, in rank order, goes to the highest-scoring member with quota left that its `server_id` pin
    allows. Deterministic for the same inputs, whatever their order.
    """
    eligible = sorted((m for m in members if m.precise_slots > 0), key=lambda m: m.id)
    ordered = sorted((e for e in candidates if e.tier != "wide"), key=rank)
    total = sum(m.precise_slots for m in eligible)
    if not eligible or not ordered:
        return {}
    n = len(ordered)
    left = {m.id: min(m.precise_slots, math.ceil(n * m.precise_slots / total)) for m in eligible}
    out: dict[str, str] = {}
    for entry in ordered:
        best: Member | None = None
        best_score = -1
        for m in eligible:
            if left[m.id] <= 0 or (entry.server_id is not None and m.server_id != entry.server_id):
                continue
            score = rendezvous_score(m.id, entry.address)
            if score > best_score:
                best, best_score = m, score
        if best is not None:
            out[entry.address] = best.id
            left[best.id] -= 1
    return out
