"""The simulator's `population` scenario: its tape, fed to discovery, gives every scripted role its label."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.sim.exchange import (
    ExchangeListener,
    WireFill,
    WireLiquidationEvent,
    WireOrderUpdate,
    WireTrade,
    WireTwapHistoryEntry,
)
from hl_monitor.sim.scenarios import population_roles, run_scenario, scenario_whales
from hl_monitor.sim.server import SimServer
from hl_monitor.tracking.discovery import Discovery

HOUR_MS = 3_600_000


class TapeTee:
    """Passes every change on to the server and keeps the tape."""

    def __init__(self, inner: ExchangeListener | None) -> None:
        self.inner = inner
        self.trades: list[WsTrade] = []

    def on_fills(self, user: str, fills: Sequence[WireFill]) -> None:
        if self.inner is not None:
            self.inner.on_fills(user, fills)

    def on_order_updates(self, user: str, updates: Sequence[WireOrderUpdate]) -> None:
        if self.inner is not None:
            self.inner.on_order_updates(user, updates)

    def on_trades(self, coin: str, trades: Sequence[WireTrade]) -> None:
        self.trades += [msgspec.json.decode(msgspec.json.encode(t), type=WsTrade) for t in trades]
        if self.inner is not None:
            self.inner.on_trades(coin, trades)

    def on_liquidation(self, user: str, event: WireLiquidationEvent) -> None:
        if self.inner is not None:
            self.inner.on_liquidation(user, event)

    def on_twap_history(self, user: str, entries: Sequence[WireTwapHistoryEntry]) -> None:
        if self.inner is not None:
            self.inner.on_twap_history(user, entries)


async def test_every_role_of_the_population_is_classified_as_such() -> None:
    async with SimServer() as sim:
        tee = TapeTee(sim.exchange.listener)
        sim.exchange.listener = tee
        addresses = await run_scenario(sim, "population", 5, step_delay=0, cycles=2)
        assert addresses == scenario_whales("population", 5)
        for address in addresses[:3]:  # the makers quoted both sides and end flat
            assert sim.exchange.accounts[address].positions == {}
    discovery = Discovery([HOUR_MS], 1_000)
    newest = max(t.time for t in tee.trades)
    discovery.on_trades(tee.trades, newest)
    labels = {c.address: c.label for c in discovery.candidates(HOUR_MS)}
    roles = population_roles(addresses)
    assert {a: labels.get(a) for a in addresses} == roles
    assert set(roles.values()) == {"market_maker", "directional", "wash_suspect", "engine"}
