"""Builders for fills, frames and order updates used by the tracking tests (wire-shaped, via the decoders)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec

from hl_monitor.config import AggregationConfig
from hl_monitor.hyperliquid.protocol import Fill, UserFillsData, WsOrder, decode_fills, decode_frame
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.engine import TrackingEngine
from tests.support.paths import FIXTURES

ADDR = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
T0 = 1_780_000_000_000  # exchange time of the scripted fills
NOW = T0 + 50  # local receive time
BUY_DIRS = {"Open Long", "Close Short", "Buy", "Short > Long"}

_FILL = msgspec.json.Decoder(Fill)
_ORDERS = msgspec.json.Decoder(list[WsOrder])


def fill(
    oid: int,
    tid: int,
    sz: str,
    px: str = "100",
    *,
    dir: str = "Open Long",
    start: str = "0",
    side: str | None = None,
    time: int = T0,
    coin: str = "BTC",
    twap_id: int | None = None,
    liquidation: dict[str, Any] | None = None,
) -> Fill:
    """One fill as Hyperliquid sends it (decimal strings), decoded by the real decoder."""
    obj: dict[str, Any] = {
        "coin": coin,
        "px": px,
        "sz": sz,
        "side": side or ("B" if dir in BUY_DIRS else "A"),
        "time": time,
        "startPosition": start,
        "dir": dir,
        "closedPnl": "0.0",
        "hash": "0x" + "0" * 64,
        "oid": oid,
        "crossed": True,
        "fee": "0.01",
        "tid": tid,
        "feeToken": "USDC",
        "twapId": twap_id,
    }
    if liquidation is not None:
        obj["liquidation"] = liquidation
    return _FILL.decode(json.dumps(obj))


def frame(*fills: Fill, snapshot: bool = False, user: str = ADDR) -> UserFillsData:
    return UserFillsData(user=user, fills=list(fills), is_snapshot=snapshot)


def update(oid: int, status: str, *, orig: str = "1", sz: str = "0", coin: str = "BTC", t: int = T0) -> WsOrder:
    """One `orderUpdates` entry; `sz` is the remaining size (0 when filled)."""
    raw = [
        {
            "order": {
                "coin": coin,
                "side": "B",
                "limitPx": "100",
                "sz": sz,
                "oid": oid,
                "timestamp": T0 - 1000,
                "origSz": orig,
            },
            "status": status,
            "statusTimestamp": t,
        }
    ]
    return _ORDERS.decode(json.dumps(raw))[0]


def engine(symbols: SymbolMap | None = None, **overrides: Any) -> TrackingEngine:
    """An engine watching ADDR (seeded by an empty snapshot, as a new subscription is)."""
    eng = TrackingEngine(AggregationConfig(**overrides), symbols or SymbolMap.empty(), instance_id="test")
    eng.add_address(ADDR, "whale")
    eng.on_user_fills(ADDR, frame(snapshot=True), NOW)
    return eng


def fixture_frame(line: int) -> UserFillsData:
    """A `userFills` frame from tests/fixtures/ws_frames.jsonl (1-based line)."""
    raw = (FIXTURES / "ws_frames.jsonl").read_text().splitlines()[line - 1]
    decoded = decode_frame(raw)
    data = getattr(decoded, "data", None)
    assert isinstance(data, UserFillsData)
    return data


def fixture_fills(name: str) -> list[Fill]:
    return decode_fills((FIXTURES / name).read_bytes())


def dec(value: str) -> Decimal:
    return Decimal(value)
