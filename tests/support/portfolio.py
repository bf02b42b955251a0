"""Clearinghouse states shaped like the captured fixture, for the position model's tests."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from hl_monitor.hyperliquid.protocol import ClearinghouseState, decode_info
from tests.support.paths import FIXTURES

D = Decimal


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


def core_state() -> dict[str, Any]:
    return dict(fixture_json("http_clearinghouse_state.json"))


def state_with(positions: list[dict[str, Any]], time: int, account_value: str = "1000") -> ClearinghouseState:
    """A clearinghouseState body shaped like the fixture, with the given positions (wire dicts)."""
    body = core_state()
    body["assetPositions"] = [{"position": p, "type": "oneWay"} for p in positions]
    body["marginSummary"] = dict(body["marginSummary"], accountValue=account_value)
    body["time"] = time
    return decode_info(json.dumps(body).encode(), ClearinghouseState)


def wire_position(coin: str, szi: str, entry: str, **fields: Any) -> dict[str, Any]:
    """A position as the exchange sends it; `fields` override (camelCase keys)."""
    position: dict[str, Any] = {
        "coin": coin,
        "szi": szi,
        "entryPx": entry,
        "leverage": {"type": "cross", "value": 10},
        "liquidationPx": None,
        "marginUsed": "10.0",
        "maxLeverage": 40,
        "positionValue": str(abs(D(szi)) * D(entry)),
        "returnOnEquity": "0.0",
        "unrealizedPnl": "0.0",
        "cumFunding": {"allTime": "0.0", "sinceOpen": "0.0", "sinceChange": "0.0"},
    }
    position.update(fields)
    return position
