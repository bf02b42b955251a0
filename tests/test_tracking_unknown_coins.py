"""Signals of a coin the symbol map does not know are held for fresh metadata, never emitted mislabelled.

`@142` is UBTC/USDC: with metadata its symbol is `BTCUSDC`; without, the old rule leaves the raw `@142`.
"""

from __future__ import annotations

import pytest

from hl_monitor.domain.signal import Signal
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking import engine as engine_module
from hl_monitor.tracking.engine import TrackingEngine
from hl_monitor.tracking.state import EngineState
from tests.support.factories import ADDR, NOW, engine, fill, frame, update
from tests.support.symbols import build as build_symbols

HOLD = 60_000  # aggregation.unknown_coin_hold in ms (the default)


def holding_engine(symbols: SymbolMap | None = None) -> tuple[TrackingEngine, list[str]]:
    reported: list[str] = []
    eng = engine(symbols or SymbolMap.empty(), unknown_coin_hold=HOLD / 1000)
    eng.on_unknown_coin = reported.append
    return eng, reported


def buy_spot_btc(eng: TrackingEngine, oid: int = 7, at: int = NOW) -> list[Signal]:
    """One spot buy of @142, completed by its `filled` status (a signal is due at once)."""
    assert eng.on_user_fills(ADDR, frame(fill(oid, oid * 10, "0.5", "80000", dir="Buy", coin="@142")), at) == []
    return eng.on_order_updates(ADDR, [update(oid, "filled", orig="0.5", coin="@142")], at + 1)


def test_unknown_coin_is_reported_once_and_its_signal_waits_for_a_map_that_knows_it() -> None:
    eng, reported = holding_engine()
    assert buy_spot_btc(eng) == []  # due, but held: "@142" would be a mislabelled symbol
    assert reported == ["@142"]  # asked for a reload when the fill arrived, once
    assert buy_spot_btc(eng, oid=8) == []
    assert reported == ["@142"]
    assert eng.held_coins() == ["@142"]
    assert eng.stats.held_signals == 2
    assert eng.tick(NOW + 1000) == []  # still unknown, hold not over
    eng.set_symbols(build_symbols())
    released = eng.tick(NOW + 2000)
    assert [(s.oid, s.symbol, s.asset_type, s.coin) for s in released] == [
        (7, "BTCUSDC", "spot", "@142"),
        (8, "BTCUSDC", "spot", "@142"),
    ]
    assert released[0].detected_at == NOW + 1  # detected when due, not when released
    assert (eng.stats.held_released, eng.stats.held_expired, eng.stats.held_signals) == (2, 0, 0)
    assert eng.tick(NOW + 10 * HOLD) == []  # emitted exactly once


def test_a_signal_still_unknown_after_the_hold_is_emitted_with_the_rule_symbol_and_counted() -> None:
    eng, _ = holding_engine()
    assert buy_spot_btc(eng) == []
    eng.set_symbols(SymbolMap.empty())  # a reload that still does not list the coin
    assert eng.tick(NOW + 1 + HOLD - 1) == []
    (signal,) = eng.tick(NOW + 1 + HOLD)
    assert signal.symbol == "@142"  # what the old service sent
    assert (eng.stats.held_expired, eng.stats.held_released) == (1, 0)


def test_known_coins_are_never_held_and_nothing_is_held_without_a_reloader() -> None:
    eng, reported = holding_engine(build_symbols())
    (signal,) = buy_spot_btc(eng)
    assert (signal.symbol, reported) == ("BTCUSDC", [])
    plain = engine(SymbolMap.empty())  # no on_unknown_coin: no metadata will come, emit as before
    (raw,) = buy_spot_btc(plain)
    assert raw.symbol == "@142"


def test_a_held_record_stays_pending_in_the_persisted_state_until_it_is_emitted() -> None:
    """A restart while a signal is held must rebuild it: the record is handed out as pending, not flushed."""
    eng, _ = holding_engine()
    eng.take_dirty()
    assert buy_spot_btc(eng) == []
    delta = eng.take_dirty()
    assert [(r.oid, r.state) for r in delta.upserted] == [(7, "pending")]
    assert delta.closed == []
    exported = eng.export_state()
    assert [(r.oid, r.state) for r in exported.aggregations] == [(7, "pending")]

    restarted, _ = holding_engine(build_symbols())  # after a restart the map is loaded
    restarted.import_state(EngineState(aggregations=exported.aggregations, watermarks=exported.watermarks))
    (rebuilt,) = restarted.tick(NOW + 10 * HOLD)
    assert (rebuilt.signal_id, rebuilt.symbol) == (f"{ADDR}:7:B", "BTCUSDC")

    eng.set_symbols(build_symbols())
    (signal,) = eng.tick(NOW + 2)
    assert signal.signal_id == rebuilt.signal_id  # the same id: the stream dedupes a double emission
    delta = eng.take_dirty()
    assert [(r.oid, r.state) for r in delta.closed] == [(7, "flushed")]
    assert delta.upserted == []


def test_held_signals_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_HELD_SIGNALS", 2)
    eng, _ = holding_engine()
    assert buy_spot_btc(eng, oid=1) == []
    assert buy_spot_btc(eng, oid=2) == []
    (evicted,) = buy_spot_btc(eng, oid=3)  # the oldest goes out as it would after the hold
    assert (evicted.oid, evicted.symbol) == (1, "@142")
    assert eng.stats.evictions_by_kind == {"held_signals": 1}
    assert eng.stats.held_signals == 2
