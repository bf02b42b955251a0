"""In-memory exchange model behind the simulator: accounts, orders, fills, trades, positions, ledger.

No I/O. Every change is reported to an `ExchangeListener` (the server) as wire-ready msgspec Structs, so a
frame is encoded once however many connections receive it. The structs here copy the real key order and
omit optional keys exactly where the exchange omits them (`cloid` absent, never `null`, on fills and
order updates; `twapId: null` always present on fills; `cloid: null` present on REST frontend orders).

Whale scripting (all coroutines, none of them suspend unless `interval` is given):

    w = sim.exchange.whale("0xabc...")            # lowercase address; perp USDC and spot balances seeded
    oid = await w.market_order("BTC", True, "0.5", "80000", fills=3)
    oid = await w.limit_order("ETH", False, "2", "2400")    # orderUpdates `open`
    await w.fill(oid, "0.5")                               # partial maker fill
    await w.cancel(oid)                                    # `canceled` with the unfilled remainder
    await w.close("BTC", "80100")                          # reduce-only market order of the position
    await w.liquidate("ETH", mark_px="2500")               # dir "Liquidated Cross Short", liquidation block, zero hash
    twap_id = await w.twap("SOL", True, "30", slices=3, px="95")   # twapId set, zero hash
    oid = await w.reject_order("SOL", True, "1000", "50", status="perpMarginRejected")

Fills carry a correct `startPosition`, `dir` (flips as `Long > Short` / `Short > Long`), `closedPnl`,
`fee`, increasing `tid`s and oids above 2^32. Every trade also appears on the public `trades` feed with
`users: [buyer, seller]` (the counterparty is a seeded non-whale address) and the aggressor's `side`.
`exchange.ledger` records what each order did (per `dir`: size, VWAP, fill count) for end-to-end checks.

Positions and margin (the account ledger; `clearinghouseState`, `allDexsClearinghouseState`, `spotState` and
their REST forms are views of it, computed at the current marks whenever they are asked for):

    w.set_leverage("ETH", 5, "isolated")          # per whale and coin; default cross, min(10, maxLeverage)
    w.set_balance("25000", dex="xyz")             # the dex's cross cash (a deposit or a withdrawal)
    sim.exchange.set_mid("ETH", "2100")           # move a mark without a trade (pushes allMids)
    sim.exchange.apply_funding("ETH", "0.0001")   # one funding payment on every open ETH position
    sim.exchange.dex_view(addr, "")               # the numbers the next state frame carries (`DexView`)

Rules (exact `Decimal`s, nothing rounded for display, so a client's own arithmetic can be checked exactly;
cash amounts, i.e. fees, closed PnL, funding and isolated margin, are kept at 6 decimals like USDC):
- mark: the coin's mid, i.e. its last trade price unless `set_mid` moved it since;
- size and entry: signed `szi`; entry on an open is the fill price, on an increase
  `(|old|·entry + |fill|·px) ÷ |new|`, unchanged on a reduce, the fill price after a flip;
- `positionValue = |szi|·mark`, `unrealizedPnl = szi·(mark − entry)`,
  `returnOnEquity = unrealizedPnl ÷ (|szi|·entry ÷ leverage)`;
- margin: cross `marginUsed = positionValue ÷ leverage`; isolated positions hold their own margin `M`
  (`|fill|·px ÷ leverage` moved out of the dex's cash on every increase, released pro rata on a reduce, reset
  to `|szi|·entry ÷ leverage` when the leverage value changes) and show `marginUsed = M + unrealizedPnl` and
  `leverage.rawUsd = M − szi·entry`, as the exchange does; the sim refuses a change of margin type while a
  position is open (`ValueError`);
- maintenance margin of a position: `positionValue ÷ (2·maxLeverage)`;
- liquidation price, where equity meets maintenance margin with every other mark held where it is:
  cross `(szi·entry − cash − Σ others (unrealizedPnl − maintenance)) ÷ (szi − |szi| ÷ (2·maxLeverage))` over
  the dex's other cross positions; isolated `(szi·entry − M) ÷ (szi − |szi| ÷ (2·maxLeverage))`;
  `null` when that price is not positive (nothing can liquidate the position) or the account is flat;
- funding (only when a script calls `apply_funding`): `szi·mark·rate`, positive = paid by the position, out
  of the cash (cross) or of `M` (isolated); `cumFunding.allTime` per coin over the account's life,
  `sinceOpen` since the position opened (or flipped), `sinceChange` since its size last changed;
- per dex: cash = deposit + closed PnL − fees − funding − isolated margin held; cross account value =
  cash + Σ cross unrealized PnL; `accountValue` = that + Σ isolated `M + unrealizedPnl` (so deposit + closed
  PnL − fees − funding + Σ unrealized PnL); `totalNtlPos` = Σ positionValue; `totalRawUsd` = accountValue −
  Σ szi·mark; `totalMarginUsed` = Σ marginUsed; `crossMarginSummary` the same over cross positions only;
  `crossMaintenanceMarginUsed` = Σ cross maintenance; `withdrawable` = max(0, cross account value − cross
  margin used). The first dex starts with `DEFAULT_USDC`, each builder dex with `DEFAULT_DEX_USDC`;
- spot: `total` and `entryNtl` follow the fills (a sell removes its share of `entryNtl` at the average cost);
  `hold` is what resting orders reserve (the base size of sells, the quote notional of buys).
A state's `time` is strictly before any later fill's time (fills stamped in the same millisecond move one ms
on), so a client may take every fill at or before a state's time as included in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Final, Literal, Protocol, TypeAlias

import msgspec

Side: TypeAlias = Literal["B", "A"]
Num: TypeAlias = Decimal | str | int | float

ZERO: Final = Decimal(0)
MS_PER_S: Final = 1000
ZERO_HASH: Final = "0x" + "0" * 64
USDC_DECIMALS: Final = Decimal("0.000001")  # USDC amounts (fees, PnL) have 6 decimals on the wire
TAKER_FEE: Final = Decimal("0.00045")  # base-tier taker fee on Hyperliquid perps
MAKER_FEE: Final = Decimal("0.00015")  # base-tier maker fee
DEFAULT_USDC: Final = Decimal(1_000_000)  # a whale's starting perp collateral
DEFAULT_SPOT_USDC: Final = Decimal(250_000)  # a whale's starting spot USDC
DEFAULT_DEX_USDC: Final = Decimal(100_000)  # collateral a whale keeps on each builder dex
DEFAULT_LEVERAGE: Final = 10  # leverage of a coin until a script sets one (capped at the coin's maxLeverage)
MAINTENANCE_DIVISOR: Final = 2  # maintenance margin is half the initial margin at max leverage
LEVERAGE_TYPES: Final = ("cross", "isolated")
OID_BASE: Final = 300_000_000_000  # live oids are ~3e11, well above 2^32 (clients must use 64-bit ints)
TID_BASE: Final = 100_000_000_000_000  # live tids are ~1e14-1e15 (50-bit hashes)
TWAP_ID_BASE: Final = 2_000_000  # live twapIds are ~2e6
LID_BASE: Final = 100_000_000  # liquidation event ids
ID_SPREAD: Final = 1_000_000_000  # seeded offset range so two seeds give different oids/tids
SMALL_ID_SPREAD: Final = 1_000_000  # the same for the smaller twapId/lid ranges
COUNTERPARTIES: Final = 64  # size of the seeded pool of non-whale counterparties
DEFAULT_FILL_HISTORY: Final = 10_000  # only the newest 10000 fills of a user are reachable (docs/protocol.md §4)
DEFAULT_ORDER_HISTORY: Final = 100_000  # orders remembered per user for orderStatus; older ones are unknownOid
TWAP_HISTORY: Final = 100  # TWAP states kept per user for the `userTwapHistory` snapshot
TWAP_MINUTES: Final = 5  # the exchange's shortest TWAP (the sim runs its slices as fast as the script asks)
FAKE_FUNDING: Final = "0.0000125"  # the exchange's resting hourly funding rate
FAKE_OPEN_INTEREST: Final = "1000.0"  # asset contexts need a value; nothing reads it
FAKE_SUPPLY: Final = "1000000000.0"  # spot contexts need a value; nothing reads it
DEFAULT_RECENT_TRADES: Final = 100  # public trades kept per coin for replay and recentTrades


# --------------------------------------------------------------------------------------- wire formatting


def wire_decimal(value: Decimal) -> str:
    """Plain decimal string as the exchange writes it: no exponent, at least one fractional digit."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0")
        if text.endswith("."):
            text += "0"
    else:
        text += ".0"
    return "0.0" if text == "-0.0" else text


