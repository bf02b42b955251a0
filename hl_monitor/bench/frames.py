"""Benchmark workloads: real wire frames made by the simulator's exchange model, generated once per invocation.

Every bench and its baseline read the same `Workload`, so they compare like with like. Whales place market
orders on a few perps with random side and size, so opens, closes and flips (`Long > Short`) all occur, each
order arriving as one `userFills` frame (its fills) followed by one `orderUpdates` frame (`open` + `filled`),
exactly as the simulator sends them. Trades frames carry `users: [buyer, seller]` like the public tape.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

import msgspec

from hl_monitor.sim.exchange import (
    Exchange,
    WireFill,
    WireLiquidationEvent,
    WireOrderUpdate,
    WireTrade,
    WireTwapHistoryEntry,
)

__all__ = [
    "BENCH_COINS",
    "TapeWorkload",
    "Workload",
    "make_tape",
    "make_workload",
    "order_size",
    "px_step",
    "whale_address",
]

# Liquid perps with distinct lot sizes; trading several keeps per-coin state realistic.
BENCH_COINS: Final = ("ETH", "SOL", "HYPE")
# Order sizes in lots of each coin: large enough to split into many fills, small against the sim's collateral.
_MIN_LOTS: Final = 50
_MAX_LOTS: Final = 5_000

_PX_QUANTUM: Final = Decimal("0.0001")
_ENC: Final = msgspec.json.Encoder()
# Trades per `trades` frame: one block of one coin carries from a single trade to a sweep of a book.
_TAPE_MAX_PER_FRAME: Final = 20
# Distinct traders on the tape: most of them are nobody we watch.
_TAPE_POPULATION: Final = 200_000


def whale_address(i: int) -> str:
    """Deterministic, valid, lowercase address of whale `i` (distinct from the sim's random counterparties)."""
    return f"0x{0xB0 + i % 16:02x}{i:038x}"


def px_step(mid: Decimal) -> Decimal:
    """Each fill of an order walks the book by about 1 bp."""
    return (mid / 10_000).quantize(_PX_QUANTUM)


def order_size(exchange: Exchange, coin: str, rng: random.Random) -> Decimal:
    decimals = exchange.universe.perps[coin].sz_decimals
    return Decimal(rng.randint(_MIN_LOTS, _MAX_LOTS)).scaleb(-decimals)


@dataclass(slots=True)
class Workload:
    """Encoded frames in arrival order, with who each belongs to (`None` for public frames)."""

    frames: list[bytes] = field(default_factory=list)
    owners: list[str | None] = field(default_factory=list)
    fills: int = 0  # fills inside `userFills` frames
    orders: int = 0
    trade_frames: list[bytes] = field(default_factory=list)
    trades: int = 0
    addresses: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(len(f) for f in self.frames)


class _Recorder:
    """`ExchangeListener` that encodes each event the way the simulator puts it on the wire."""

    def __init__(self, workload: Workload) -> None:
        self.w = workload

    def on_fills(self, user: str, fills: Sequence[WireFill]) -> None:
        self.w.frames.append(_ENC.encode({"channel": "userFills", "data": {"user": user, "fills": fills}}))
        self.w.owners.append(user)
        self.w.fills += len(fills)

    def on_order_updates(self, user: str, updates: Sequence[WireOrderUpdate]) -> None:
        self.w.frames.append(_ENC.encode({"channel": "orderUpdates", "data": updates}))
        self.w.owners.append(user)

    def on_trades(self, coin: str, trades: Sequence[WireTrade]) -> None:
        self.w.trade_frames.append(_ENC.encode({"channel": "trades", "data": trades}))
        self.w.trades += len(trades)

    def on_liquidation(self, user: str, event: WireLiquidationEvent) -> None:
        return None

    def on_twap_history(self, user: str, entries: Sequence[WireTwapHistoryEntry]) -> None:
        return None


def make_workload(*, whales: int, orders: int, fills_per_order: int, seed: int = 7) -> Workload:
    """`orders` market orders spread over `whales` addresses, each split into `fills_per_order` fills."""
    workload = Workload(addresses=[whale_address(i) for i in range(whales)])
    exchange = Exchange(seed=seed, record_ledger=False)
    exchange.listener = _Recorder(workload)
    rng = random.Random(seed)
    for n in range(orders):
        user = workload.addresses[n % whales]
        coin = rng.choice(BENCH_COINS)
        exchange.market_order(
            user,
            coin,
            rng.random() < 0.5,
            order_size(exchange, coin, rng),
            exchange.mids[coin],
            fills=fills_per_order,
            px_step=px_step(exchange.mids[coin]),
        )
        workload.orders += 1
    return workload


@dataclass(slots=True)
class TapeWorkload:
    """Public `trades` frames whose buyer or seller is a watched address for about `hit_rate` of the trades."""

    frames: list[bytes]
    trades: int
    watched: list[str]
    hit_rate: float


def make_tape(*, trades: int, watched: int, hit_rate: float, seed: int = 11) -> TapeWorkload:
    rng = random.Random(seed)
    watched_addrs = [whale_address(i) for i in range(watched)]
    population = max(_TAPE_POPULATION, watched * 2)
    coins = ("BTC", *BENCH_COINS)
    frames: list[bytes] = []
    made = 0
    tid = 10**14
    time_ms = 1_800_000_000_000
    while made < trades:
        coin = rng.choice(coins)
        block: list[WireTrade] = []
        for _ in range(min(rng.randint(1, _TAPE_MAX_PER_FRAME), trades - made)):
            tid += 1
            if rng.random() < hit_rate:
                whale = rng.choice(watched_addrs)
                other = f"0x{rng.randrange(population):040x}"
                users = (whale, other) if rng.random() < 0.5 else (other, whale)
            else:
                users = (f"0x{rng.randrange(population):040x}", f"0x{rng.randrange(population):040x}")
            block.append(
                WireTrade(coin=coin, side=rng.choice(("B", "A")), px="101.5", sz="3.2", time=time_ms,
                          hash=f"0x{tid:064x}", tid=tid, users=users)
            )  # fmt: skip
        time_ms += 70  # about one block
        frames.append(_ENC.encode({"channel": "trades", "data": block}))
        made += len(block)
    return TapeWorkload(frames=frames, trades=made, watched=watched_addrs, hit_rate=hit_rate)
