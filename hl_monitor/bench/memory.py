"""Resident memory per watched wide-tier address, measured in a fresh interpreter per size.

The child imports everything first, records RSS, then builds what the service holds per wide address: the
address book entry, the tracking engine's watched entry, the tape's match set and a position book entry
(the wide tier bootstraps every address's positions from REST `clearinghouseState`; one open position each).
Run as `python -m hl_monitor.bench.memory N`; prints one JSON object.
"""

from __future__ import annotations

import gc
import os
import sys
from decimal import Decimal
from typing import Any, Final

import msgspec

from hl_monitor.bench.frames import whale_address
from hl_monitor.config import AggregationConfig
from hl_monitor.domain.address import WatchedAddress
from hl_monitor.hyperliquid.protocol import (
    AssetPosition,
    ClearinghouseState,
    ClearinghouseStateData,
    MarginSummary,
    Position,
)
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.tracking.engine import TrackingEngine

__all__ = ["measure", "rss_bytes"]

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_NOW_MS: Final = 1_800_000_000_000


def rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def measure(n: int) -> dict[str, Any]:
    addresses = [whale_address(i) for i in range(n)]
    gc.collect()
    before = rss_bytes()
    book = {a: WatchedAddress(address=a, tier="wide") for a in addresses}
    engine = TrackingEngine(AggregationConfig(), SymbolMap.empty())
    for address in addresses:
        engine.add_address(address)
    tape_set = frozenset(book)
    for address in addresses:
        state = ClearinghouseState(
            margin_summary=MarginSummary(account_value=Decimal("1250000.5")),
            asset_positions=[AssetPosition(position=Position(coin="ETH", szi=Decimal("-120.5")))],
        )
        engine.on_clearinghouse(address, ClearinghouseStateData(user=address, clearinghouse_state=state), _NOW_MS)
    gc.collect()
    after = rss_bytes()
    assert len(tape_set) == n
    assert engine.stats.watched_addresses == n
    return {"addresses": n, "rss_before": before, "rss_after": after, "bytes_per_address": (after - before) / n}


if __name__ == "__main__":
    sys.stdout.write(msgspec.json.encode(measure(int(sys.argv[1]))).decode() + "\n")
