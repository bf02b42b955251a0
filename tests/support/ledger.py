"""Signals against the simulator's ledger (ground truth per order)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from hl_monitor.domain.signal import Signal
from hl_monitor.sim.server import SimServer


def expected_orders(sim: SimServer, address: str) -> dict[tuple[int, str], tuple[Decimal, Decimal, int]]:
    """Ground truth: (oid, dir) → (size, VWAP, fill count) for every order that filled something."""
    out = {}
    for order in sim.exchange.ledger.for_user(address):
        for total in order.totals.values():
            if total.fills:
                out[(order.oid, total.dir)] = (total.size, total.vwap, total.fills)
    return out


def observed_orders(signals: Sequence[Signal]) -> dict[tuple[int, str], tuple[Decimal, Decimal, int]]:
    out = {}
    for s in signals:
        assert s.oid is not None
        key = (s.oid, s.dir)
        assert key not in out, f"duplicate signal for {key}"
        out[key] = (s.size, s.price, s.fill_count)
    return out
