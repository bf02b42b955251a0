"""Liquidation risk alerts with hysteresis (pure; no I/O, no clock of its own).

A position's `liquidation_distance` is `|mark − liquidation price| ÷ mark`. Alert levels (default 10 %, 5 %,
2 %) are armed when a position is first seen. When the distance falls below armed levels, `step` fires one
alert for the tightest level crossed and disarms every level crossed (so a jump from 20 % to 1 % is one
alert, and the 10 % level does not fire later on the way back up). A fired level is rearmed only when the
distance recovers to at least level × `REARM_FACTOR`, or when the position itself changes (size or side),
which starts a fresh `AlertState`: a mark wobbling around a level therefore alerts once.

`alert_id` = `{anchor}:liq:{level}:{n}`: `anchor` is the id of the change that gave the position its
current size (a position event id, or the id under which a state frame first showed it; see
`tracking.position_events`), `level` the level as written in the configuration (`0.05`) and `n` the
crossing number since that change (1, 2, …). The same inputs replayed from the same start give the same ids;
different crossings never share one.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Final

import msgspec

from hl_monitor.domain.signal import PositionSide

__all__ = [
    "DEFAULT_ALERT_LEVELS",
    "REARM_FACTOR",
    "AlertState",
    "RiskAlert",
    "alert_id",
    "liquidation_distance",
    "step",
]

# 10 %, 5 % and 2 % of the mark away from liquidation: early warning, close, and imminent.
DEFAULT_ALERT_LEVELS: Final = (Decimal("0.10"), Decimal("0.05"), Decimal("0.02"))
# A fired level rearms only 50 % further out than it fired, so a mark jittering around it stays quiet.
REARM_FACTOR: Final = Decimal("1.5")


class AlertState(msgspec.Struct, kw_only=True):
    """Alert memory of one position since the change named by `anchor`."""

    anchor: str
    fired: list[Decimal] = msgspec.field(default_factory=list)
    crossings: int = 0


class RiskAlert(msgspec.Struct, frozen=True, kw_only=True):
    """A position came closer to liquidation than `level` (a fraction of the mark price)."""

    alert_id: str
    address: str
    coin: str
    symbol: str
    dex: str
    side: PositionSide
    size: Decimal
    level: Decimal
    liquidation_distance: Decimal
    liquidation_px: Decimal
    mark_px: Decimal
    time: int  # local wall clock of the input that moved the distance, ms


def liquidation_distance(mark_px: Decimal | None, liquidation_px: Decimal | None) -> Decimal | None:
    """`|mark − liq| ÷ mark`; None without a liquidation price or a usable (positive) mark."""
    if mark_px is None or liquidation_px is None or mark_px <= 0:
        return None
    return abs(mark_px - liquidation_px) / mark_px


def alert_id(anchor: str, level: Decimal, crossing: int) -> str:
    return f"{anchor}:liq:{level}:{crossing}"


def step(state: AlertState, distance: Decimal | None, levels: Sequence[Decimal]) -> Decimal | None:
    """Advance `state` by one observed distance; return the level that fires now, if any."""
    if distance is None:
        return None
    state.fired = [level for level in state.fired if distance < level * REARM_FACTOR]
    crossed = [level for level in levels if distance < level]
    armed = [level for level in crossed if level not in state.fired]
    if not armed:
        return None
    state.fired.extend(armed)
    state.crossings += 1
    return min(armed)