def to_decimal(value: Num) -> Decimal:
    """Script input to `Decimal`; floats go through `str` so 0.1 stays 0.1."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(str(value))
    return Decimal(value)


class _Out(msgspec.Struct, rename="camel", omit_defaults=True, frozen=True, gc=False, kw_only=True):
    """Outbound wire object. Only keys the exchange may omit have defaults; the rest are always written."""


class WireLiquidation(_Out, frozen=True, kw_only=True):
    liquidated_user: str | None = None
    mark_px: str
    method: str


class WireFill(_Out, frozen=True, kw_only=True):
    coin: str
    px: str
    sz: str
    side: Side
    time: int
    start_position: str
    dir: str
    closed_pnl: str
    hash: str
    oid: int
    crossed: bool
    fee: str
    tid: int
    cloid: str | None = None
    liquidation: WireLiquidation | None = None
    fee_token: str
    twap_id: int | None


class WireBasicOrder(_Out, frozen=True, kw_only=True):
    """Order inside `orderUpdates` and REST `openOrders`: no `user`, `cloid` omitted when absent."""

    coin: str
    side: Side
    limit_px: str
    sz: str
    oid: int
    timestamp: int
    orig_sz: str
    cloid: str | None = None


class WireOrderUpdate(_Out, frozen=True, kw_only=True):
    order: WireBasicOrder
    status: str
    status_timestamp: int


class WireFrontendOrder(msgspec.Struct, rename="camel", frozen=True, gc=False, kw_only=True):
    """REST frontend order (`frontendOpenOrders`, `orderStatus`, `historicalOrders`): `cloid: null` is written."""

    coin: str
    side: Side
    limit_px: str
    sz: str
    oid: int
    timestamp: int
    trigger_condition: str
    is_trigger: bool
    trigger_px: str
    children: list[WireFrontendOrder]
    is_position_tpsl: bool
    reduce_only: bool
    order_type: str
    orig_sz: str
    tif: str | None
    cloid: str | None


class WireOrderStatusEntry(_Out, frozen=True, kw_only=True):
    order: WireFrontendOrder
    status: str
    status_timestamp: int


class WireTrade(_Out, frozen=True, kw_only=True):
    coin: str
    side: Side
    px: str
    sz: str
    time: int
    hash: str
    tid: int
    users: tuple[str, str]


class WireTwapState(_Out, frozen=True, kw_only=True):
    coin: str
    user: str
    side: Side
    sz: str
    executed_sz: str
    executed_ntl: str
    minutes: int
    reduce_only: bool
    randomize: bool
    timestamp: int


class WireTwapStatus(_Out, frozen=True, kw_only=True):
    status: str


class WireTwapHistoryEntry(_Out, frozen=True, kw_only=True):
    """One `userTwapHistory` entry; `time` is in seconds, as captured."""

    time: int
    state: WireTwapState
    status: WireTwapStatus
    twap_id: int


class WireLiquidationEvent(msgspec.Struct, frozen=True, gc=False):
    """The `liquidation` event of the `user` channel; its keys are snake_case on the wire."""

    lid: int
    liquidator: str
    liquidated_user: str
    liquidated_ntl_pos: str
    liquidated_account_value: str


class WireUserFunding(_Out, frozen=True, kw_only=True):
    """The `funding` event of the `user` channel: `usdc` negative = paid."""

    time: int
    coin: str
    usdc: str
    szi: str
    funding_rate: str
    n_samples: int | None = None


class WireCumFunding(_Out, frozen=True, kw_only=True):
    all_time: str
    since_open: str
    since_change: str


class WireLeverage(_Out, frozen=True, kw_only=True):
    type: str
    value: int
    raw_usd: str | None = None


class WirePosition(_Out, frozen=True, kw_only=True):
    coin: str
    cum_funding: WireCumFunding
    entry_px: str
    leverage: WireLeverage
    liquidation_px: str | None
    margin_used: str
    max_leverage: int
    position_value: str
    return_on_equity: str
    szi: str
    unrealized_pnl: str


class WireAssetPosition(_Out, frozen=True, kw_only=True):
    position: WirePosition
    type: str


class WireMarginSummary(_Out, frozen=True, kw_only=True):
    account_value: str
    total_ntl_pos: str
    total_raw_usd: str
    total_margin_used: str


class WireClearinghouseState(_Out, frozen=True, kw_only=True):
    margin_summary: WireMarginSummary
    cross_margin_summary: WireMarginSummary
    cross_maintenance_margin_used: str
    withdrawable: str
    asset_positions: list[WireAssetPosition]
    time: int


class WireSpotBalance(_Out, frozen=True, kw_only=True):
    coin: str
    token: int
    hold: str
    total: str
    entry_ntl: str


class WireSpotState(_Out, frozen=True, kw_only=True):
    balances: list[WireSpotBalance]


# --------------------------------------------------------------------------------------- universe


@dataclass(frozen=True, slots=True)
class PerpAsset:
    name: str
    sz_decimals: int
    max_leverage: int
    mid: Decimal
    margin_table_id: int

    @property
    def dex(self) -> str:
        return self.name.split(":", 1)[0] if ":" in self.name else ""


@dataclass(frozen=True, slots=True)
class SpotToken:
    name: str
    index: int
    sz_decimals: int
    wei_decimals: int


@dataclass(frozen=True, slots=True)
class SpotPair:
    name: str
    index: int
    base: SpotToken
    quote: SpotToken
    mid: Decimal


_USDC = SpotToken("USDC", 0, 8, 8)
_PURR = SpotToken("PURR", 1, 0, 5)
_HYPE = SpotToken("HYPE", 150, 2, 8)
_UBTC = SpotToken("UBTC", 197, 5, 10)

PERP_DEXES: Final = ("", "xyz")  # the first perp dex and one HIP-3 builder dex
PERPS: Final = (
    PerpAsset("BTC", 5, 40, Decimal("80000.0"), 56),
    PerpAsset("ETH", 4, 25, Decimal("2300.0"), 55),
    PerpAsset("SOL", 2, 20, Decimal("95.0"), 54),
    PerpAsset("HYPE", 2, 10, Decimal("40.0"), 53),
    PerpAsset("xyz:XYZ100", 4, 20, Decimal("25000.0"), 54),
    PerpAsset("xyz:TSLA", 3, 10, Decimal("420.0"), 53),
)
SPOT_TOKENS: Final = (_USDC, _PURR, _HYPE, _UBTC)
SPOT_PAIRS: Final = (
    SpotPair("PURR/USDC", 0, _PURR, _USDC, Decimal("0.067")),
    SpotPair("@107", 107, _HYPE, _USDC, Decimal("40.0")),
    SpotPair("@142", 142, _UBTC, _USDC, Decimal("80000.0")),
)


class Universe:
    """The sim's fixed markets: perps on two dexes and three spot pairs (real names and indexes)."""

    def __init__(self) -> None:
        self.perps: dict[str, PerpAsset] = {p.name: p for p in PERPS}
        self.spot: dict[str, SpotPair] = {p.name: p for p in SPOT_PAIRS}
        self.tokens: dict[str, SpotToken] = {t.name: t for t in SPOT_TOKENS}

    def is_coin(self, coin: str) -> bool:
        return coin in self.perps or coin in self.spot

    def perps_of(self, dex: str) -> list[PerpAsset]:
        return [p for p in PERPS if p.dex == dex]

    def meta(self, dex: str) -> dict[str, object]:
        tables = sorted({p.margin_table_id: p.max_leverage for p in self.perps_of(dex)}.items())
        return {
            "universe": [
                {
                    "szDecimals": p.sz_decimals,
                    "name": p.name,
                    "maxLeverage": p.max_leverage,
                    "marginTableId": p.margin_table_id,
                }
                for p in self.perps_of(dex)
            ],
            "marginTables": [
                [tid, {"description": "", "marginTiers": [{"lowerBound": "0.0", "maxLeverage": lev}]}]
                for tid, lev in tables
            ],
            "collateralToken": 0,
        }

    def spot_meta(self) -> dict[str, object]:
        return {
            "universe": [
                {"tokens": [p.base.index, p.quote.index], "name": p.name, "index": p.index, "isCanonical": p.index == 0}
                for p in SPOT_PAIRS
            ],
            "tokens": [
                {
                    "name": t.name,
                    "szDecimals": t.sz_decimals,
                    "weiDecimals": t.wei_decimals,
                    "index": t.index,
                    "tokenId": "0x" + hashlib.md5(t.name.encode()).hexdigest(),
                    "isCanonical": True,
                    "evmContract": None,
                    "fullName": None,
                }
                for t in SPOT_TOKENS
            ],
        }

    @staticmethod
    def perp_dexs() -> list[object]:
        return [
            None,
            *(
                {
                    "name": d,
                    "fullName": f"{d.upper()} builder dex",
                    "deployer": "0x" + hashlib.md5(d.encode()).hexdigest() + "00000000",
                    "oracleUpdater": None,
                    "feeRecipient": None,
                    "assetToStreamingOiCap": [],
                }
                for d in PERP_DEXES[1:]
            ),
        ]


# --------------------------------------------------------------------------------------- ledger


@dataclass(slots=True)
class DirTotal:
    """What one order did under one `dir`: total size, notional and fill count."""

    dir: str
    size: Decimal = ZERO
    notional: Decimal = ZERO
    fills: int = 0

    @property
    def vwap(self) -> Decimal:
        return self.notional / self.size if self.size else ZERO


