"""A few whales' position documents built from the captured fixtures, for the positions read side."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateFrame,
    ClearinghouseState,
    decode_frame,
    decode_info,
)
from hl_monitor.tracking.portfolio import AddressPortfolio, PositionModel
from tests.support.paths import FIXTURES

D = Decimal
STATE_TIME = 1_784_050_800_000  # `time` of the clearinghouseState fixtures
NOW = STATE_TIME + 5_000  # local receive time
ALPHA = "0x" + "a1" * 20  # holds exactly the fixtures: BTC long, xyz:TSLA long
BRAVO = "0x" + "b2" * 20  # the biggest BTC long, an ETH short without a liquidation price
CHARLIE = "0x" + "c3" * 20  # a BTC short 0.56 % from liquidation, cash:NVDA short (fixture)
DELTA = "0x" + "d4" * 20  # SOL exactly 5 % from liquidation; a DOGE position the exchange sent no value for
LABELS = {ALPHA: "alpha", BRAVO: "bravo", CHARLIE: "charlie"}  # DELTA is watched without a label


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


def wire_position(coin: str, szi: str, entry: str, value: str, pnl: str, liq: str | None, lev: int) -> dict[str, Any]:
    """A position as the exchange sends it (camelCase)."""
    return {
        "coin": coin,
        "szi": szi,
        "entryPx": entry,
        "leverage": {"type": "cross", "value": lev},
        "liquidationPx": liq,
        "marginUsed": str(D(value) / lev),
        "maxLeverage": 50,
        "positionValue": value,
        "returnOnEquity": "0.0",
        "unrealizedPnl": pnl,
        "cumFunding": {"allTime": "0.0", "sinceOpen": "0.0", "sinceChange": "0.0"},
    }


def state_with(positions: list[dict[str, Any]]) -> ClearinghouseState:
    """The core clearinghouseState fixture with other positions in it."""
    body = fixture_json("http_clearinghouse_state.json")
    body["assetPositions"] = [{"position": p, "type": "oneWay"} for p in positions]
    return decode_info(json.dumps(body).encode(), ClearinghouseState)


def whales() -> PositionModel:
    """Four whales, fed to the model the way the exchange shows them."""
    model = PositionModel()
    builder = fixture_json("http_clearinghouse_state_builder_perp.json")
    by_coin = {ap["position"]["coin"]: ap for ap in builder["assetPositions"]}
    core = fixture_json("http_clearinghouse_state.json")
    frame = decode_frame(
        json.dumps(
            {
                "channel": "allDexsClearinghouseState",
                "data": {
                    "user": ALPHA,
                    "clearinghouseStates": [["", core], ["xyz", dict(builder, assetPositions=[by_coin["xyz:TSLA"]])]],
                },
            }
        )
    )
    assert isinstance(frame, AllDexsClearinghouseStateFrame)
    model.on_all_dexs_state(frame.data, NOW)
    bravo = [
        wire_position("BTC", "0.5", "90000.0", "49225.0", "4225.0", "85000.0", 10),
        wire_position("ETH", "-10.0", "2400.0", "23000.0", "1000.0", None, 3),
    ]
    model.on_dex_state(BRAVO, "", state_with(bravo), NOW + 1)
    charlie = [wire_position("BTC", "-0.2", "100000.0", "19690.0", "310.0", "99000.0", 20)]
    model.on_dex_state(CHARLIE, "", state_with(charlie), NOW + 2)
    cash = decode_info(json.dumps(dict(builder, assetPositions=[by_coin["cash:NVDA"]])).encode(), ClearinghouseState)
    model.on_dex_state(CHARLIE, "cash", cash, NOW + 3)
    delta = [
        wire_position("SOL", "100.0", "150.0", "10000.0", "-5000.0", "95.0", 5),  # mark 100: |100−95| ÷ 100 = 5 %
        wire_position("DOGE", "0.00000010", "0.1", "0", "0.0", None, 3),  # positionValue 0: value unknown
    ]
    model.on_dex_state(DELTA, "", state_with(delta), NOW + 4)
    return model


def docs(model: PositionModel | None = None) -> list[AddressPortfolio]:
    model = model if model is not None else whales()
    out = [model.get(address) for address in model]
    return [doc for doc in out if doc is not None]


def label(address: str) -> str:
    return LABELS.get(address, "")
