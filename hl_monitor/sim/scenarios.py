"""Scripted whale behaviour for the simulator, deterministic from a seed.

    whales = scenario_whales("demo", seed=7)                  # the addresses it will trade with, known upfront
    await run_scenario(sim, "demo", seed=7, cycles=1, step_delay=0)
    sim.exchange.ledger.digest()                               # equal for equal seeds (and equal SimConfig.seed)

Scenarios:
- `demo`: a few whales cycling through open, add (limit, partial fills), an isolated short with a partial
  fill + cancel and a leverage change, flip, close, spot buy/sell on `@107` and `PURR/USDC`, a mark move and
  a funding payment on the builder dex, a mark drop then a liquidation, and a TWAP, perps on both dexes.
  Loops forever unless `cycles` is given; `step_delay` seconds between steps (good for `make run`).
- `flip`: open long, flip to short, flip back to long, close (`Long > Short`, `Short > Long`).
- `liquidation`: a long and a short position, each liquidated (`Liquidated Cross Long/Short`).
- `twap`: a TWAP buy, then a TWAP sell that closes it (slices share a twapId, zero hashes).
- `population`: the tape of a realistic crowd for whale discovery (README "Discovery"): three market makers
  quoting and filled on both sides of four coins, two directional whales buying, a wash pair trading with
  each other, and an account trading only through engine-executed TWAP slices and a liquidation.
  `population_roles` names each address's role. One cycle per `cycles` (default 1).
- `load`: `rate` fills per second across `whales` whales (market orders of `fills_per_order` fills,
  alternating sides so positions stay bounded) until `max_fills`; drives benchmarks.
- `cascade`: a liquidation cascade (`cascade_plan`, `cascade_setup`, `run_cascade`). Before it, every wide
  address holds a position; then for `seconds` (60) the tape of every coin runs at `surge` (20) times its calm
  rate (crowd trades between unwatched accounts), a fifth of the wide addresses flip (an ordinary trade) or
  are liquidated (an engine trade: all-zero hash), one after another over the window, and the precise whales
  trade `whale_fills_s` (50) fills a second each. `run_cascade` returns what was done, for the checks of
  `bench/cascade.py`.

Steps run one after another in a single task, so oids, tids and the ledger do not depend on timing.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any, Final

from hl_monitor.sim.exchange import Exchange, Whale
from hl_monitor.sim.server import SimServer

__all__ = [
    "SCENARIOS",
    "CascadePlan",
    "CascadeRecord",
    "cascade_plan",
    "cascade_setup",
    "population_roles",
    "run_cascade",
    "run_scenario",
    "scenario_whales",
]

SCENARIOS: Final = ("demo", "flip", "liquidation", "twap", "load", "population", "cascade")
WHALE_SALT: Final = 0x5CE9A1  # keeps scenario addresses apart from the exchange's counterparty stream
DEFAULT_WHALES: Final = {
    "demo": 3,
    "flip": 1,
    "liquidation": 1,
    "twap": 1,
    "load": 8,
    "population": 8,
    "cascade": 8,
}
DEFAULT_STEP_DELAY_S: Final = 1.0  # demo pace: a human can follow the signals
DEFAULT_LOAD_RATE: Final = 1000.0  # fills per second
DEFAULT_FILLS_PER_ORDER: Final = 4
LOAD_TICK_S: Final = 0.005  # scheduling granularity of the load generator
LOAD_MAX_BURST_TICKS: Final = 20  # after a stall, catch up at most this many ticks of fills at once
MIN_NOTIONAL: Final = 20_000  # USD size range of a demo order
MAX_NOTIONAL: Final = 200_000
PRICE_JITTER: Final = 0.002  # demo prices wander up to ±0.2% around the mid
LOAD_COINS: Final = ("BTC", "ETH", "SOL", "HYPE", "xyz:XYZ100")
POPULATION_COINS: Final = ("BTC", "ETH", "SOL", "HYPE")
# Roles of the population scenario's addresses, in order (the counts sum to its default of 8 addresses).
POPULATION_LAYOUT: Final = (("market_maker", 3), ("directional", 2), ("wash_suspect", 2), ("engine", 1))
POPULATION_QUOTE_BP: Final = Decimal("0.0005")  # makers quote 5 bp either side of the mid
POPULATION_MAKER_USD: Final = 50_000  # per quote filled; the whales trade ten times that per order
POPULATION_WHALE_USD: Final = 500_000
POPULATION_TWAP_SLICES: Final = 6  # engine-executed slices per cycle, then the position is liquidated
LIQUIDATION_DISCOUNT: Final = Decimal("0.9")  # a liquidated long is closed 10% below its mark
DEMO_FUNDING_RATE: Final = Decimal("0.0000125")  # the exchange's resting hourly rate
DEMO_ISOLATED_LEVERAGE: Final = (5, 3)  # the isolated short opens at 5x, then the whale lowers it to 3x
CASCADE_SECONDS: Final = 60.0  # how long the cascade lasts
CASCADE_SURGE: Final = 20  # the tape's rate during the cascade, as a multiple of the calm rate
CASCADE_CALM_TAPE: Final = 500.0  # trades/s over every coin on a calm day: ×20 is 10,000 trades/s
CASCADE_WIDE: Final = 1_000  # wide addresses holding a position when the cascade starts
CASCADE_MOVERS: Final = 200  # of them, flipped or liquidated during the cascade (every other one of each)
CASCADE_WHALE_FILLS_S: Final = 50.0  # fills a second of each precise whale
CASCADE_FILLS_PER_ORDER: Final = 5  # a whale's market order sweeps a few levels
CASCADE_COINS: Final = ("BTC", "ETH", "SOL", "HYPE")  # of the wide positions and the whales' orders
CASCADE_WIDE_LOTS: Final = 50  # a wide position's size, in lots of its coin
CASCADE_WIDE_SALT: Final = 0xCA5CADE  # keeps the wide addresses apart from the whales and the counterparties


def scenario_whales(name: str, seed: int = 0, whales: int | None = None) -> list[str]:
    """The whale addresses `run_scenario(name, seed, whales=...)` trades with, in order."""
    _check(name)
    count = whales if whales is not None else DEFAULT_WHALES[name]
    rng = random.Random(seed ^ WHALE_SALT)
    return [f"0x{rng.getrandbits(160):040x}" for _ in range(count)]


def _check(name: str) -> None:
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")


async def run_scenario(
    sim: SimServer,
    name: str,
    seed: int = 0,
    *,
    rate: float = DEFAULT_LOAD_RATE,
    whales: int | None = None,
    cycles: int | None = None,
    step_delay: float = DEFAULT_STEP_DELAY_S,
    max_fills: int | None = None,
    fills_per_order: int = DEFAULT_FILLS_PER_ORDER,
    cascade: Mapping[str, Any] | None = None,
) -> list[str]:
    """Run scenario `name` against `sim`; returns the whale addresses once it ends.

    `cycles` bounds the demo loop (None = forever); `rate`, `max_fills` (None = forever) and
    `fills_per_order` drive `load`; `cascade` holds `cascade_plan`'s sizes over its defaults. Everything random
    comes from `seed`.
    """
    addresses = scenario_whales(name, seed, whales)
    rng = random.Random(seed)
    ex = sim.exchange
    players = [ex.whale(a) for a in addresses]
    if name == "population":
        for _ in range(cycles or 1):
            await _population(ex, addresses, rng, step_delay)
        return addresses
    if name == "cascade":
        plan = cascade_plan(seed, **{"whales": len(addresses), **(cascade or {})})
        cascade_setup(ex, plan)
        await run_cascade(ex, plan)
        return addresses
    if name == "load":
        if rate <= 0 or fills_per_order < 1:
            raise ValueError("load needs rate > 0 and fills_per_order >= 1")
        await _load(ex, addresses, rng, rate, max_fills, fills_per_order)
        return addresses
    script = _SCRIPTS[name]
    cycle = 0
    while cycles is None or cycle < cycles:
        # Interleave the whales step by step: one whale's step k, the next whale's step k, ...
        pending = [script(_Ctx(ex, w, rng)) for w in players]
        while pending:
            for it in list(pending):
                try:
                    await it.__anext__()
                except StopAsyncIteration:
                    pending.remove(it)
                    continue
                await asyncio.sleep(step_delay)  # also yields at 0 so the server keeps serving
        cycle += 1
    return addresses


class _Ctx:
    """Helpers for scripts: seeded sizes and prices near the current mid, at the coin's lot size."""

    def __init__(self, ex: Exchange, whale: Whale, rng: random.Random) -> None:
        self.ex = ex
        self.w = whale
        self.rng = rng

    def px(self, coin: str) -> Decimal:
        mid = self.ex.mids[coin]
        jitter = Decimal(str(round(self.rng.uniform(-PRICE_JITTER, PRICE_JITTER), 6)))
        raw = mid * (1 + jitter)
        return raw.quantize(Decimal(1).scaleb(raw.adjusted() - 4))  # 5 significant figures like the exchange

    def sz(self, coin: str, px: Decimal) -> Decimal:
        lot = self.ex.lot_size(coin)
        notional = Decimal(self.rng.randrange(MIN_NOTIONAL, MAX_NOTIONAL))
        return max(lot, (notional / px).quantize(lot, rounding=ROUND_DOWN))

    def fills(self) -> int:
        return self.rng.randint(1, 4)


