"""A liquidation cascade in small (`sim/scenarios.py` `cascade`) against the real service, as `make bench` runs it in
full (`bench/cascade.py`): the sim in its own process, the tape of every coin surging, wide addresses flipping
and liquidated (engine trades), precise whales trading, JetStream acks. What a user relies on in such a peak:
every expected signal exactly once, the service ready all along, no backpressure. Latencies are the bench's.
"""

from __future__ import annotations

from collections import Counter

import pytest

from hl_monitor.bench.cascade import CascadeOutcome, CascadeSize, run_cascade

# Two whales, 40 wide addresses of which 10 move (5 flips, 5 liquidations), a 1,000 trades/s tape for 4 s.
SMALL = CascadeSize(whales=2, wide=40, movers=10, seconds=4.0, calm_tape=50.0, whale_fills_s=20.0)


def check(o: CascadeOutcome) -> None:
    kinds = Counter(kind for _, _, kind, _ in o.record["events"])
    assert kinds == {"flip": 5, "liquidation": 5}
    assert o.record["orders"]
    assert o.record["crowd_trades"] > 0
    once = o.once
    assert once["whale_orders_without_signal"] == 0, once
    assert once["movers_without_signal"] == once["movers_with_other_count"] == 0, once
    assert once["unexpected_signals"] == 0, once
    assert once["acked_more_than_once"] == 0, once
    assert once["stream_messages"] == once["db_published"] == once["signals_acked"], once
    # Each whale order is one signal (no flips), each flip two legs and each liquidation one close.
    assert once["signals_acked"] == len(o.record["orders"]) + 5 * 2 + 5
    assert o.exactly_once
    assert o.readiness_samples > 0
    assert o.always_ready, o.not_ready[:3]
    assert o.no_backpressure, (o.backpressure_before, o.backpressure_after)


async def test_a_cascade_on_sqlite_delivers_every_signal_once_ready_and_without_backpressure() -> None:
    check(await run_cascade(SMALL, "sqlite", mysql_url=""))


@pytest.mark.mariadb
async def test_a_cascade_on_mariadb_delivers_every_signal_once_ready_and_without_backpressure(
    mariadb_url: str,
) -> None:
    check(await run_cascade(SMALL, "mariadb", mysql_url=mariadb_url))
