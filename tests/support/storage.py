"""Builders for the storage tests: meme-sized signals that overflowed the old decimal(18,8), a fast writer config."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hl_monitor.config import WriterConfig
from hl_monitor.domain.signal import Signal

WHALE = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20


T0 = 1_700_000_000_000
# Meme-token magnitudes that overflowed the old decimal(18,8): a quadrillion units at a 1e-10 price.
MEME_SIZE = Decimal("1234567890123456.123456789")
MEME_PRICE = Decimal("0.0000000001234")


def make_signal(n: int, address: str = WHALE, **changes: Any) -> Signal:
    fields: dict[str, Any] = {
        "address": address,
        "asset_type": "futures",
        "symbol": "KPEPEUSDC",
        "coin_type": "D",
        "direction": "open",
        "side": "LONG",
        "position_rate": Decimal("12.345"),
        "close_rate": Decimal("0"),
        "size": MEME_SIZE + n,
        "price": MEME_PRICE,
        "timestamp": T0 + n,
        "signal_id": f"{address}:{1000 + n}:OL",
        "coin": "kPEPE",
        "dir": "Open Long",
        "oid": 1000 + n,
        "trigger": "status",
        "status": "filled",
        "fill_count": 3,
        "first_fill_time": T0 + n,
        "last_fill_time": T0 + n + 5,
        "notional_usd": (MEME_SIZE + n) * MEME_PRICE,
        "detected_at": T0 + n + 50,
    }
    fields.update(changes)
    return Signal(**fields)


def writer_cfg(**changes: Any) -> WriterConfig:
    base: dict[str, Any] = {
        "batch_size": 50,
        "flush_interval": 0.05,
        "retry_initial_delay": 0.02,
        "retry_max_delay": 0.1,
    }
    base.update(changes)
    return WriterConfig(**base)