class AsyncSteps:
    """An async iterator over the steps of one whale's script (each `__anext__` runs one step)."""

    def __init__(self, steps: list[Callable[[], Awaitable[object]]]) -> None:
        self._steps = steps
        self._i = 0

    def __aiter__(self) -> AsyncSteps:
        return self

    async def __anext__(self) -> None:
        if self._i >= len(self._steps):
            raise StopAsyncIteration
        step = self._steps[self._i]
        self._i += 1
        await step()


def _demo(c: _Ctx) -> AsyncSteps:
    w = c.w

    async def open_long() -> None:
        px = c.px("BTC")
        await w.market_order("BTC", True, c.sz("BTC", px), px, fills=c.fills(), px_step=1)

    async def add_limit() -> None:
        px = c.px("BTC")
        size = c.sz("BTC", px)
        oid = await w.limit_order("BTC", True, size, px)
        lot = c.ex.lot_size("BTC")
        part = max(lot, (size / 3).quantize(lot, rounding=ROUND_DOWN))
        await w.fill(oid, part)
        await w.fill(oid)

    async def short_partial_cancel() -> None:
        opening, lowered = DEMO_ISOLATED_LEVERAGE
        if w.position("ETH") == 0:  # the margin type can only change while flat
            w.set_leverage("ETH", opening, "isolated")
        px = c.px("ETH")
        size = c.sz("ETH", px)
        oid = await w.limit_order("ETH", False, size, px)
        lot = c.ex.lot_size("ETH")
        await w.fill(oid, max(lot, (size / 2).quantize(lot, rounding=ROUND_DOWN)))
        await w.cancel(oid)
        w.set_leverage("ETH", lowered, "isolated")

    async def flip_btc() -> None:
        px = c.px("BTC")
        await w.market_order("BTC", False, w.position("BTC") * 2, px)  # one fill: `Long > Short`

    async def close_btc() -> None:
        await w.close("BTC", c.px("BTC"), fills=c.fills())

    async def builder_dex() -> None:
        px = c.px("xyz:XYZ100")
        await w.market_order("xyz:XYZ100", True, c.sz("xyz:XYZ100", px), px, fills=2)

    async def mark_and_funding() -> None:
        c.ex.set_mid("xyz:XYZ100", c.px("xyz:XYZ100"))
        c.ex.apply_funding("xyz:XYZ100", DEMO_FUNDING_RATE)

    async def close_builder() -> None:
        await w.close("xyz:XYZ100", c.px("xyz:XYZ100"))

    async def spot_buy() -> None:
        px = c.px("@107")
        size = (c.sz("@107", px) / 10).quantize(c.ex.lot_size("@107"), rounding=ROUND_DOWN)
        await w.market_order("@107", True, size, px, fills=2)
        purr = c.px("PURR/USDC")
        await w.market_order("PURR/USDC", True, Decimal(c.rng.randrange(10_000, 100_000)), purr)

    async def spot_sell() -> None:
        hype = w.spot_balance("HYPE")
        await w.market_order("@107", False, hype, c.px("@107"))
        await w.market_order("PURR/USDC", False, w.spot_balance("PURR"), c.px("PURR/USDC"))

    async def liquidation() -> None:
        px = c.px("SOL")
        await w.market_order("SOL", True, c.sz("SOL", px), px)
        mark = (px * LIQUIDATION_DISCOUNT).quantize(Decimal("0.01"))
        c.ex.set_mid("SOL", mark)
        await w.liquidate("SOL", mark_px=mark, fills=2)

    async def twap() -> None:
        px = c.px("HYPE")
        await w.twap("HYPE", True, c.sz("HYPE", px), slices=3, px=px, px_step="0.01")

    async def close_rest() -> None:
        for coin in ("HYPE", "ETH"):
            if w.position(coin) != 0:
                await w.close(coin, c.px(coin))

    return AsyncSteps(
        [
            open_long,
            add_limit,
            short_partial_cancel,
            flip_btc,
            close_btc,
            builder_dex,
            mark_and_funding,
            close_builder,
            spot_buy,
            spot_sell,
            liquidation,
            twap,
            close_rest,
        ]
    )