@dataclass(slots=True)
class LedgerOrder:
    """Ground truth for one order: per-`dir` totals in first-seen order, position before and after."""

    user: str
    oid: int
    coin: str
    side: Side
    kind: str  # market | limit | liquidation | twap_slice | rejected
    twap_id: int | None
    status: str
    orig_sz: Decimal
    position_before: Decimal | None = None
    position_after: Decimal | None = None
    totals: dict[str, DirTotal] = field(default_factory=dict)

    def key(self) -> tuple[object, ...]:
        """Everything but wall-clock times: equal for equal seeds."""
        return (
            self.user,
            self.oid,
            self.coin,
            self.side,
            self.kind,
            self.twap_id,
            self.status,
            str(self.orig_sz),
            str(self.position_before),
            str(self.position_after),
            tuple((t.dir, str(t.size), str(t.vwap), t.fills) for t in self.totals.values()),
        )


class Ledger:
    """Every order the exchange saw, by oid, in creation order."""

    def __init__(self) -> None:
        self.orders: dict[int, LedgerOrder] = {}

    def for_user(self, user: str) -> list[LedgerOrder]:
        user = user.lower()
        return [o for o in self.orders.values() if o.user == user]

    def twap_totals(self, twap_id: int) -> dict[str, DirTotal]:
        """Per-`dir` totals over every slice of one TWAP."""
        out: dict[str, DirTotal] = {}
        for o in self.orders.values():
            if o.twap_id != twap_id:
                continue
            for t in o.totals.values():
                acc = out.setdefault(t.dir, DirTotal(t.dir))
                acc.size += t.size
                acc.notional += t.notional
                acc.fills += t.fills
        return out

    def digest(self) -> list[tuple[object, ...]]:
        return [o.key() for o in self.orders.values()]


# --------------------------------------------------------------------------------------- accounts


class ExchangeListener(Protocol):
    """Receives every change as wire Structs. The server encodes each batch once and fans it out."""

    def on_fills(self, user: str, fills: Sequence[WireFill]) -> None: ...

    def on_order_updates(self, user: str, updates: Sequence[WireOrderUpdate]) -> None: ...

    def on_trades(self, coin: str, trades: Sequence[WireTrade]) -> None: ...

    def on_liquidation(self, user: str, event: WireLiquidationEvent) -> None: ...

    def on_twap_history(self, user: str, entries: Sequence[WireTwapHistoryEntry]) -> None: ...


class MarkListener(Protocol):
    """Receives mark moves and funding payments (kept apart from `ExchangeListener`, whose implementers
    outside the server only relay order flow)."""

    def on_mids(self, coins: Collection[str]) -> None: ...

    def on_funding(self, user: str, event: WireUserFunding) -> None: ...


@dataclass(frozen=True, slots=True)
class LeverageSetting:
    type: Literal["cross", "isolated"]
    value: int


@dataclass(slots=True)
class PerpPosition:
    """An open position in the ledger (a flat coin has none). Leverage lives in `Account.leverage`."""

    szi: Decimal = ZERO
    entry_px: Decimal = ZERO
    isolated_margin: Decimal = ZERO  # `M` of an isolated position, 0 for cross
    funding_since_open: Decimal = ZERO
    funding_since_change: Decimal = ZERO


@dataclass(slots=True)
class DexLedger:
    """Cash of one perp dex and where it came from (see the module docstring for how they add up)."""

    deposited: Decimal
    cash: Decimal
    realized_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    funding: Decimal = ZERO  # paid (positive) or received (negative), cross and isolated


@dataclass(slots=True)
class _SpotBalance:
    total: Decimal = ZERO
    entry_ntl: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class PositionView:
    """One position valued at the current mark: exactly the numbers its state frame carries."""

    coin: str
    dex: str
    szi: Decimal
    entry_px: Decimal
    leverage_type: Literal["cross", "isolated"]
    leverage: int
    max_leverage: int
    mark_px: Decimal
    position_value: Decimal
    unrealized_pnl: Decimal
    return_on_equity: Decimal
    margin_used: Decimal
    maintenance_margin: Decimal
    liquidation_px: Decimal | None
    raw_usd: Decimal | None  # isolated only
    isolated_margin: Decimal
    funding_all_time: Decimal
    funding_since_open: Decimal
    funding_since_change: Decimal

    @property
    def liquidation_distance(self) -> Decimal | None:
        """`|mark − liquidation price| ÷ mark`, None without a liquidation price."""
        if self.liquidation_px is None:
            return None
        return abs(self.mark_px - self.liquidation_px) / self.mark_px


@dataclass(frozen=True, slots=True)
class DexView:
    """One perp dex of one account at the current marks: exactly the numbers its state frame carries."""

    dex: str
    account_value: Decimal
    total_ntl_pos: Decimal
    total_raw_usd: Decimal
    total_margin_used: Decimal
    cross_account_value: Decimal
    cross_ntl_pos: Decimal
    cross_raw_usd: Decimal
    cross_margin_used: Decimal
    cross_maintenance_margin_used: Decimal
    withdrawable: Decimal
    positions: tuple[PositionView, ...]

    def position(self, coin: str) -> PositionView | None:
        return next((p for p in self.positions if p.coin == coin), None)


@dataclass(frozen=True, slots=True)
class SpotBalanceView:
    """One spot token balance as `spotState` shows it."""

    coin: str
    token: int
    total: Decimal
    hold: Decimal
    entry_ntl: Decimal


@dataclass(slots=True)
class Order:
    oid: int
    user: str
    coin: str
    side: Side
    limit_px: Decimal
    orig_sz: Decimal
    sz: Decimal
    timestamp: int
    order_type: str
    tif: str | None
    reduce_only: bool
    cloid: str | None
    twap_id: int | None = None
    status: str = "open"
    status_timestamp: int = 0

    def basic(self) -> WireBasicOrder:
        return WireBasicOrder(
            coin=self.coin,
            side=self.side,
            limit_px=wire_decimal(self.limit_px),
            sz=wire_decimal(self.sz),
            oid=self.oid,
            timestamp=self.timestamp,
            orig_sz=wire_decimal(self.orig_sz),
            cloid=self.cloid,
        )

    def update(self) -> WireOrderUpdate:
        return WireOrderUpdate(order=self.basic(), status=self.status, status_timestamp=self.status_timestamp)

    def frontend(self) -> WireFrontendOrder:
        return WireFrontendOrder(
            coin=self.coin,
            side=self.side,
            limit_px=wire_decimal(self.limit_px),
            sz=wire_decimal(self.sz),
            oid=self.oid,
            timestamp=self.timestamp,
            trigger_condition="N/A",
            is_trigger=False,
            trigger_px="0.0",
            children=[],
            is_position_tpsl=False,
            reduce_only=self.reduce_only,
            order_type=self.order_type,
            orig_sz=wire_decimal(self.orig_sz),
            tif=self.tif,
            cloid=self.cloid,
        )

    def status_entry(self) -> WireOrderStatusEntry:
        return WireOrderStatusEntry(order=self.frontend(), status=self.status, status_timestamp=self.status_timestamp)


class Account:
    """One address: perp cash per dex, positions, leverage settings, spot balances, fill and order history."""

    def __init__(
        self,
        address: str,
        usdc: Decimal,
        spot_usdc: Decimal,
        fill_limit: int,
        order_limit: int,
        dex_usdc: Decimal = DEFAULT_DEX_USDC,
    ) -> None:
        self.address = address
        self.dexes: dict[str, DexLedger] = {
            dex: DexLedger(deposited=start, cash=start)
            for dex, start in ((d, usdc if d == "" else dex_usdc) for d in PERP_DEXES)
        }
        self.positions: dict[str, PerpPosition] = {}
        self.leverage: dict[str, LeverageSetting] = {}  # coins a script set; the others use the default
        self.funding_all_time: dict[str, Decimal] = {}
        self.spot: dict[str, _SpotBalance] = {"USDC": _SpotBalance(spot_usdc, ZERO)} if spot_usdc else {}
        self.fills: deque[WireFill] = deque(maxlen=fill_limit)
        self.orders: OrderedDict[int, Order] = OrderedDict()
        self.open_orders: dict[int, Order] = {}
        self.twaps: OrderedDict[int, WireTwapHistoryEntry] = OrderedDict()  # newest state per twapId
        self._order_limit = order_limit

    @property
    def usdc(self) -> Decimal:
        """Cash on the first perp dex."""
        return self.dexes[""].cash

    def remember(self, order: Order) -> None:
        self.orders[order.oid] = order
        while len(self.orders) > self._order_limit:
            self.orders.popitem(last=False)

    def find_order(self, oid: int | str) -> Order | None:
        if isinstance(oid, int):
            return self.orders.get(oid)
        wanted = oid.lower()
        return next((o for o in reversed(self.orders.values()) if o.cloid is not None and o.cloid == wanted), None)


@dataclass(frozen=True, slots=True)
class _Piece:
    sz: Decimal
    px: Decimal


# --------------------------------------------------------------------------------------- exchange


