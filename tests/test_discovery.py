"""Discovery's pure part: each population gets its label, memory stays fixed, windows expire on the clock."""

from __future__ import annotations

from hl_monitor.tracking.discovery import SLICES, ZERO_ADDRESS, Discovery, HeavyHitters
from tests.support.discovery_population import (
    DAY_MS,
    EXCLUDED,
    HOUR_MS,
    LIQUIDATED,
    MM,
    SELF_WASHER,
    WASH_A,
    WASH_B,
    WHALE,
    population,
    retail,
    trade,
)


def test_each_population_gets_its_label_with_evidence() -> None:
    d = Discovery([HOUR_MS, DAY_MS], 1_000)
    d.on_trades(population(), 1_000)
    labels = {c.address: c for c in d.candidates(HOUR_MS)}

    mm = labels[MM]
    assert mm.label == "market_maker"
    assert mm.evidence.net_ratio == 0
    assert mm.evidence.taker_share == 0
    assert mm.evidence.coins == 4
    assert mm.notional_usd == 8_000

    whale = labels[WHALE]
    assert whale.label == "directional"
    assert whale.net_usd_by_coin == {"ETH": 100_000.0}
    assert whale.evidence.net_ratio == 1
    assert whale.evidence.taker_share == 1

    for washer in (WASH_A, WASH_B):
        assert labels[washer].label == "wash_suspect"
        assert labels[washer].evidence.mutual_pair
        assert labels[washer].evidence.top_counterparty == (WASH_B if washer == WASH_A else WASH_A)
    assert labels[SELF_WASHER].label == "wash_suspect"
    assert labels[SELF_WASHER].evidence.self_trade_share == 1

    assert labels[LIQUIDATED].label == "engine"
    assert labels[LIQUIDATED].evidence.engine_share == 1

    assert [c.address for c in d.candidates(HOUR_MS, label="directional", limit=1)] == [WHALE]
    assert d.candidates(HOUR_MS)[0].address == WHALE  # largest notional first


def test_a_small_buyer_against_a_single_maker_is_not_a_wash_pair() -> None:
    """One partner dominating is not enough: the pair must also be flat (a whale filling on one maker is not)."""
    d = Discovery([HOUR_MS], 100)
    d.on_trades([trade(WHALE, MM, t=0) for _ in range(10)], 0)
    assert d.get(HOUR_MS, WHALE) is not None
    assert d.candidates(HOUR_MS)[0].label == "directional"


def test_zero_address_and_excluded_addresses_are_never_candidates() -> None:
    d = Discovery([HOUR_MS], 100, exclude=[EXCLUDED.upper().replace("0X", "0x")])
    d.on_trades([trade(ZERO_ADDRESS, WHALE), trade(EXCLUDED, WHALE, taker="A")], 0)
    assert [c.address for c in d.candidates(HOUR_MS)] == [WHALE]


def test_memory_is_fixed_under_a_million_distinct_addresses() -> None:
    capacity = 500
    table = HeavyHitters(HOUR_MS, capacity)
    # A whale trading throughout must survive the crowd: Space-Saving keeps what moves real size.
    for i in range(500_000):
        a, b = retail(2 * i + 1), retail(2 * i + 2)
        table.add(a, "BTC", 10.0, buy=True, taker=True, engine=False, counterparty=b, self_trade=False)
        table.add(b, "BTC", 10.0, buy=False, taker=False, engine=False, counterparty=a, self_trade=False)
        if i % 1_000 == 0:
            table.add(WHALE, "ETH", 1e6, buy=True, taker=True, engine=False, counterparty=a, self_trade=False)
    assert len(table) == capacity
    assert table.heap_entries <= 2 * capacity
    # One counter, one slice record, its entry in the slice's expiry index and one heap entry each at most (all
    # trades fell into one slice here), plus the heap's slack.
    assert table.structures() <= 5 * capacity
    assert table.evictions >= 1_000_000 - capacity
    whale = table.get(WHALE)
    assert whale is not None
    assert whale.notional_usd == 500 * 1e6


def test_windows_expire_on_the_controlled_clock() -> None:
    d = Discovery([HOUR_MS, DAY_MS], 100)
    d.on_trades([trade(WHALE, MM, t=0)], 0)
    slice_ms = HOUR_MS // SLICES
    d.on_trades([trade(WHALE, MM, coin="ETH", t=HOUR_MS - slice_ms)], HOUR_MS - slice_ms)
    # Within the hour both trades count.
    hour = d.get(HOUR_MS, WHALE)
    assert hour is not None
    assert hour.trades == 2
    assert hour.coins == ("BTC", "ETH")
    # An hour and a slice later the first trade has left the 1 h window, not the 24 h one.
    d.advance(HOUR_MS + slice_ms)
    hour = d.get(HOUR_MS, WHALE)
    assert hour is not None
    assert hour.trades == 1
    assert hour.coins == ("ETH",)
    assert hour.net_usd_by_coin == {"ETH": 100.0}
    day = d.get(DAY_MS, WHALE)
    assert day is not None
    assert day.trades == 2
    # Past both: the counters are freed, not just zeroed.
    d.advance(DAY_MS + HOUR_MS)
    assert d.candidates(HOUR_MS) == []
    assert d.candidates(DAY_MS) == []
    assert len(d.tables[HOUR_MS]) == 0
    assert len(d.tables[DAY_MS]) == 0
