"""HIP-3 fills over REST are dex-scoped (docs/protocol.md §4): without `dex` the exchange answers for the first
perp dex only. Gap recovery and the fill audit of a precise address read every dex the address uses, so a
builder-dex fill missed by the stream comes out once. Driven end to end against the simulator, which scopes
its REST fills the same way.
"""

from __future__ import annotations

from hl_monitor.domain.address import WatchedAddress
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.sim.server import SimConfig
from tests.support.ledger import expected_orders, observed_orders
from tests.support.metrics import metric_value
from tests.support.precise_harness import GatedBudgets, harness
from tests.support.waiting import wait_until

W1 = "0x" + "1" * 40
HIP3_COIN = "xyz:XYZ100"
# The exchange's perp dexes as the symbol map lists them: the first one and the simulator's builder dex.
SYMBOLS = SymbolMap({}, {}, dexes=("", "xyz"))


async def test_a_hip3_order_filled_while_the_stream_is_down_comes_out_once() -> None:
    # A 2-fill snapshot holds only the later BTC fills: the HIP-3 fills can come back only over REST.
    sim_config = SimConfig(clearinghouse_push_interval=0.2, fills_snapshot_size=2)
    async with harness(
        WatchedAddress(address=W1, tier="precise"), sim_config=sim_config, budgets_class=GatedBudgets, symbols=SYMBOLS
    ) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        first = await whale.market_order("ETH", True, "1", "2400")  # a watermark for the gap to start from
        await wait_until(lambda: len(h.signals) == 1)

        await h.cut(W1)
        hip3 = await whale.market_order(HIP3_COIN, True, "0.5", "25000", fills=2, px_step="1")
        later = await whale.market_order("BTC", True, "0.2", "80000", fills=2)
        h.reconnect()

        await wait_until(lambda: any(s.oid == hip3 for s in h.signals), what="the HIP-3 order's signal")
        marker = await h.quiet_point(W1, recoveries=2)  # the first at subscribe, the second after the cut
        assert [s.oid for s in h.signals].count(hip3) == 1
        assert {s.oid for s in h.signals} == {first, hip3, later, marker}
        assert len(h.signals) == 4
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
        (signal,) = [s for s in h.signals if s.oid == hip3]
        assert (signal.coin, signal.fill_count, signal.backfilled) == (HIP3_COIN, 2, True)
        assert metric_value(h.metrics, "rest_dex_fill_reads_total", dex="xyz", via="recovery") == 1
        assert metric_value(h.metrics, "rest_dex_fills_total", dex="xyz", via="recovery") == 2
        assert metric_value(h.metrics, "rest_dex_fill_reads_total", dex="first", via="recovery") == 1


async def test_the_fill_audit_finds_a_hip3_fill_the_subscription_lost() -> None:
    """Only userFills goes quiet; the audit reads the builder dex too, recovers the order once and rebuilds."""
    async with harness(WatchedAddress(address=W1, tier="precise"), fill_audit_interval=1.0, symbols=SYMBOLS) as h:
        await h.live(W1)
        whale = h.sim.exchange.whale(W1)
        stream = h.manager.stream(W1)
        assert stream is not None
        await whale.market_order("ETH", True, "1", "2400")
        await wait_until(lambda: len(h.signals) == 1)

        h.sim.faults.stall("userFills", user=W1)
        missed = await whale.market_order(HIP3_COIN, False, "0.3", "25000", fills=3, px_step="1")
        await wait_until(
            lambda: len(h.signals) == 2, within=20, what="the HIP-3 order the audit recovered"
        )  # after the audit lag (5 s) and one interval
        assert (h.signals[1].oid, h.signals[1].backfilled) == (missed, True)
        await wait_until(lambda: stream.fills_missed == 3)
        assert metric_value(h.metrics, "rest_dex_fills_total", dex="xyz", via="audit") >= 3
        await wait_until(lambda: metric_value(h.metrics, "reconnects_total", kind="user", reason="fills_missed") == 1)

        await wait_until(lambda: stream.recoveries >= 2)
        marker = await h.quiet_point(W1, recoveries=2)
        assert [s.oid for s in h.signals[2:]] == [marker]
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)


async def test_a_dex_the_address_does_not_use_is_not_read() -> None:
    """Every dex read costs at least 20 weight: an address with nothing on the builder dex costs one read a gap."""
    async with harness(WatchedAddress(address=W1, tier="precise"), budgets_class=GatedBudgets, symbols=SYMBOLS) as h:
        whale = h.sim.exchange.whale(W1, dex_usdc=0)  # no collateral and no position on `xyz`
        await h.live(W1)
        await whale.market_order("ETH", True, "1", "2400")
        await wait_until(lambda: len(h.signals) == 1)
        stream = h.manager.stream(W1)
        assert stream is not None
        assert stream.fill_dexes() == {""}

        await h.cut(W1)
        await whale.market_order("ETH", False, "1", "2410")
        h.reconnect()
        await h.quiet_point(W1, recoveries=2)
        assert metric_value(h.metrics, "rest_dex_fill_reads_total", dex="first", via="recovery") == 1
        assert metric_value(h.metrics, "rest_dex_fill_reads_total", dex="xyz", via="recovery") == 0
        assert observed_orders(h.signals) == expected_orders(h.sim, W1)