class Exchange:
    """The in-memory exchange. Synchronous core; `Whale` wraps it in the async scripting API."""

    def __init__(
        self,
        *,
        seed: int = 0,
        fill_history_limit: int = DEFAULT_FILL_HISTORY,
        order_history_limit: int = DEFAULT_ORDER_HISTORY,
        recent_trades: int = DEFAULT_RECENT_TRADES,
        record_ledger: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.universe = Universe()
        self.ledger = Ledger()
        self.listener: ExchangeListener | None = None
        self.mark_listener: MarkListener | None = None
        # Fault: push an order's status update before its fills (the service must park it).
        self.status_before_fills = False
        self._rng = random.Random(seed)
        self._next_oid = OID_BASE + self._rng.randrange(ID_SPREAD)
        self._next_tid = TID_BASE + self._rng.randrange(ID_SPREAD)
        self._next_twap = TWAP_ID_BASE + self._rng.randrange(SMALL_ID_SPREAD)
        self._next_lid = LID_BASE + self._rng.randrange(SMALL_ID_SPREAD)
        self.counterparties = [self._address() for _ in range(COUNTERPARTIES)]
        self._fill_limit = fill_history_limit
        self._order_limit = order_history_limit
        self._record = record_ledger
        self._clock = clock
        self._last_ms = 0
        self._state_ms = 0  # time of the newest state view handed out: later fills are stamped after it
        self.accounts: dict[str, Account] = {}
        self.mids: dict[str, Decimal] = {p.name: p.mid for p in PERPS} | {s.name: s.mid for s in SPOT_PAIRS}
        self.day_ntl_vlm: dict[str, Decimal] = dict.fromkeys(self.mids, ZERO)
        self.recent_trades: dict[str, deque[WireTrade]] = {c: deque(maxlen=recent_trades) for c in self.mids}

    # ---------------------------------------------------------------- helpers

    def _address(self) -> str:
        return f"0x{self._rng.getrandbits(160):040x}"

    @property
    def clock(self) -> Callable[[], float]:
        """Wall clock (seconds) that stamps fills and orders; replace it to simulate skew or jumps."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def now_ms(self) -> int:
        """Wall-clock milliseconds that never go backwards."""
        ms = max(self._last_ms, int(self._clock() * MS_PER_S))
        self._last_ms = ms
        return ms

    def _oid(self) -> int:
        self._next_oid += 1
        return self._next_oid

    def _tid(self) -> int:
        self._next_tid += 1
        return self._next_tid

    def _hash(self) -> str:
        return f"0x{self._rng.getrandbits(256):064x}"

    def _counterparty(self) -> str:
        return self.counterparties[self._rng.randrange(COUNTERPARTIES)]

    def whale(
        self,
        address: str,
        *,
        usdc: Num = DEFAULT_USDC,
        spot_usdc: Num = DEFAULT_SPOT_USDC,
        dex_usdc: Num = DEFAULT_DEX_USDC,
    ) -> Whale:
        """The scripting handle for `address` (created with starting balances on first use)."""
        return Whale(self, self.account(address, usdc=usdc, spot_usdc=spot_usdc, dex_usdc=dex_usdc))

    def account(
        self,
        address: str,
        *,
        usdc: Num = DEFAULT_USDC,
        spot_usdc: Num = DEFAULT_SPOT_USDC,
        dex_usdc: Num = DEFAULT_DEX_USDC,
    ) -> Account:
        """`address`'s account; `usdc` (first dex), `dex_usdc` (each builder dex) and `spot_usdc` seed a new one."""
        addr = address.lower()
        acct = self.accounts.get(addr)
        if acct is None:
            acct = Account(
                addr, to_decimal(usdc), to_decimal(spot_usdc), self._fill_limit, self._order_limit, to_decimal(dex_usdc)
            )
            self.accounts[addr] = acct
        return acct

    def _check_coin(self, coin: str) -> None:
        if not self.universe.is_coin(coin):
            raise ValueError(f"unknown coin {coin!r}; known: {sorted(self.mids)}")

    def _new_order(
        self,
        acct: Account,
        coin: str,
        is_buy: bool,
        sz: Decimal,
        px: Decimal,
        *,
        order_type: str,
        tif: str | None,
        reduce_only: bool,
        cloid: str | None,
        kind: str,
        twap_id: int | None = None,
    ) -> Order:
        self._check_coin(coin)
        if sz <= 0 or px <= 0:
            raise ValueError(f"size and price must be positive, got sz={sz} px={px}")
        now = self.now_ms()
        order = Order(
            oid=self._oid(),
            user=acct.address,
            coin=coin,
            side="B" if is_buy else "A",
            limit_px=px,
            orig_sz=sz,
            sz=sz,
            timestamp=now,
            order_type=order_type,
            tif=tif,
            reduce_only=reduce_only,
            cloid=cloid.lower() if cloid else None,
            twap_id=twap_id,
            status_timestamp=now,
        )
        acct.remember(order)
        if self._record:
            self.ledger.orders[order.oid] = LedgerOrder(
                acct.address, order.oid, coin, order.side, kind, twap_id, "open", sz
            )
        return order

    def _set_status(self, order: Order, status: str) -> WireOrderUpdate:
        order.status = status
        order.status_timestamp = self.now_ms()
        if self._record and (entry := self.ledger.orders.get(order.oid)) is not None:
            entry.status = status
        return order.update()

    # ---------------------------------------------------------------- fills

    def _apply(
        self,
        acct: Account,
        order: Order,
        pieces: Sequence[_Piece],
        *,
        aggressor: bool,
        hash_: str,
        liquidation: WireLiquidation | None = None,
        liquidation_dir: str | None = None,
        counterparty: str | None = None,
    ) -> tuple[list[WireFill], list[WireTrade]]:
        """Execute `pieces` of `order` against seeded counterparties; update state, history and ledger."""
        is_buy = order.side == "B"
        spot = order.coin in self.universe.spot
        rate = TAKER_FEE if aggressor else MAKER_FEE
        aggressor_side: Side = order.side if aggressor else ("A" if is_buy else "B")
        now = self._fill_ms()
        fills: list[WireFill] = []
        trades: list[WireTrade] = []
        ledger = self.ledger.orders.get(order.oid) if self._record else None
        for piece in pieces:
            sz, px = piece.sz, piece.px
            fee = (sz * px * rate).quantize(USDC_DECIMALS)
            if spot:
                start, dir_, pnl = self._apply_spot(acct, order.coin, is_buy, sz, px, fee)
            else:
                start, dir_, pnl = self._apply_perp(acct, order.coin, is_buy, sz, px, fee)
            if liquidation_dir is not None:
                dir_ = liquidation_dir
            tid = self._tid()
            sz_s, px_s = wire_decimal(sz), wire_decimal(px)
            fill = WireFill(
                coin=order.coin,
                px=px_s,
                sz=sz_s,
                side=order.side,
                time=now,
                start_position=wire_decimal(start),
                dir=dir_,
                closed_pnl=wire_decimal(pnl),
                hash=hash_,
                oid=order.oid,
                crossed=aggressor,
                fee=wire_decimal(fee),
                tid=tid,
                cloid=order.cloid,
                liquidation=liquidation,
                fee_token="USDC",
                twap_id=order.twap_id,
            )
            fills.append(fill)
            acct.fills.append(fill)
            other = counterparty.lower() if counterparty is not None else self._counterparty()
            users = (acct.address, other) if is_buy else (other, acct.address)
            trade = WireTrade(
                coin=order.coin, side=aggressor_side, px=px_s, sz=sz_s, time=now, hash=hash_, tid=tid, users=users
            )
            trades.append(trade)
            self.recent_trades[order.coin].append(trade)
            self.mids[order.coin] = px
            self.day_ntl_vlm[order.coin] += sz * px
            order.sz -= sz
            if ledger is not None:
                if ledger.position_before is None:
                    ledger.position_before = start
                ledger.position_after = start + sz if is_buy else start - sz
                total = ledger.totals.get(dir_)
                if total is None:
                    total = ledger.totals[dir_] = DirTotal(dir_)
                total.size += sz
                total.notional += sz * px
                total.fills += 1
        if pieces:
            self._mids_moved((order.coin,))
        return fills, trades

    def _fill_ms(self) -> int:
        """The time of a new fill: now, but after the newest state view (which cannot contain it)."""
        ms = max(self.now_ms(), self._state_ms + 1)
        self._last_ms = ms
        return ms

    def _state_time(self) -> int:
        """The time of a state view being handed out; every fill so far is at or before it."""
        ms = self.now_ms()
        self._state_ms = ms
        return ms

    def _apply_perp(
        self, acct: Account, coin: str, is_buy: bool, sz: Decimal, px: Decimal, fee: Decimal
    ) -> tuple[Decimal, str, Decimal]:
        """One perp fill on the ledger (module docstring rules); returns startPosition, dir and closedPnl."""
        ledger = acct.dexes[self._dex_of(coin)]
        setting = self.leverage_of(acct, coin)
        pos = acct.positions.get(coin)
        if pos is None:
            pos = acct.positions[coin] = PerpPosition(entry_px=px)
        start = pos.szi
        new = start + sz if is_buy else start - sz
        pnl = ZERO
        if start == 0 or (start > 0) == is_buy:
            dir_ = "Open Long" if is_buy else "Open Short"
            pos.entry_px = px if start == 0 else (abs(start) * pos.entry_px + sz * px) / abs(new)
            self._hold_margin(ledger, pos, setting, sz * px)
        elif sz <= abs(start):
            dir_ = "Close Long" if start > 0 else "Close Short"
            pnl = ((px - pos.entry_px) * (sz if start > 0 else -sz)).quantize(USDC_DECIMALS)
            self._release_margin(ledger, pos, sz, abs(start))
        else:
            dir_ = "Long > Short" if start > 0 else "Short > Long"
            pnl = ((px - pos.entry_px) * start).quantize(USDC_DECIMALS)
            self._release_margin(ledger, pos, abs(start), abs(start))
            pos.entry_px = px
            pos.funding_since_open = ZERO
            self._hold_margin(ledger, pos, setting, abs(new) * px)
        pos.szi = new
        pos.funding_since_change = ZERO
        ledger.cash += pnl - fee
        ledger.realized_pnl += pnl
        ledger.fees += fee
        if new == 0:
            del acct.positions[coin]
        return start, dir_, pnl

    @staticmethod
    def _hold_margin(ledger: DexLedger, pos: PerpPosition, setting: LeverageSetting, notional: Decimal) -> None:
        """An isolated position takes `notional ÷ leverage` out of the dex's cash; a cross one takes nothing."""
        if setting.type == "isolated":
            margin = (notional / setting.value).quantize(USDC_DECIMALS)
            pos.isolated_margin += margin
            ledger.cash -= margin

    @staticmethod
    def _release_margin(ledger: DexLedger, pos: PerpPosition, sz: Decimal, held: Decimal) -> None:
        """Reducing `held` by `sz` gives back that share of the isolated margin (all of it on a close)."""
        released = pos.isolated_margin if sz >= held else (pos.isolated_margin * sz / held).quantize(USDC_DECIMALS)
        pos.isolated_margin -= released
        ledger.cash += released

    def _mids_moved(self, coins: Collection[str]) -> None:
        if self.mark_listener is not None:
            self.mark_listener.on_mids(coins)

    def _apply_spot(
        self, acct: Account, coin: str, is_buy: bool, sz: Decimal, px: Decimal, fee: Decimal
    ) -> tuple[Decimal, str, Decimal]:
        pair = self.universe.spot[coin]
        bal = acct.spot.setdefault(pair.base.name, _SpotBalance())
        usdc = acct.spot.setdefault("USDC", _SpotBalance())
        start = bal.total
        pnl = ZERO
        if is_buy:
            bal.total += sz
            bal.entry_ntl += sz * px
            usdc.total -= sz * px + fee
            dir_ = "Buy"
        else:
            avg = bal.entry_ntl / bal.total if bal.total else ZERO
            pnl = ((px - avg) * sz).quantize(USDC_DECIMALS)
            bal.entry_ntl -= avg * sz
            bal.total -= sz
            usdc.total += sz * px - fee
            dir_ = "Sell"
        return start, dir_, pnl

    def _emit(
        self,
        user: str,
        fills: Sequence[WireFill],
        trades: Sequence[WireTrade],
        updates: Sequence[WireOrderUpdate],
        coin: str,
    ) -> None:
        listener = self.listener
        if listener is None:
            return
        if updates and self.status_before_fills:
            listener.on_order_updates(user, updates)
        if fills:
            listener.on_fills(user, fills)
            listener.on_trades(coin, trades)
        if updates and not self.status_before_fills:
            listener.on_order_updates(user, updates)

    def split(self, coin: str, sz: Decimal, px: Decimal, parts: int, px_step: Decimal, is_buy: bool) -> list[_Piece]:
        """`parts` fills summing exactly to `sz` (sizes at the coin's lot size), price walking by `px_step`."""
        lot = self.lot_size(coin)
        parts = max(1, min(parts, int(sz / lot)))
        each = (sz / parts).quantize(lot, rounding=ROUND_DOWN)
        sizes = [each] * (parts - 1) + [sz - each * (parts - 1)]
        step = px_step if is_buy else -px_step
        return [_Piece(s, px + step * i) for i, s in enumerate(sizes) if s > 0]

    def lot_size(self, coin: str) -> Decimal:
        """Smallest size step of `coin` (from its szDecimals)."""
        return Decimal(1).scaleb(-self._sz_decimals(coin))

    def _sz_decimals(self, coin: str) -> int:
        perp = self.universe.perps.get(coin)
        return perp.sz_decimals if perp is not None else self.universe.spot[coin].base.sz_decimals

    # ---------------------------------------------------------------- order flows (synchronous core)

    def market_order(
        self,
        user: str,
        coin: str,
        is_buy: bool,
        sz: Num,
        px: Num,
        *,
        fills: int = 1,
        px_step: Num = 0,
        reduce_only: bool = False,
        cloid: str | None = None,
        counterparty: str | None = None,
    ) -> int:
        """An aggressive order filled at once in `fills` pieces; orderUpdates `open` + `filled` in one frame.

        `counterparty` names the other side on the tape (default: one of the seeded pool); only the tape shows
        it, its account is not changed (a wash pair's trades, `sim/scenarios.py` `population`)."""
        acct = self.account(user)
        size, price, step = to_decimal(sz), to_decimal(px), to_decimal(px_step)
        self._check_coin(coin)
        self._check_spot_sell(acct, coin, is_buy, size)
        pieces = self.split(coin, size, price, fills, step, is_buy)
        worst = pieces[-1].px
        order = self._new_order(
            acct, coin, is_buy, size, worst, order_type="Market", tif="FrontendMarket",
            reduce_only=reduce_only, cloid=cloid, kind="market",
        )  # fmt: skip
        opened = order.update()
        out_fills, trades = self._apply(
            acct, order, pieces, aggressor=True, hash_=self._hash(), counterparty=counterparty
        )
        self._emit(acct.address, out_fills, trades, [opened, self._set_status(order, "filled")], coin)
        return order.oid

    def crowd_trades(self, coin: str, count: int) -> list[WireTrade]:
        """`count` trades of `coin` between two accounts of the seeded pool, at the mid: the tape of everybody
        nobody watches. Only the tape (and REST `recentTrades`) shows them; no account or mid changes, so a
        crowd of any size costs the model nothing but the frames (`sim/scenarios.py` `cascade`)."""
        self._check_coin(coin)
        if count < 1:
            return []
        now = self._fill_ms()
        px, sz = wire_decimal(self.mids[coin]), wire_decimal(self.lot_size(coin))
        recent = self.recent_trades[coin]
        trades: list[WireTrade] = []
        for _ in range(count):
            buyer, seller = self._counterparty(), self._counterparty()
            side: Side = "B" if self._rng.random() < 0.5 else "A"
            trade = WireTrade(
                coin=coin, side=side, px=px, sz=sz, time=now, hash=self._hash(), tid=self._tid(), users=(buyer, seller)
            )
            trades.append(trade)
            recent.append(trade)
        if self.listener is not None:
            self.listener.on_trades(coin, trades)
        return trades

    def limit_order(
        self,
        user: str,
        coin: str,
        is_buy: bool,
        sz: Num,
        px: Num,
        *,
        reduce_only: bool = False,
        cloid: str | None = None,
        tif: str = "Gtc",
    ) -> int:
        """A resting order: orderUpdates `open`; fill it with `fill_order`, end it with `cancel_order`."""
        acct = self.account(user)
        order = self._new_order(
            acct, coin, is_buy, to_decimal(sz), to_decimal(px), order_type="Limit", tif=tif,
            reduce_only=reduce_only, cloid=cloid, kind="limit",
        )  # fmt: skip
        acct.open_orders[order.oid] = order
        self._emit(acct.address, (), (), [order.update()], coin)
        return order.oid

    def fill_order(self, user: str, oid: int, sz: Num | None = None, px: Num | None = None) -> None:
        """A maker fill of a resting order (all of the remainder by default); `filled` when nothing is left."""
        acct = self.account(user)
        order = acct.open_orders.get(oid)
        if order is None:
            raise ValueError(f"order {oid} is not open for {acct.address}")
        size = order.sz if sz is None else to_decimal(sz)
        if not 0 < size <= order.sz:
            raise ValueError(f"fill size {size} outside (0, {order.sz}] for order {oid}")
        self._check_spot_sell(acct, order.coin, order.side == "B", size)
        price = order.limit_px if px is None else to_decimal(px)
        out_fills, trades = self._apply(acct, order, [_Piece(size, price)], aggressor=False, hash_=self._hash())
        updates: list[WireOrderUpdate] = []
        if order.sz == 0:
            del acct.open_orders[oid]
            updates.append(self._set_status(order, "filled"))
        self._emit(acct.address, out_fills, trades, updates, order.coin)

    def cancel_order(self, user: str, oid: int, status: str = "canceled") -> None:
        """End a resting order; the update keeps the unfilled remainder as `sz`."""
        acct = self.account(user)
        order = acct.open_orders.pop(oid, None)
        if order is None:
            raise ValueError(f"order {oid} is not open for {acct.address}")
        self._emit(acct.address, (), (), [self._set_status(order, status)], order.coin)

    def reject_order(self, user: str, coin: str, is_buy: bool, sz: Num, px: Num, status: str) -> int:
        """An order rejected at placement: one update with the rejection status, no fills."""
        acct = self.account(user)
        order = self._new_order(
            acct, coin, is_buy, to_decimal(sz), to_decimal(px), order_type="Limit", tif="Gtc",
            reduce_only=False, cloid=None, kind="rejected",
        )  # fmt: skip
        self._emit(acct.address, (), (), [self._set_status(order, status)], coin)
        return order.oid

    def liquidate(
        self,
        user: str,
        coin: str,
        *,
        mark_px: Num,
        px: Num | None = None,
        fills: int = 1,
        method: str = "market",
        order_updates: bool = False,
    ) -> int:
        """Close the whole perp position as a liquidation (dir `Liquidated Cross Long/Short`).

        The user channel also gets a `liquidation` event. orderUpdates for the system's LiquidationMarket
        order are not sent unless `order_updates` (UNVERIFIED whether the exchange sends them).
        """
        acct = self.account(user)
        pos = acct.positions.get(coin)
        if pos is None or pos.szi == 0:
            raise ValueError(f"{acct.address} has no {coin} position to liquidate")
        mark = to_decimal(mark_px)
        price = mark if px is None else to_decimal(px)
        is_buy = pos.szi < 0
        size = abs(pos.szi)
        margin = "Isolated" if self.leverage_of(acct, coin).type == "isolated" else "Cross"
        label = f"Liquidated {margin} {'Short' if is_buy else 'Long'}"
        pieces = self.split(coin, size, price, fills, ZERO, is_buy)
        order = self._new_order(
            acct, coin, is_buy, size, price, order_type="Market", tif="LiquidationMarket",
            reduce_only=True, cloid=None, kind="liquidation",
        )  # fmt: skip
        block = WireLiquidation(liquidated_user=acct.address, mark_px=wire_decimal(mark), method=method)
        ntl = size * mark
        opened = order.update()
        # The engine executes liquidations: zero hash on the fills and the tape (docs/protocol.md §7).
        out_fills, trades = self._apply(
            acct, order, pieces, aggressor=True, hash_=ZERO_HASH, liquidation=block, liquidation_dir=label
        )
        filled = self._set_status(order, "filled")
        self._emit(acct.address, out_fills, trades, [opened, filled] if order_updates else [], coin)
        if self.listener is not None:
            self._next_lid += 1
            self.listener.on_liquidation(
                acct.address,
                WireLiquidationEvent(
                    lid=self._next_lid,
                    liquidator=self._counterparty(),
                    liquidated_user=acct.address,
                    liquidated_ntl_pos=wire_decimal(ntl.quantize(USDC_DECIMALS)),
                    liquidated_account_value=wire_decimal(self.account_value(acct, self._dex_of(coin))),
                ),
            )
        return order.oid

    def twap_slice(
        self, user: str, coin: str, is_buy: bool, sz: Num, px: Num, twap_id: int, *, order_updates: bool = False
    ) -> int:
        """One TWAP slice: its own oid, one taker fill with `twapId` and an all-zero hash."""
        acct = self.account(user)
        size = to_decimal(sz)
        self._check_coin(coin)
        self._check_spot_sell(acct, coin, is_buy, size)
        order = self._new_order(
            acct, coin, is_buy, size, to_decimal(px), order_type="Twap Slice", tif=None,
            reduce_only=False, cloid=None, kind="twap_slice", twap_id=twap_id,
        )  # fmt: skip
        opened = order.update()
        out_fills, trades = self._apply(acct, order, [_Piece(size, order.limit_px)], aggressor=True, hash_=ZERO_HASH)
        self._twap_executed(acct, twap_id, size, order.limit_px)
        filled = self._set_status(order, "filled")
        self._emit(acct.address, out_fills, trades, [opened, filled] if order_updates else [], coin)
        return order.oid

    def new_twap_id(self) -> int:
        self._next_twap += 1
        return self._next_twap

    def twap_start(self, user: str, coin: str, is_buy: bool, sz: Num, *, minutes: int = TWAP_MINUTES) -> int:
        """A TWAP order is accepted: `activated` on `userTwapHistory`. Returns its twapId."""
        acct = self.account(user)
        self._check_coin(coin)
        twap_id = self.new_twap_id()
        now = self.now_ms()
        state = WireTwapState(
            coin=coin, user=acct.address, side="B" if is_buy else "A", sz=wire_decimal(to_decimal(sz)),
            executed_sz="0.0", executed_ntl="0.0", minutes=minutes, reduce_only=False, randomize=False, timestamp=now,
        )  # fmt: skip
        self._twap_status(
            acct,
            WireTwapHistoryEntry(
                time=now // 1000, state=state, status=WireTwapStatus(status="activated"), twap_id=twap_id
            ),
        )
        return twap_id

    def twap_end(self, user: str, twap_id: int, status: str = "finished") -> None:
        """The TWAP ends (`finished`, or `terminated` when cancelled) with what its slices executed."""
        acct = self.account(user)
        entry = acct.twaps[twap_id]
        self._twap_status(
            acct,
            msgspec.structs.replace(entry, time=self.now_ms() // 1000, status=WireTwapStatus(status=status)),
        )

    def _twap_status(self, acct: Account, entry: WireTwapHistoryEntry) -> None:
        acct.twaps[entry.twap_id] = entry
        acct.twaps.move_to_end(entry.twap_id)
        while len(acct.twaps) > TWAP_HISTORY:
            acct.twaps.popitem(last=False)
        if self.listener is not None:
            self.listener.on_twap_history(acct.address, [entry])

    def _twap_executed(self, acct: Account, twap_id: int, sz: Decimal, px: Decimal) -> None:
        entry = acct.twaps.get(twap_id)
        if entry is None:
            return  # a slice of a TWAP started without `twap_start` (older scripts): no history
        state = entry.state
        executed = msgspec.structs.replace(
            state,
            executed_sz=wire_decimal(Decimal(state.executed_sz) + sz),
            executed_ntl=wire_decimal(Decimal(state.executed_ntl) + sz * px),
        )
        acct.twaps[twap_id] = msgspec.structs.replace(entry, state=executed)

    def twap_history(self, user: str) -> list[WireTwapHistoryEntry]:
        return list(self.account(user).twaps.values())

    def _check_spot_sell(self, acct: Account, coin: str, is_buy: bool, sz: Decimal) -> None:
        pair = self.universe.spot.get(coin)
        if pair is None or is_buy:
            return
        held = acct.spot.get(pair.base.name, _SpotBalance()).total
        if sz > held:
            raise ValueError(f"{acct.address} sells {sz} {pair.base.name} but holds {held}")

    # ---------------------------------------------------------------- positions, leverage, marks, funding

    def leverage_of(self, acct: Account, coin: str) -> LeverageSetting:
        """The coin's leverage for this account: what a script set, else cross at the default."""
        setting = acct.leverage.get(coin)
        if setting is not None:
            return setting
        return LeverageSetting("cross", min(DEFAULT_LEVERAGE, self.universe.perps[coin].max_leverage))

    def set_leverage(self, user: str, coin: str, value: int, type: str = "cross") -> None:
        """Set a coin's leverage (1..maxLeverage) and margin type for one account.

        The type cannot change while a position is open; a new value resets an open isolated position's
        margin to `|szi|·entry ÷ value` (the difference comes out of, or goes back to, the dex's cash).
        """
        acct = self.account(user)
        perp = self.universe.perps.get(coin)
        if perp is None:
            raise ValueError(f"unknown perp {coin!r}; known: {sorted(self.universe.perps)}")
        if type not in LEVERAGE_TYPES:
            raise ValueError(f"leverage type must be one of {LEVERAGE_TYPES}, got {type!r}")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= perp.max_leverage:
            raise ValueError(f"leverage of {coin} must be an integer in 1..{perp.max_leverage}, got {value!r}")
        new = LeverageSetting("isolated" if type == "isolated" else "cross", value)
        pos = acct.positions.get(coin)
        if pos is not None and new.type != self.leverage_of(acct, coin).type:
            raise ValueError(f"{acct.address} cannot switch {coin} to {type} margin with an open position")
        acct.leverage[coin] = new
        if pos is not None and new.type == "isolated":
            ledger = acct.dexes[self._dex_of(coin)]
            self._release_margin(ledger, pos, abs(pos.szi), abs(pos.szi))
            self._hold_margin(ledger, pos, new, abs(pos.szi) * pos.entry_px)

    def set_balance(self, user: str, amount: Num, dex: str = "") -> None:
        """Make the dex's cash `amount` (a deposit or withdrawal of the difference)."""
        if dex not in PERP_DEXES:
            raise ValueError(f"unknown perp dex {dex!r}; known: {PERP_DEXES}")
        ledger = self.account(user).dexes[dex]
        value = to_decimal(amount)
        ledger.deposited += value - ledger.cash
        ledger.cash = value

    def set_mid(self, coin: str, px: Num) -> None:
        """Move a coin's mid (its mark) without a trade; `allMids` subscribers see it at once."""
        self._check_coin(coin)
        price = to_decimal(px)
        if price <= 0:
            raise ValueError(f"a mid must be positive, got {price}")
        self.mids[coin] = price
        self._mids_moved((coin,))

    def apply_funding(self, coin: str, rate: Num) -> None:
        """One funding payment on every open `coin` position: `szi·mark·rate` (positive = paid)."""
        if coin not in self.universe.perps:
            raise ValueError(f"unknown perp {coin!r}; known: {sorted(self.universe.perps)}")
        funding_rate = to_decimal(rate)
        mark = self.mids[coin]
        now = self._fill_ms()
        for acct in self.accounts.values():
            pos = acct.positions.get(coin)
            if pos is None:
                continue
            payment = (pos.szi * mark * funding_rate).quantize(USDC_DECIMALS)
            pos.funding_since_open += payment
            pos.funding_since_change += payment
            acct.funding_all_time[coin] = acct.funding_all_time.get(coin, ZERO) + payment
            ledger = acct.dexes[self._dex_of(coin)]
            ledger.funding += payment
            if self.leverage_of(acct, coin).type == "isolated":
                pos.isolated_margin -= payment
            else:
                ledger.cash -= payment
            if self.mark_listener is not None:
                event = WireUserFunding(
                    time=now,
                    coin=coin,
                    usdc=wire_decimal(-payment),
                    szi=wire_decimal(pos.szi),
                    funding_rate=wire_decimal(funding_rate),
                    n_samples=None,
                )
                self.mark_listener.on_funding(acct.address, event)

    # ---------------------------------------------------------------- state views (REST and WS pushes)

    @staticmethod
    def _dex_of(coin: str) -> str:
        return coin.split(":", 1)[0] if ":" in coin else ""

    def position_view(self, user: str, coin: str) -> PositionView | None:
        """The open position on `coin` at the current mark (None when flat)."""
        return self.dex_view(user, self._dex_of(coin)).position(coin)

    def dex_view(self, user: str, dex: str = "") -> DexView:
        """One dex of an account at the current marks (zeros for an unknown address or dex)."""
        acct = self.accounts.get(user.lower())
        ledger = acct.dexes.get(dex) if acct is not None else None
        if acct is None or ledger is None:
            return DexView(dex, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ())
        rows: list[tuple[str, PerpPosition, LeverageSetting, int, Decimal, Decimal, Decimal]] = []
        for coin in sorted(c for c in acct.positions if self._dex_of(c) == dex):
            pos = acct.positions[coin]
            max_lev = self.universe.perps[coin].max_leverage
            mark = self.mids[coin]
            value = abs(pos.szi) * mark
            upnl = pos.szi * (mark - pos.entry_px)
            rows.append((coin, pos, self.leverage_of(acct, coin), max_lev, mark, value, upnl))
        cross = [r for r in rows if r[2].type == "cross"]
        views: list[PositionView] = []
        for coin, pos, setting, max_lev, mark, value, upnl in rows:
            maintenance = value / (MAINTENANCE_DIVISOR * max_lev)
            isolated = setting.type == "isolated"
            if isolated:
                margin_used = pos.isolated_margin + upnl
                cushion = pos.isolated_margin
            else:
                margin_used = value / setting.value
                others = sum(
                    (r[6] - r[5] / (MAINTENANCE_DIVISOR * r[3]) for r in cross if r[0] != coin),
                    ZERO,
                )
                cushion = ledger.cash + others
            liq = (pos.szi * pos.entry_px - cushion) / (pos.szi - abs(pos.szi) / (MAINTENANCE_DIVISOR * max_lev))
            views.append(
                PositionView(
                    coin=coin,
                    dex=dex,
                    szi=pos.szi,
                    entry_px=pos.entry_px,
                    leverage_type=setting.type,
                    leverage=setting.value,
                    max_leverage=max_lev,
                    mark_px=mark,
                    position_value=value,
                    unrealized_pnl=upnl,
                    return_on_equity=upnl / (abs(pos.szi) * pos.entry_px / setting.value),
                    margin_used=margin_used,
                    maintenance_margin=maintenance,
                    liquidation_px=liq if liq > 0 else None,
                    raw_usd=pos.isolated_margin - pos.szi * pos.entry_px if isolated else None,
                    isolated_margin=pos.isolated_margin,
                    funding_all_time=acct.funding_all_time.get(coin, ZERO),
                    funding_since_open=pos.funding_since_open,
                    funding_since_change=pos.funding_since_change,
                )
            )
        cross_views = [v for v in views if v.leverage_type == "cross"]
        cross_value = ledger.cash + sum((v.unrealized_pnl for v in cross_views), ZERO)
        account_value = cross_value + sum(
            (v.isolated_margin + v.unrealized_pnl for v in views if v.leverage_type == "isolated"), ZERO
        )
        cross_margin = sum((v.margin_used for v in cross_views), ZERO)
        return DexView(
            dex=dex,
            account_value=account_value,
            total_ntl_pos=sum((v.position_value for v in views), ZERO),
            total_raw_usd=account_value - sum((v.szi * v.mark_px for v in views), ZERO),
            total_margin_used=sum((v.margin_used for v in views), ZERO),
            cross_account_value=cross_value,
            cross_ntl_pos=sum((v.position_value for v in cross_views), ZERO),
            cross_raw_usd=cross_value - sum((v.szi * v.mark_px for v in cross_views), ZERO),
            cross_margin_used=cross_margin,
            cross_maintenance_margin_used=sum((v.maintenance_margin for v in cross_views), ZERO),
            withdrawable=max(cross_value - cross_margin, ZERO),
            positions=tuple(views),
        )

    def account_value(self, acct: Account, dex: str) -> Decimal:
        return self.dex_view(acct.address, dex).account_value

    def clearinghouse_state(self, user: str, dex: str = "") -> WireClearinghouseState:
        """Perp state of one dex in the exchange's wire format (a flat account for unknown addresses)."""
        return self._wire_state(self.dex_view(user, dex), self._state_time())

    @staticmethod
    def _wire_state(view: DexView, time_ms: int) -> WireClearinghouseState:
        positions = [
            WireAssetPosition(
                position=WirePosition(
                    coin=p.coin,
                    cum_funding=WireCumFunding(
                        all_time=wire_decimal(p.funding_all_time),
                        since_open=wire_decimal(p.funding_since_open),
                        since_change=wire_decimal(p.funding_since_change),
                    ),
                    entry_px=wire_decimal(p.entry_px),
                    leverage=WireLeverage(
                        type=p.leverage_type,
                        value=p.leverage,
                        raw_usd=None if p.raw_usd is None else wire_decimal(p.raw_usd),
                    ),
                    liquidation_px=None if p.liquidation_px is None else wire_decimal(p.liquidation_px),
                    margin_used=wire_decimal(p.margin_used),
                    max_leverage=p.max_leverage,
                    position_value=wire_decimal(p.position_value),
                    return_on_equity=wire_decimal(p.return_on_equity),
                    szi=wire_decimal(p.szi),
                    unrealized_pnl=wire_decimal(p.unrealized_pnl),
                ),
                type="oneWay",
            )
            for p in view.positions
        ]
        return WireClearinghouseState(
            margin_summary=WireMarginSummary(
                account_value=wire_decimal(view.account_value),
                total_ntl_pos=wire_decimal(view.total_ntl_pos),
                total_raw_usd=wire_decimal(view.total_raw_usd),
                total_margin_used=wire_decimal(view.total_margin_used),
            ),
            cross_margin_summary=WireMarginSummary(
                account_value=wire_decimal(view.cross_account_value),
                total_ntl_pos=wire_decimal(view.cross_ntl_pos),
                total_raw_usd=wire_decimal(view.cross_raw_usd),
                total_margin_used=wire_decimal(view.cross_margin_used),
            ),
            cross_maintenance_margin_used=wire_decimal(view.cross_maintenance_margin_used),
            withdrawable=wire_decimal(view.withdrawable),
            asset_positions=positions,
            time=time_ms,
        )

    def all_dexs_state(self, user: str) -> list[tuple[str, WireClearinghouseState]]:
        """Every dex at one time (one `allDexsClearinghouseState` frame)."""
        now = self._state_time()
        return [(dex, self._wire_state(self.dex_view(user, dex), now)) for dex in PERP_DEXES]

    def spot_view(self, user: str) -> list[SpotBalanceView]:
        """Spot balances in token order; `hold` is what the account's resting spot orders reserve."""
        acct = self.accounts.get(user.lower())
        if acct is None:
            return []
        holds: dict[str, Decimal] = {}
        for order in acct.open_orders.values():
            pair = self.universe.spot.get(order.coin)
            if pair is None:
                continue
            if order.side == "A":
                holds[pair.base.name] = holds.get(pair.base.name, ZERO) + order.sz
            else:
                holds[pair.quote.name] = holds.get(pair.quote.name, ZERO) + order.sz * order.limit_px
        out: list[SpotBalanceView] = []
        for token in SPOT_TOKENS:
            bal = acct.spot.get(token.name)
            if bal is not None:
                hold = holds.get(token.name, ZERO)
                out.append(SpotBalanceView(token.name, token.index, bal.total, hold, bal.entry_ntl))
        return out

    def spot_state(self, user: str) -> WireSpotState:
        return WireSpotState(
            balances=[
                WireSpotBalance(
                    coin=b.coin,
                    token=b.token,
                    hold=wire_decimal(b.hold),
                    total=wire_decimal(b.total),
                    entry_ntl=wire_decimal(b.entry_ntl),
                )
                for b in self.spot_view(user)
            ]
        )

    def user_fills(self, user: str, limit: int, *, dex: str | None = None) -> list[WireFill]:
        """Newest first, at most `limit`; of one perp dex if `dex` is given (REST fills are dex-scoped, spot fills
        count with the first dex: docs/protocol.md §4), else of all (the `userFills` snapshot, the ground truth)."""
        acct = self.accounts.get(user.lower())
        if acct is None:
            return []
        out: list[WireFill] = []
        for fill in reversed(acct.fills):
            if len(out) >= limit:
                break
            if dex is None or self._dex_of(fill.coin) == dex:
                out.append(fill)
        return out

    def fills_snapshot(self, user: str, limit: int) -> list[WireFill]:
        """The newest `limit` fills, oldest first (the order of the live `userFills` snapshot)."""
        fills = self.user_fills(user, limit)
        fills.reverse()
        return fills

    def user_fills_by_time(
        self, user: str, start: int, end: int | None, limit: int, *, newest_first: bool = False, dex: str | None = None
    ) -> list[WireFill]:
        """Fills with `start <= time <= end` among the reachable history, oldest first, at most `limit`; of one
        perp dex if `dex` is given (as `user_fills`)."""
        acct = self.accounts.get(user.lower())
        if acct is None:
            return []
        hi = end if end is not None else self.now_ms()
        source: Iterable[WireFill] = reversed(acct.fills) if newest_first else acct.fills
        out: list[WireFill] = []
        for fill in source:
            if start <= fill.time <= hi and (dex is None or self._dex_of(fill.coin) == dex):
                out.append(fill)
                if len(out) >= limit:
                    break
        return out

    def order_status(self, user: str, oid: int | str) -> WireOrderStatusEntry | None:
        acct = self.accounts.get(user.lower())
        order = acct.find_order(oid) if acct is not None else None
        return order.status_entry() if order is not None else None

    def open_orders(self, user: str, dex: str = "") -> list[Order]:
        acct = self.accounts.get(user.lower())
        if acct is None:
            return []
        spot_ok = dex == ""  # spot orders are listed with the first perp dex only
        return [
            o
            for o in acct.open_orders.values()
            if (o.coin in self.universe.spot and spot_ok)
            or (o.coin in self.universe.perps and self._dex_of(o.coin) == dex)
        ]

    def historical_orders(self, user: str, limit: int) -> list[WireOrderStatusEntry]:
        """Newest first, one entry per order with its latest status."""
        acct = self.accounts.get(user.lower())
        if acct is None:
            return []
        out: list[WireOrderStatusEntry] = []
        for order in reversed(acct.orders.values()):
            if len(out) >= limit:
                break
            out.append(order.status_entry())
        return out

    def mids_of(self, dex: str) -> dict[str, str]:
        """Mid prices of one dex; spot pairs are listed with the first dex only (like allMids)."""
        out = {p.name: wire_decimal(self.mids[p.name]) for p in self.universe.perps_of(dex)}
        if dex == "":
            out.update({s.name: wire_decimal(self.mids[s.name]) for s in SPOT_PAIRS})
        return out

    def asset_ctxs(self, dex: str) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for p in self.universe.perps_of(dex):
            mid = wire_decimal(self.mids[p.name])
            out.append(
                {
                    "funding": FAKE_FUNDING,
                    "openInterest": FAKE_OPEN_INTEREST,
                    "prevDayPx": wire_decimal(p.mid),
                    "dayNtlVlm": wire_decimal(self.day_ntl_vlm[p.name].quantize(USDC_DECIMALS)),
                    "premium": "0.0",
                    "oraclePx": mid,
                    "markPx": mid,
                    "midPx": mid,
                    "impactPxs": [mid, mid],
                    "dayBaseVlm": "0.0",
                }
            )
        return out

    def spot_asset_ctxs(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for pair in SPOT_PAIRS:
            mid = wire_decimal(self.mids[pair.name])
            out.append(
                {
                    "prevDayPx": wire_decimal(pair.mid),
                    "dayNtlVlm": wire_decimal(self.day_ntl_vlm[pair.name].quantize(USDC_DECIMALS)),
                    "markPx": mid,
                    "midPx": mid,
                    "circulatingSupply": FAKE_SUPPLY,
                    "coin": pair.name,
                    "totalSupply": FAKE_SUPPLY,
                    "dayBaseVlm": "0.0",
                }
            )
        return out


# --------------------------------------------------------------------------------------- whale handle


class Whale:
    """Async scripting handle for one address. Methods return oids (or the twapId) for later checks."""

    def __init__(self, exchange: Exchange, account: Account) -> None:
        self.exchange = exchange
        self.account = account

    @property
    def address(self) -> str:
        return self.account.address

    def position(self, coin: str) -> Decimal:
        pos = self.account.positions.get(coin)
        return pos.szi if pos is not None else ZERO

    def spot_balance(self, token: str) -> Decimal:
        bal = self.account.spot.get(token)
        return bal.total if bal is not None else ZERO

    def set_leverage(self, coin: str, value: int, type: str = "cross") -> None:
        """`Exchange.set_leverage` for this whale (synchronous: nothing is sent until the next state)."""
        self.exchange.set_leverage(self.address, coin, value, type)

    def set_balance(self, amount: Num, dex: str = "") -> None:
        """`Exchange.set_balance` for this whale."""
        self.exchange.set_balance(self.address, amount, dex)

    def view(self, coin: str) -> PositionView | None:
        """The open position on `coin` at the current mark, as the next state frame shows it."""
        return self.exchange.position_view(self.address, coin)

    async def market_order(
        self,
        coin: str,
        is_buy: bool,
        sz: Num,
        px: Num,
        *,
        fills: int = 1,
        px_step: Num = 0,
        reduce_only: bool = False,
        cloid: str | None = None,
    ) -> int:
        return self.exchange.market_order(
            self.address, coin, is_buy, sz, px, fills=fills, px_step=px_step, reduce_only=reduce_only, cloid=cloid
        )

    async def limit_order(
        self,
        coin: str,
        is_buy: bool,
        sz: Num,
        px: Num,
        *,
        reduce_only: bool = False,
        cloid: str | None = None,
        tif: str = "Gtc",
    ) -> int:
        return self.exchange.limit_order(
            self.address, coin, is_buy, sz, px, reduce_only=reduce_only, cloid=cloid, tif=tif
        )

    async def fill(self, oid: int, sz: Num | None = None, px: Num | None = None) -> None:
        self.exchange.fill_order(self.address, oid, sz, px)

    async def cancel(self, oid: int, status: str = "canceled") -> None:
        self.exchange.cancel_order(self.address, oid, status)

    async def reject_order(self, coin: str, is_buy: bool, sz: Num, px: Num, status: str = "perpMarginRejected") -> int:
        return self.exchange.reject_order(self.address, coin, is_buy, sz, px, status)

    async def close(self, coin: str, px: Num, *, fills: int = 1) -> int:
        """Reduce-only market order for the whole perp position (or the whole spot balance)."""
        pair = self.exchange.universe.spot.get(coin)
        size = self.spot_balance(pair.base.name) if pair is not None else self.position(coin)
        if size == 0:
            raise ValueError(f"{self.address} has nothing to close on {coin}")
        return self.exchange.market_order(self.address, coin, size < 0, abs(size), px, fills=fills, reduce_only=True)

    async def liquidate(
        self,
        coin: str,
        *,
        mark_px: Num,
        px: Num | None = None,
        fills: int = 1,
        method: str = "market",
        order_updates: bool = False,
    ) -> int:
        return self.exchange.liquidate(
            self.address, coin, mark_px=mark_px, px=px, fills=fills, method=method, order_updates=order_updates
        )

    async def twap(
        self,
        coin: str,
        is_buy: bool,
        total_sz: Num,
        *,
        slices: int,
        px: Num,
        px_step: Num = 0,
        interval: float = 0.0,
        order_updates: bool = False,
        finish: bool = True,
    ) -> int:
        """Run a TWAP: `activated`, `slices` taker fills sharing one twapId `interval` seconds apart, then
        `finished` on `userTwapHistory` (unless `finish` is False). Returns the twapId."""
        ex = self.exchange
        twap_id = ex.twap_start(self.address, coin, is_buy, total_sz)
        pieces = ex.split(coin, to_decimal(total_sz), to_decimal(px), slices, to_decimal(px_step), is_buy)
        for i, piece in enumerate(pieces):
            if i and interval > 0:
                await asyncio.sleep(interval)
            ex.twap_slice(self.address, coin, is_buy, piece.sz, piece.px, twap_id, order_updates=order_updates)
        if finish:
            ex.twap_end(self.address, twap_id)
        return twap_id