def _flip(c: _Ctx) -> AsyncSteps:
    w = c.w

    async def open_long() -> None:
        px = c.px("ETH")
        await w.market_order("ETH", True, c.sz("ETH", px), px, fills=3)

    async def to_short() -> None:
        # Two lots over twice the position: the first fill crosses zero, so it is a `Long > Short` fill.
        size = w.position("ETH") * 2 + c.ex.lot_size("ETH") * 2
        await w.market_order("ETH", False, size, c.px("ETH"), fills=2)

    async def to_long() -> None:
        await w.market_order("ETH", True, -w.position("ETH") * 3, c.px("ETH"), fills=2)

    async def close() -> None:
        await w.close("ETH", c.px("ETH"), fills=2)

    return AsyncSteps([open_long, to_short, to_long, close])


def _liquidation(c: _Ctx) -> AsyncSteps:
    w = c.w

    async def open_long() -> None:
        px = c.px("BTC")
        await w.market_order("BTC", True, c.sz("BTC", px), px, fills=2)

    async def liquidate_long() -> None:
        mark = (c.ex.mids["BTC"] * LIQUIDATION_DISCOUNT).quantize(Decimal(1))
        await w.liquidate("BTC", mark_px=mark, fills=3)

    async def open_short() -> None:
        px = c.px("ETH")
        await w.market_order("ETH", False, c.sz("ETH", px), px)

    async def liquidate_short() -> None:
        mark = (c.ex.mids["ETH"] * (2 - LIQUIDATION_DISCOUNT)).quantize(Decimal("0.1"))
        await w.liquidate("ETH", mark_px=mark)

    return AsyncSteps([open_long, liquidate_long, open_short, liquidate_short])


