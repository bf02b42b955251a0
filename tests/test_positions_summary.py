"""What whales hold, read back: position rows, filters and sorting, the whale bias per symbol, the gauges.

The documents are built by the real position model from the captured clearinghouseState fixtures (one
whale holds exactly the fixture), so the rows show what the exchange reported.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from hl_monitor.hyperliquid.protocol import (
    SpotState,
    decode_info,
)
from hl_monitor.metrics import Metrics
from hl_monitor.ops.positions import (
    document_json,
    export_gauges,
    list_positions,
    select_positions,
    summary,
)
from hl_monitor.tracking.risk import DEFAULT_ALERT_LEVELS
from tests.support.paths import FIXTURES
from tests.support.whales import ALPHA, CHARLIE, DELTA, NOW, STATE_TIME, D, docs, label, state_with, whales


def keys(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(row["label"] or row["address"], row["coin"]) for row in rows]


# ------------------------------------------------------------------------------------ rows


def test_a_row_carries_the_whole_position_as_the_exchange_reported_it() -> None:
    rows = list_positions(docs(), label=label, symbol="BTC", side="long", sort="value")

    assert rows[1] == {
        "address": ALPHA,
        "label": "alpha",
        "coin": "BTC",
        "symbol": "BTCUSDC",
        "dex": "",
        "side": "LONG",
        "size": "0.1",
        "entry_px": "98450.0",
        "mark_px": "98450",  # positionValue ÷ |szi|
        "position_value_usd": "9845.0",
        "unrealized_pnl": "246.125",
        "return_on_equity": "0.025",
        "leverage_type": "cross",
        "leverage": 5,
        "liquidation_px": "80000.0",
        "liquidation_distance": format((D("98450") - D("80000.0")) / D("98450"), "f"),
        "margin_used": "1969.0",
        "opened_at": STATE_TIME,
        "source": "ws_state",
        "as_of": NOW,
    }
    json.dumps(rows)  # JSON-able as it is


def test_decimals_leave_in_plain_notation_and_unknowns_as_null() -> None:
    (doge,) = list_positions(docs(), symbol="DOGE")

    assert doge["size"] == "0.00000010"  # str() of this Decimal would be "1.0E-7"
    assert (doge["mark_px"], doge["position_value_usd"], doge["liquidation_distance"]) == (None, None, None)
    assert doge["label"] == ""  # watched without a label


def test_default_lists_every_position_biggest_value_first_unknown_value_last() -> None:
    rows = list_positions(docs(), label=label)

    assert keys(rows) == [
        ("bravo", "BTC"),  # 49225.0
        ("bravo", "ETH"),  # 23000.0
        ("charlie", "BTC"),  # 19690.0
        (DELTA, "SOL"),  # 10000.0
        ("alpha", "BTC"),  # 9845.0
        ("alpha", "xyz:TSLA"),  # 2755.0
        ("charlie", "cash:NVDA"),  # 676.0
        (DELTA, "DOGE"),  # unknown
    ]


def test_sort_by_pnl_puts_the_biggest_winner_first() -> None:
    model = whales()
    rows = list_positions(docs(model), label=label, sort="pnl")

    assert [(r["coin"], r["unrealized_pnl"]) for r in rows] == [
        ("BTC", "4225.0"),
        ("ETH", "1000.0"),
        ("BTC", "310.0"),
        ("BTC", "246.125"),
        ("xyz:TSLA", "33.12"),
        ("DOGE", "0.0"),
        ("cash:NVDA", "-1.69"),
        ("SOL", "-5000.0"),
    ]
    # A position whose PnL is unknown (no entry price) sorts after every known one, losses included.
    doc = model.get(DELTA)
    assert doc is not None
    sol = doc.dexes[""].positions["SOL"]
    unknown = msgspec.structs.replace(sol, entry_px=None, unrealized_pnl=None)
    dex = msgspec.structs.replace(doc.dexes[""], positions={**doc.dexes[""].positions, "SOL": unknown})
    changed = [d if d.address != DELTA else msgspec.structs.replace(doc, dexes={"": dex}) for d in docs(model)]
    assert [r["coin"] for r in list_positions(changed, sort="pnl")][-1] == "SOL"


def test_sort_by_liquidation_distance_puts_the_closest_first_and_unknown_last() -> None:
    rows = list_positions(docs(), label=label, sort="liquidation_distance")

    assert keys(rows) == [
        ("charlie", "BTC"),  # 550 ÷ 98450 ≈ 0.56 %
        (DELTA, "SOL"),  # 5 %
        ("bravo", "BTC"),  # 13450 ÷ 98450
        ("alpha", "BTC"),  # 18450 ÷ 98450
        ("alpha", "xyz:TSLA"),  # 95.5 ÷ 275.5
        ("charlie", "cash:NVDA"),  # 85.2 ÷ 135.2
        ("bravo", "ETH"),  # no liquidation price
        (DELTA, "DOGE"),  # no mark
    ]
    assert rows[0]["liquidation_distance"] == format(D("550.0") / D("98450"), "f")
    assert rows[1]["liquidation_distance"] == "0.05"


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("BTC", [("bravo", "BTC"), ("charlie", "BTC"), ("alpha", "BTC")]),  # the wire coin
        ("btcusdc", [("bravo", "BTC"), ("charlie", "BTC"), ("alpha", "BTC")]),  # the symbol, any case
        ("xyz:TSLA", [("alpha", "xyz:TSLA")]),  # a builder-dex coin
        ("TSLAUSDC", [("alpha", "xyz:TSLA")]),
        ("TSLA", []),  # neither the coin nor the symbol
    ],
)
def test_symbol_filter_matches_the_coin_or_the_symbol(symbol: str, expected: list[tuple[str, str]]) -> None:
    assert keys(list_positions(docs(), label=label, symbol=symbol)) == expected


def test_side_and_min_usd_filters() -> None:
    shorts = list_positions(docs(), label=label, side="short")
    assert keys(shorts) == [("bravo", "ETH"), ("charlie", "BTC"), ("charlie", "cash:NVDA")]

    big = list_positions(docs(), label=label, min_usd=D("9845.0"))  # at least: the boundary is kept
    assert keys(big)[-1] == ("alpha", "BTC")
    assert len(big) == 5
    assert (DELTA, "DOGE") not in keys(list_positions(docs(), label=label, min_usd=D(0)))  # unknown value

    assert keys(list_positions(docs(), label=label, symbol="BTC", side="short", min_usd=D(1))) == [("charlie", "BTC")]


def test_limit_keeps_the_first_rows_of_the_sort() -> None:
    every = list_positions(docs(), limit=1000)
    assert len(every) == 8
    assert list_positions(docs(), limit=3) == every[:3]
    assert len(select_positions(docs())) == 8


def test_flat_dexes_and_spot_balances_are_no_positions() -> None:
    model = whales()
    spot = decode_info((FIXTURES / "http_spot_clearinghouse_state.json").read_bytes(), SpotState)
    model.on_spot_state(ALPHA, spot, NOW + 10)
    model.on_dex_state(DELTA, "", state_with([]), NOW + 11)  # DELTA closed everything

    assert {r["coin"] for r in list_positions(docs(model)) if r["address"] == ALPHA} == {"BTC", "xyz:TSLA"}
    assert not [r for r in list_positions(docs(model)) if r["address"] == DELTA]


def test_document_json_has_every_dex_spot_balance_and_the_label() -> None:
    model = whales()
    model.on_spot_state(
        ALPHA, decode_info((FIXTURES / "http_spot_clearinghouse_state.json").read_bytes(), SpotState), NOW + 10
    )
    doc = model.get(ALPHA)
    assert doc is not None

    body = document_json(doc, label)

    assert (body["address"], body["label"], body["account_value"]) == (ALPHA, "alpha", "25492.250")
    assert sorted(body["dexes"]) == ["", "xyz"]
    btc = body["dexes"][""]["positions"]["BTC"]
    assert (btc["size"], btc["liquidation_px"], btc["cum_funding_since_open"]) == ("0.1", "80000.0", "-1.234567")
    assert body["dexes"]["xyz"]["account_value"] == "15246.125"
    assert body["spot"]  # balances are part of the document
    assert body["spot_as_of"] == NOW + 10
    json.dumps(body)


# ------------------------------------------------------------------------------------ whale bias


def by_symbol(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["symbol"]: row for row in rows}


def test_summary_of_a_symbol_held_on_both_sides() -> None:
    btc = by_symbol(summary(docs(), label))["BTCUSDC"]

    assert btc == {
        "symbol": "BTCUSDC",
        "coins": ["BTC"],
        "longs": 2,  # alpha, bravo
        "shorts": 1,  # charlie
        "long_notional_usd": "59070.0",  # 9845.0 + 49225.0
        "short_notional_usd": "19690.0",
        "gross_notional_usd": "78760.0",
        "net_notional_usd": "39380.0",
        "bias": "long",
        # Σ(value·entry) ÷ Σ value = (9845.0·98450.0 + 49225.0·90000.0) ÷ 59070.0; with one mark this is also
        # the size-weighted entry (0.1·98450 + 0.5·90000) ÷ 0.6.
        "long_avg_entry_px": "91408.33333333333333333333333",
        "short_avg_entry_px": "100000.0",
        "unrealized_pnl_usd": "4781.125",  # 246.125 + 4225.0 + 310.0
        "closest_liquidation": {
            "address": CHARLIE,
            "label": "charlie",
            "coin": "BTC",
            "side": "SHORT",
            "liquidation_distance": format(D("550.0") / D("98450"), "f"),
            "liquidation_px": "99000.0",
            "mark_px": "98450",
        },
    }
    assert D(btc["long_avg_entry_px"]) == (D("0.1") * D("98450") + D("0.5") * D("90000")) / D("0.6")


def test_summary_of_one_sided_symbols_and_the_order_of_symbols() -> None:
    rows = summary(docs(), label)

    assert [r["symbol"] for r in rows] == [
        "BTCUSDC",  # gross 78760.0
        "ETHUSDC",  # 23000.0
        "SOLUSDC",  # 10000.0
        "TSLAUSDC",  # 2755.0
        "cash:NVDAUSDC",  # 676.0
        "DOGEUSDC",  # 0: value unknown
    ]
    eth, doge = by_symbol(rows)["ETHUSDC"], by_symbol(rows)["DOGEUSDC"]
    assert (eth["longs"], eth["shorts"], eth["bias"]) == (0, 1, "short")
    assert (eth["long_notional_usd"], eth["net_notional_usd"]) == ("0", "-23000.0")
    assert (eth["long_avg_entry_px"], eth["short_avg_entry_px"]) == (None, "2400.0")
    assert eth["closest_liquidation"] is None  # cross margin with no liquidation price
    # A position without a value is counted as a whale but adds nothing to notional or to the average entry.
    assert (doge["longs"], doge["long_notional_usd"], doge["long_avg_entry_px"], doge["bias"]) == (1, "0", None, "flat")


def test_summary_symbol_filter_matches_symbol_or_coin() -> None:
    assert [r["symbol"] for r in summary(docs(), symbol="xyz:tsla")] == ["TSLAUSDC"]
    assert [r["symbol"] for r in summary(docs(), symbol="ethusdc")] == ["ETHUSDC"]
    assert summary(docs(), symbol="XRP") == []
    assert summary([]) == []


# ------------------------------------------------------------------------------------ gauges


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"hl_monitor_{name}", labels)


def test_export_gauges_sets_notional_pnl_and_positions_near_liquidation() -> None:
    metrics = Metrics(CollectorRegistry())

    export_gauges(metrics, docs(), DEFAULT_ALERT_LEVELS)

    assert sample(metrics, "whale_notional_usd", symbol="BTCUSDC", side="long") == 59070.0
    assert sample(metrics, "whale_notional_usd", symbol="BTCUSDC", side="short") == 19690.0
    assert sample(metrics, "whale_notional_usd", symbol="ETHUSDC", side="long") == 0.0  # both sides of a symbol
    assert sample(metrics, "whale_unrealized_pnl_usd", symbol="BTCUSDC") == 4781.125
    assert sample(metrics, "whale_unrealized_pnl_usd", symbol="SOLUSDC") == -5000.0
    # Distances: BTC short 0.56 %, SOL exactly 5 % (not below 5 %), the rest above 10 %.
    assert sample(metrics, "positions_near_liquidation", level="0.1") == 2.0
    assert sample(metrics, "positions_near_liquidation", level="0.05") == 1.0
    assert sample(metrics, "positions_near_liquidation", level="0.02") == 1.0


def test_export_gauges_removes_symbols_no_longer_held() -> None:
    metrics = Metrics(CollectorRegistry())
    model = whales()
    export_gauges(metrics, docs(model), DEFAULT_ALERT_LEVELS)

    model.on_dex_state(DELTA, "", state_with([]), NOW + 10)  # SOL and DOGE closed
    model.on_dex_state(CHARLIE, "", state_with([]), NOW + 11)  # the BTC short closed
    export_gauges(metrics, docs(model), DEFAULT_ALERT_LEVELS)

    assert sample(metrics, "whale_notional_usd", symbol="SOLUSDC", side="long") is None
    assert sample(metrics, "whale_notional_usd", symbol="SOLUSDC", side="short") is None
    assert sample(metrics, "whale_unrealized_pnl_usd", symbol="DOGEUSDC") is None
    assert sample(metrics, "whale_notional_usd", symbol="BTCUSDC", side="short") == 0.0
    assert sample(metrics, "whale_notional_usd", symbol="BTCUSDC", side="long") == 59070.0
    for level in ("0.1", "0.05", "0.02"):
        assert sample(metrics, "positions_near_liquidation", level=level) == 0.0  # still exported, now 0

    export_gauges(metrics, [], [D("0.2")])  # nobody holds anything; one level configured
    exposition = [s for family in metrics.whale_notional_usd.collect() for s in family.samples]
    assert exposition == []
    assert sample(metrics, "positions_near_liquidation", level="0.2") == 0.0
    assert sample(metrics, "positions_near_liquidation", level="0.1") is None
