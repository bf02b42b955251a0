"""Discovery's table does its expiry and ranking in bounded steps: a slice boundary or a query over a full table
is spread over calls, and the answers are those of a table that did everything at once."""

from __future__ import annotations

import random
from typing import Final

from hl_monitor.tracking.discovery import (
    EXACT_RANK_MAX,
    RANK_REFRESH_MS,
    RANK_STEP,
    SLICES,
    HeavyHitters,
)

HOUR_MS: Final = 3_600_000
SLICE_MS: Final = HOUR_MS // SLICES
CAPACITY: Final = 6_000  # above EXACT_RANK_MAX: queries use the incremental ranking
WHALE: Final = "0x" + "ee" * 20


def _address(i: int) -> str:
    return "0x" + f"{i:040x}"


def _fill(table: HeavyHitters, rng: random.Random, trades: int, now_ms: int, population: int) -> None:
    for _ in range(trades):
        a, b = rng.randrange(population), rng.randrange(population)
        usd = rng.uniform(100, 10_000) * (1 + (a % 50 == 0) * 20)  # a few big traders among many small ones
        table.add(
            _address(a),
            "ETH",
            usd,
            buy=a % 2 == 0,
            taker=True,
            engine=False,
            counterparty=_address(b),
            self_trade=False,
        )
    table.advance(now_ms)


def _twins(seed: int = 7) -> tuple[HeavyHitters, HeavyHitters]:
    """Two tables fed the same trades: one only through its bounded steps, one settled at once."""
    tables = []
    for _ in range(2):
        rng = random.Random(seed)
        table = HeavyHitters(HOUR_MS, CAPACITY)
        for k in range(SLICES):
            _fill(table, rng, 2_500, k * SLICE_MS, 8_000)
        tables.append(table)
    return tables[0], tables[1]


def _exact_top(table: HeavyHitters, n: int) -> list[str]:
    return [c.address for c in table.candidates()[:n]]  # no limit: every counter, ranked exactly


async def test_a_slice_boundary_is_expired_in_bounded_steps_to_the_same_totals() -> None:
    stepped, settled = _twins()
    assert len(stepped) == CAPACITY > EXACT_RANK_MAX
    boundary = SLICES * SLICE_MS  # the first slice leaves the window
    stepped.advance(boundary)
    assert stepped.expiring > 0, "one call does not subtract a whole slice of a full table"
    calls = 1
    while stepped.expiring:
        stepped.work(boundary)
        calls += 1
    assert calls > 1
    settled.settle(boundary)
    stepped.settle(boundary)
    top = _exact_top(settled, 100)
    assert _exact_top(stepped, 100) == top
    assert [c.notional_usd for c in stepped.candidates(limit=20)] == [
        c.notional_usd for c in settled.candidates(limit=20)
    ]


async def test_queries_of_a_full_table_read_the_incremental_ranking() -> None:
    table, _ = _twins()
    now = SLICES * SLICE_MS - 1
    table.settle(now)
    assert [c.address for c in table.candidates(limit=50)] == _exact_top(table, 50)

    # A newcomer that outgrows everyone after the last scan is in the next answer (it is "fresh"), and the next
    # scans (started at most every RANK_REFRESH_MS, a step per call) keep the ranking exact.
    table.add(WHALE, "ETH", 50_000_000, buy=True, taker=True, engine=False, counterparty=_address(1), self_trade=False)
    assert table.candidates(limit=1)[0].address == WHALE
    assert table.candidates(label="directional", limit=1)[0].address == WHALE
    later = now + RANK_REFRESH_MS
    for _ in range(CAPACITY // RANK_STEP + 1):  # one scan, a step per call
        table.work(later)
    assert [c.address for c in table.candidates(limit=50)] == _exact_top(table, 50)


async def test_the_cheap_label_is_the_candidates_label() -> None:
    table, _ = _twins()
    table.settle(SLICES * SLICE_MS - 1)
    for c in table.candidates(limit=300):
        assert table.label_of(c.address) == c.label