def _twap(c: _Ctx) -> AsyncSteps:
    w = c.w

    async def buy() -> None:
        px = c.px("SOL")
        await w.twap("SOL", True, c.sz("SOL", px), slices=5, px=px, px_step="0.01")

    async def sell() -> None:
        await w.twap("SOL", False, w.position("SOL"), slices=4, px=c.px("SOL"), px_step="0.01")

    return AsyncSteps([buy, sell])


_SCRIPTS: Final[dict[str, Callable[[_Ctx], AsyncSteps]]] = {
    "demo": _demo,
    "flip": _flip,
    "liquidation": _liquidation,
    "twap": _twap,
}


def population_roles(addresses: list[str]) -> dict[str, str]:
    """The label discovery should give each address of `scenario_whales("population", ...)`."""
    roles = [role for role, count in POPULATION_LAYOUT for _ in range(count)]
    return dict(zip(addresses, roles, strict=True))


async def _population(ex: Exchange, addresses: list[str], rng: random.Random, step_delay: float) -> None:
    """One cycle of the crowd (module docstring): makers and the engine account end flat, whales long."""
    roles = population_roles(addresses)
    makers = [a for a in addresses if roles[a] == "market_maker"]
    whales = [a for a in addresses if roles[a] == "directional"]
    wash_a, wash_b = (a for a in addresses if roles[a] == "wash_suspect")
    engine = next(a for a in addresses if roles[a] == "engine")

    def size(coin: str, usd: int) -> Decimal:
        lot = ex.lot_size(coin)
        return max(lot, (Decimal(usd) / ex.mids[coin] / lot).to_integral_value(ROUND_DOWN) * lot)

    for coin in POPULATION_COINS:
        for maker in makers:
            mid, sz = ex.mids[coin], size(coin, POPULATION_MAKER_USD)
            # Passive both ways: the bid and the ask each filled by the pool's takers.
            bid = ex.limit_order(maker, coin, True, sz, (mid * (1 - POPULATION_QUOTE_BP)).quantize(mid))
            ask = ex.limit_order(maker, coin, False, sz, (mid * (1 + POPULATION_QUOTE_BP)).quantize(mid))
            ex.fill_order(maker, bid)
            ex.fill_order(maker, ask)
        await asyncio.sleep(step_delay)
    for whale in whales:
        coin = POPULATION_COINS[rng.randrange(len(POPULATION_COINS))]
        ex.market_order(whale, coin, True, size(coin, POPULATION_WHALE_USD), ex.mids[coin], fills=3)
        await asyncio.sleep(step_delay)
    coin = "SOL"
    sz = size(coin, POPULATION_WHALE_USD)
    for _ in range(3):
        ex.market_order(wash_a, coin, True, sz, ex.mids[coin], counterparty=wash_b)
        ex.market_order(wash_b, coin, True, sz, ex.mids[coin], counterparty=wash_a)
    await asyncio.sleep(step_delay)
    twap = ex.twap_start(engine, "ETH", True, size("ETH", POPULATION_MAKER_USD) * POPULATION_TWAP_SLICES)
    for _ in range(POPULATION_TWAP_SLICES):
        ex.twap_slice(engine, "ETH", True, size("ETH", POPULATION_MAKER_USD), ex.mids["ETH"], twap)
    ex.twap_end(engine, twap)
    ex.liquidate(engine, "ETH", mark_px=ex.mids["ETH"] * LIQUIDATION_DISCOUNT)
    await asyncio.sleep(step_delay)


