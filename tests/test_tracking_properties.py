"""Property tests: any interleaving Hyperliquid can produce gives the same signals, each exactly once.

Hyperliquid keeps each channel in order but not the two channels relative to each other; it re-sends
frames, and after a reconnect the `userFills` snapshot repeats every fill so far (including fills whose
stream frames were lost with the old connection).
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from hl_monitor.domain.signal import Signal
from hl_monitor.hyperliquid.protocol import Fill, WsOrder
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.factories import ADDR, NOW, T0, engine, fill, frame, update

sizes = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("50"), places=2)
# Extra deliveries (duplicates, reconnects, ticks) per replay.
MAX_EXTRAS = 8
prices = st.decimals(min_value=Decimal("1"), max_value=Decimal("1000"), places=3)


class Script:
    """A whale session: orders on one coin (opens, partial closes, a flip), split into fills frames."""

    def __init__(self, orders: list[tuple[str, list[tuple[Decimal, Decimal]]]], cuts: list[int]) -> None:
        self.fills: list[Fill] = []
        self.statuses: list[WsOrder] = []
        position = Decimal(0)
        tid = 1000
        for index, (kind, parts) in enumerate(orders):
            oid = 500 + index
            total = Decimal(0)
            for sz, px in parts:
                tid += 7
                side = "A" if kind == "flip" else "B"
                if side == "B":
                    dir_ = "Open Long" if position >= 0 else "Close Short" if sz <= -position else "Short > Long"
                else:
                    dir_ = "Open Short" if position <= 0 else "Close Long" if sz <= position else "Long > Short"
                self.fills.append(
                    fill(oid, tid, str(sz), str(px), dir=dir_, start=str(position), side=side, time=T0 + tid)
                )
                position += sz if side == "B" else -sz
                total += sz
            self.statuses.append(update(oid, "filled", orig=str(total), t=T0 + tid))
        # Frames: consecutive runs of fills (exchange order), cut at the drawn positions.
        bounds = sorted({c % (len(self.fills) + 1) for c in cuts} | {0, len(self.fills)})
        self.frames = [self.fills[a:b] for a, b in pairwise(bounds) if b > a]


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    orders = draw(
        st.lists(
            st.tuples(st.sampled_from(["open", "flip"]), st.lists(st.tuples(sizes, prices), min_size=1, max_size=3)),
            min_size=1,
            max_size=4,
        )
    )
    cuts = draw(st.lists(st.integers(min_value=0, max_value=20), max_size=6))
    return Script(orders, cuts)


def key(signal: Signal) -> tuple[object, ...]:
    """Everything exchange-derived; detected_at, backfilled and lateness describe the delivery, not the trade."""
    return (
        signal.signal_id,
        signal.direction,
        signal.side,
        signal.size,
        signal.price,
        signal.fill_count,
        signal.timestamp,
        signal.last_fill_time,
        signal.position_before,
        signal.position_after,
        signal.close_rate,
        signal.full_close,
        signal.status,
        signal.trigger,
        signal.notional_usd,
    )


def canonical(script: Script) -> list[tuple[object, ...]]:
    eng = engine()
    out = eng.on_user_fills(ADDR, frame(*script.fills), NOW)
    out += eng.on_order_updates(ADDR, script.statuses, NOW)
    return sorted(key(s) for s in out)


def replay(
    eng: TrackingEngine, script: Script, data: st.DataObject, *, with_statuses: bool, ticks: bool = False
) -> list[Signal]:
    """Deliver the script in a drawn interleaving with duplicates, reconnect snapshots and (optionally) ticks."""
    out: list[Signal] = []
    now = NOW
    next_frame = 0
    next_status = 0
    statuses = script.statuses if with_statuses else []
    extras = 0  # duplicates, reconnects and ticks, capped so every example terminates quickly
    while next_frame < len(script.frames) or next_status < len(statuses):
        now += 1
        actions = [
            name
            for name, ok in (
                ("fills", next_frame < len(script.frames)),
                ("status", next_status < len(statuses)),
                ("dup_fills", next_frame > 0 and extras < MAX_EXTRAS),
                ("dup_status", next_status > 0 and extras < MAX_EXTRAS),
                ("reconnect", extras < MAX_EXTRAS),
                ("tick", ticks and extras < MAX_EXTRAS),
            )
            if ok
        ]
        action = data.draw(st.sampled_from(actions))
        extras += action not in ("fills", "status")
        if action == "fills":
            out += eng.on_user_fills(ADDR, frame(*script.frames[next_frame]), now)
            next_frame += 1
        elif action == "status":
            out += eng.on_order_updates(ADDR, [statuses[next_status]], now)
            next_status += 1
        elif action == "dup_fills":
            again = data.draw(st.integers(min_value=0, max_value=next_frame - 1))
            out += eng.on_user_fills(ADDR, frame(*script.frames[again]), now)
        elif action == "dup_status":
            out += eng.on_order_updates(ADDR, [statuses[data.draw(st.integers(0, next_status - 1))]], now)
        elif action == "reconnect":
            # Frames after the disconnect may be lost; the snapshot carries every fill up to the resume point.
            resume = data.draw(st.integers(min_value=next_frame, max_value=len(script.frames)))
            snapshot = [f for fr in script.frames[:resume] for f in fr]
            out += eng.on_user_fills(ADDR, frame(*snapshot, snapshot=True), now)
            next_frame = resume
        elif action == "tick":
            now += data.draw(st.integers(min_value=0, max_value=700_000))
            out += eng.tick(now)
    return out


@settings(max_examples=150, deadline=None)
@given(script=scripts(), data=st.data())
def test_any_interleaving_gives_the_same_signals(script: Script, data: st.DataObject) -> None:
    """Status before/between/after fills, duplicate frames and snapshot replays: identical signal set."""
    out = replay(engine(), script, data, with_statuses=True)
    assert sorted(key(s) for s in out) == canonical(script)


@settings(max_examples=150, deadline=None)
@given(script=scripts(), data=st.data())
def test_without_statuses_no_fill_is_lost_or_doubled(script: Script, data: st.DataObject) -> None:
    """Timeouts at random moments, continuations, replays: every fill counted once, every id unique."""
    eng = engine()
    out = replay(eng, script, data, with_statuses=False, ticks=True)
    out += eng.tick(NOW + 10**10)
    counts = Counter(s.signal_id for s in out)
    assert all(n == 1 for n in counts.values())
    per_oid: dict[int | None, Decimal] = {}
    for signal in out:
        per_oid[signal.oid] = per_oid.get(signal.oid, Decimal(0)) + signal.size
    expected: dict[int | None, Decimal] = {}
    for f in script.fills:
        expected[f.oid] = expected.get(f.oid, Decimal(0)) + f.sz
    assert per_oid == expected
    assert eng.stats.pending_orders == 0


@settings(max_examples=100, deadline=None)
@given(script=scripts())
def test_vwap_and_size_conserved_across_flip_splits(script: Script) -> None:
    """Per order, Σ signal size = Σ fill size and Σ notional = Σ sz·px, however the fills were split."""
    eng = engine()
    out = eng.on_user_fills(ADDR, frame(*script.fills), NOW)
    out += eng.on_order_updates(ADDR, script.statuses, NOW)
    for oid in {f.oid for f in script.fills}:
        fills = [f for f in script.fills if f.oid == oid]
        signals = [s for s in out if s.oid == oid]
        assert sum((s.size for s in signals), Decimal(0)) == sum((f.sz for f in fills), Decimal(0))
        assert sum((s.notional_usd for s in signals), Decimal(0)) == sum((f.sz * f.px for f in fills), Decimal(0))
        assert all(s.size > 0 for s in signals)