async def _load(
    ex: Exchange, addresses: list[str], rng: random.Random, rate: float, max_fills: int | None, per_order: int
) -> None:
    """Market orders at `rate` fills/s, round-robin over whales and coins; sides alternate per position."""
    loop = asyncio.get_running_loop()
    sizes = {coin: ex.lot_size(coin) * per_order * 10 for coin in LOAD_COINS}
    ticks = {coin: ex.mids[coin] / 10_000 for coin in LOAD_COINS}  # one price step = 1 bp
    burst = max(per_order, int(rate * LOAD_TICK_S * LOAD_MAX_BURST_TICKS))
    start = loop.time()
    done = 0
    k = 0
    while max_fills is None or done < max_fills:
        due = min(int((loop.time() - start) * rate) - done, burst)
        if max_fills is not None:
            due = min(due, max_fills - done)
        while due > 0:
            user = addresses[k % len(addresses)]
            coin = LOAD_COINS[(k // len(addresses)) % len(LOAD_COINS)]
            k += 1
            n = min(per_order, due)
            pos = ex.accounts[user].positions.get(coin)
            is_buy = pos is None or pos.szi <= 0
            base = ex.mids[coin] if pos is None else pos.entry_px
            px = (base + ticks[coin] * rng.randint(-5, 5)).quantize(ticks[coin])
            ex.market_order(user, coin, is_buy, sizes[coin], px, fills=n)
            done += n
            due -= n
        await asyncio.sleep(LOAD_TICK_S)


# ---------------------------------------------------------------------------------------------- cascade


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """Who takes part in a cascade and how hard it runs (module docstring, `cascade`)."""

    whales: tuple[str, ...]  # precise whales, trading all along
    wide: tuple[str, ...]  # wide addresses, each with one position (`cascade_setup`)
    movers: int  # the first `movers` of `wide` move: even indexes flip, odd ones are liquidated
    seconds: float = CASCADE_SECONDS
    surge: float = CASCADE_SURGE
    calm_tape: float = CASCADE_CALM_TAPE  # trades/s
    whale_fills_s: float = CASCADE_WHALE_FILLS_S
    fills_per_order: int = CASCADE_FILLS_PER_ORDER

    def coin_of(self, index: int) -> str:
        """The coin of wide address `index`'s position."""
        return CASCADE_COINS[index % len(CASCADE_COINS)]

    def kind_of(self, index: int) -> str:
        """What mover `index` does: `flip` or `liquidation`."""
        return "flip" if index % 2 == 0 else "liquidation"


@dataclass(slots=True)
class CascadeRecord:
    """What a cascade did, for end-to-end checks."""

    orders: list[tuple[int, float]] = field(default_factory=list)  # whale oid, wall time its frames were queued
    fills: int = 0  # of the whales' orders
    # One per mover: (address, coin, "flip" | "liquidation", exchange time of its fill in ms).
    events: list[tuple[str, str, str, int]] = field(default_factory=list)
    crowd_trades: int = 0
    elapsed_s: float = 0.0


def cascade_plan(
    seed: int = 0,
    *,
    whales: int = DEFAULT_WHALES["cascade"],
    wide: int = CASCADE_WIDE,
    movers: int = CASCADE_MOVERS,
    seconds: float = CASCADE_SECONDS,
    surge: float = CASCADE_SURGE,
    calm_tape: float = CASCADE_CALM_TAPE,
    whale_fills_s: float = CASCADE_WHALE_FILLS_S,
) -> CascadePlan:
    if not 0 <= movers <= wide or seconds <= 0 or surge <= 0 or calm_tape < 0 or whale_fills_s < 0:
        raise ValueError("cascade needs 0 <= movers <= wide, seconds > 0, surge > 0 and non-negative rates")
    rng = random.Random(seed ^ CASCADE_WIDE_SALT)
    return CascadePlan(
        whales=tuple(scenario_whales("cascade", seed, whales)),
        wide=tuple(f"0x{rng.getrandbits(160):040x}" for _ in range(wide)),
        movers=movers,
        seconds=seconds,
        surge=surge,
        calm_tape=calm_tape,
        whale_fills_s=whale_fills_s,
    )


def cascade_setup(ex: Exchange, plan: CascadePlan) -> None:
    """Every wide address opens its position (longs and shorts alternating); run before the watcher starts."""
    for i, address in enumerate(plan.wide):
        coin = plan.coin_of(i)
        ex.market_order(address, coin, i % 4 < 2, ex.lot_size(coin) * CASCADE_WIDE_LOTS, ex.mids[coin])


def _split(total: int, parts: int, offset: int) -> list[int]:
    """`total` spread over `parts` as evenly as integers allow, the remainder starting at `offset`."""
    base, rest = divmod(total, parts)
    return [base + (1 if (i - offset) % parts < rest else 0) for i in range(parts)]


async def run_cascade(ex: Exchange, plan: CascadePlan) -> CascadeRecord:
    """The cascade itself (module docstring), paced on the loop's clock.

    Its totals follow from the plan (rate × `seconds` of each kind) and the whales' orders and the movers run in
    the order of their due times, whatever the pacing: oids and the ledger depend on the seed alone. A loop that
    fell behind catches up (the tape at most `LOAD_MAX_BURST_TICKS` ticks at once), so the run can last longer
    than `seconds`, never shorter, and always does everything."""
    loop = asyncio.get_running_loop()
    record = CascadeRecord()
    coins = sorted(ex.mids)  # every coin: perps of every dex and the spot pairs
    tape_rate = plan.calm_tape * plan.surge
    whale_rate = plan.whale_fills_s * len(plan.whales)
    per_order = plan.fills_per_order
    tape_total = int(tape_rate * plan.seconds)
    orders_total = int(whale_rate * plan.seconds) // per_order if plan.whales else 0
    sizes = {coin: ex.lot_size(coin) * per_order * 10 for coin in CASCADE_COINS}
    tape_burst = max(1, int(tape_rate * LOAD_TICK_S * LOAD_MAX_BURST_TICKS))

    def order_due(k: int) -> float:
        return (k + 1) * per_order / whale_rate

    def move_due(m: int) -> float:
        return (m + 0.5) * plan.seconds / plan.movers

    start = loop.time()
    started = time.perf_counter()
    tape_done = order_n = moved = tick = 0
    while tape_done < tape_total or order_n < orders_total or moved < plan.movers:
        elapsed = loop.time() - start
        due = min(min(int(elapsed * tape_rate), tape_total) - tape_done, tape_burst)
        if due > 0:
            for coin, n in zip(coins, _split(due, len(coins), tick), strict=True):
                record.crowd_trades += len(ex.crowd_trades(coin, n))
            tape_done += due
        while True:
            next_order = order_due(order_n) if order_n < orders_total else math.inf
            next_move = move_due(moved) if moved < plan.movers else math.inf
            if min(next_order, next_move) > elapsed:
                break
            if next_order <= next_move:
                record.orders.append((_whale_order(ex, plan, order_n, sizes), time.time()))
                record.fills += per_order
                order_n += 1
            else:
                record.events.append(_move(ex, plan, moved))
                moved += 1
        tick += 1
        await asyncio.sleep(LOAD_TICK_S)
    record.elapsed_s = time.perf_counter() - started
    return record


def _whale_order(ex: Exchange, plan: CascadePlan, n: int, sizes: dict[str, Decimal]) -> int:
    """Order `n` of the whales, round-robin over whales and coins; a long is closed, flat or short buys."""
    user = plan.whales[n % len(plan.whales)]
    coin = CASCADE_COINS[(n // len(plan.whales)) % len(CASCADE_COINS)]
    pos = ex.accounts[user].positions.get(coin) if user in ex.accounts else None
    is_buy = pos is None or pos.szi <= 0
    return ex.market_order(user, coin, is_buy, sizes[coin], ex.mids[coin], fills=plan.fills_per_order)


def _move(ex: Exchange, plan: CascadePlan, index: int) -> tuple[str, str, str, int]:
    address, coin, kind = plan.wide[index], plan.coin_of(index), plan.kind_of(index)
    szi = ex.accounts[address].positions[coin].szi
    if kind == "flip":
        ex.market_order(address, coin, szi < 0, abs(szi) * 2, ex.mids[coin])
    else:
        ex.liquidate(address, coin, mark_px=ex.mids[coin])
    return address, coin, kind, ex.accounts[address].fills[-1].time
