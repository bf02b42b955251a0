"""Typed Hyperliquid WebSocket frames and REST bodies, decoders and command encoders.

Pure: bytes in, typed values out (and back). No I/O, no logging, no globals beyond immutable decoders.
Prices, sizes, PnL and fees are `Decimal` (the wire sends decimal strings; NaN/Infinity are rejected);
times, oids and tids are non-negative `int`s that fit a signed 64-bit column. Unknown fields are ignored so new exchange
fields never break decoding; unknown channels and malformed frames raise `FrameDecodeError`, the one
error a caller has to count. REST bodies decode with `decode_info` and raise `ProtocolError`; REST pages and
states decode entry by entry into `Decoded` (value plus odd entries by kind), so one odd entry never costs a page.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Final, Generic, Literal, TypeAlias, TypeVar, get_args

import msgspec

from hl_monitor.errors import FrameDecodeError, ProtocolError
from hl_monitor.hyperliquid.constants import classify_error_text

__all__ = [
    "KNOWN_CHANNELS",
    "ODD_KINDS",
    "SUBSTITUTE_TID_BIT",
    "AllDexsClearinghouseStateData",
    "AllDexsClearinghouseStateFrame",
    "AllMids",
    "AllMidsData",
    "AllMidsFrame",
    "AssetPosition",
    "BboData",
    "BboFrame",
    "BboLevel",
    "ClearinghouseState",
    "ClearinghouseStateData",
    "ClearinghouseStateFrame",
    "CumFunding",
    "Decoded",
    "ErrorFrame",
    "Fill",
    "Frame",
    "FrontendOrder",
    "HistoricalOrders",
    "Leverage",
    "Liquidation",
    "LiquidationEvent",
    "MarginSummary",
    "MetaAndAssetCtxs",
    "NonUserCancel",
    "OddKind",
    "OpenOrdersData",
    "OpenOrdersFrame",
    "OrderStatusEntry",
    "OrderStatusResponse",
    "OrderUpdatesFrame",
    "PerpAssetCtx",
    "PerpDex",
    "PerpDexs",
    "PerpMeta",
    "PerpUniverseEntry",
    "PongFrame",
    "Position",
    "SpotAssetCtx",
    "SpotBalance",
    "SpotClearinghouseState",
    "SpotMeta",
    "SpotMetaAndAssetCtxs",
    "SpotPair",
    "SpotState",
    "SpotStateData",
    "SpotStateFrame",
    "SpotToken",
    "SubAck",
    "Subscription",
    "SubscriptionResponseFrame",
    "TradesFrame",
    "TwapHistoryEntry",
    "TwapSliceFill",
    "TwapState",
    "TwapStatus",
    "UserEventsData",
    "UserEventsFrame",
    "UserFillsData",
    "UserFillsFrame",
    "UserFunding",
    "UserTwapHistoryData",
    "UserTwapHistoryFrame",
    "UserTwapSliceFillsData",
    "UserTwapSliceFillsFrame",
    "WsBasicOrder",
    "WsOrder",
    "WsTrade",
    "decode_clearinghouse_state",
    "decode_fills",
    "decode_fills_page",
    "decode_frame",
    "decode_frontend_orders_page",
    "decode_historical_orders_page",
    "decode_info",
    "decode_trades_page",
    "encode_ping",
    "encode_subscribe",
    "encode_unsubscribe",
    "subscription_from_echo",
    "substitute_tid",
]

Side: TypeAlias = Literal["B", "A"]
# Times, oids, tids and twap ids: non-negative JSON numbers (oids > 2^32, tids ≤ 50 bits). The bound is
# int64 (msgspec's limit for constraints, and a signed BIGINT column), far above any real value.
U64: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_T = TypeVar("_T")


def _require_finite(*values: Decimal | None) -> None:
    """Reject NaN/Infinity, which the Decimal type accepts but no price or size can be (raised as invalid)."""
    for value in values:
        if value is not None and not value.is_finite():
            raise ValueError(f"non-finite decimal {value}")


class _Wire(msgspec.Struct, rename="camel", frozen=True, gc=False):
    """Base for immutable wire objects: camelCase on the wire, snake_case in Python."""


# ---------------------------------------------------------------------------------------- fills


class Liquidation(_Wire, frozen=True):
    """The `liquidation` block of a liquidation fill (`markPx` is a string; `liquidatedUser` may be absent)."""

    mark_px: Decimal
    method: str
    liquidated_user: str | None = None


class Fill(_Wire, frozen=True):
    """One fill of `userFills`, `userEvents.fills` and REST `userFills`/`userFillsByTime`."""

    coin: str
    px: Decimal
    sz: Decimal
    side: Side
    time: U64
    start_position: Decimal
    dir: str
    closed_pnl: Decimal
    hash: str
    oid: U64
    crossed: bool
    fee: Decimal
    tid: U64
    fee_token: str = "USDC"
    twap_id: U64 | None = None
    cloid: str | None = None
    builder_fee: Decimal | None = None
    liquidation: Liquidation | None = None
    fee_trial_escrow: Decimal | None = None

    def __post_init__(self) -> None:
        _require_finite(self.px, self.sz, self.start_position, self.closed_pnl, self.fee)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Chronological order: `(time, tid)` (REST page order is not guaranteed, docs/protocol.md §4)."""
        return (self.time, self.tid)

    @property
    def identity(self) -> tuple[str, int, int]:
        """`(coin, oid, tid)`: with the user, the dedupe key; never the hash (docs/protocol.md §3)."""
        return (self.coin, self.oid, self.tid)

    @property
    def tid_substituted(self) -> bool:
        """The exchange sent no `tid`: this one is `substitute_tid`'s (docs/protocol.md §3)."""
        return self.tid >= SUBSTITUTE_TID_BIT


class UserFillsData(_Wire, frozen=True):
    """`userFills` data. Anything but `isSnapshot: true` is a stream frame (docs and live data disagree)."""

    user: str
    fills: list[Fill]
    is_snapshot: bool = False


class TwapSliceFill(_Wire, frozen=True):
    """One `userTwapSliceFills` entry: the inner fill's own `twapId` is null; the outer one is the TWAP."""

    fill: Fill
    twap_id: U64


class UserTwapSliceFillsData(_Wire, frozen=True):
    user: str
    twap_slice_fills: list[TwapSliceFill]
    is_snapshot: bool = False


class TwapState(_Wire, frozen=True):
    coin: str
    side: Side
    sz: Decimal
    executed_sz: Decimal
    executed_ntl: Decimal
    minutes: int
    reduce_only: bool
    randomize: bool
    timestamp: U64
    user: str | None = None


class TwapStatus(_Wire, frozen=True):
    """`status` is an open string (`activated`, `finished`, `terminated`, `error`, …)."""

    status: str
    description: str | None = None


class TwapHistoryEntry(_Wire, frozen=True):
    """One `userTwapHistory` entry. Note: `time` is in **seconds** here (captured), `state.timestamp` in ms."""

    time: U64
    state: TwapState
    status: TwapStatus
    twap_id: U64 | None = None


class UserTwapHistoryData(_Wire, frozen=True):
    user: str
    history: list[TwapHistoryEntry]
    is_snapshot: bool = False


# ---------------------------------------------------------------------------------------- orders


class WsBasicOrder(_Wire, frozen=True):
    """The order inside an `orderUpdates` entry. `sz` is the remaining size; `timestamp` is placement time."""

    coin: str
    side: Side
    limit_px: Decimal
    sz: Decimal
    oid: U64
    timestamp: U64
    orig_sz: Decimal
    cloid: str | None = None
    reduce_only: bool | None = None

    def __post_init__(self) -> None:
        _require_finite(self.limit_px, self.sz, self.orig_sz)


class WsOrder(_Wire, frozen=True):
    """One `orderUpdates` entry. `status` is an open string: new values keep appearing."""

    order: WsBasicOrder
    status: str
    status_timestamp: U64


class FrontendOrder(_Wire, frozen=True):
    """REST `frontendOpenOrders` / `orderStatus` / `historicalOrders` order (frontend fields optional)."""

    coin: str
    side: Side
    limit_px: Decimal
    sz: Decimal
    oid: U64
    timestamp: U64
    orig_sz: Decimal
    cloid: str | None = None
    reduce_only: bool | None = None
    order_type: str | None = None
    tif: str | None = None
    is_trigger: bool | None = None
    trigger_px: Decimal | None = None
    trigger_condition: str | None = None
    is_position_tpsl: bool | None = None
    children: list[FrontendOrder] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        _require_finite(self.limit_px, self.sz, self.orig_sz, self.trigger_px)


class OrderStatusEntry(_Wire, frozen=True):
    """`{"order": FrontendOrder, "status": S, "statusTimestamp": ms}` (orderStatus and historicalOrders)."""

    order: FrontendOrder
    status: str
    status_timestamp: U64


class OrderStatusResponse(_Wire, frozen=True):
    """REST `orderStatus`: `status` is `order` (with `order` set) or `unknownOid`."""

    status: str
    order: OrderStatusEntry | None = None

    @property
    def known(self) -> bool:
        return self.order is not None


# REST `historicalOrders`: at most 2000, newest first.
HistoricalOrders: TypeAlias = list[OrderStatusEntry]


# ---------------------------------------------------------------------------------------- positions


class Leverage(_Wire, frozen=True):
    type: str
    value: int
    raw_usd: Decimal | None = None


class CumFunding(_Wire, frozen=True):
    all_time: Decimal = Decimal(0)
    since_open: Decimal = Decimal(0)
    since_change: Decimal = Decimal(0)


class Position(_Wire, frozen=True):
    """One perp position; `szi` is signed (negative = short)."""

    coin: str
    szi: Decimal
    entry_px: Decimal | None = None
    leverage: Leverage | None = None
    liquidation_px: Decimal | None = None
    margin_used: Decimal = Decimal(0)
    position_value: Decimal = Decimal(0)
    return_on_equity: Decimal = Decimal(0)
    unrealized_pnl: Decimal = Decimal(0)
    max_leverage: int | None = None
    cum_funding: CumFunding | None = None

    def __post_init__(self) -> None:
        _require_finite(self.szi, self.entry_px)


class AssetPosition(_Wire, frozen=True):
    position: Position
    type: str = "oneWay"


class MarginSummary(_Wire, frozen=True):
    account_value: Decimal
    total_ntl_pos: Decimal = Decimal(0)
    total_raw_usd: Decimal = Decimal(0)
    total_margin_used: Decimal = Decimal(0)


class ClearinghouseState(_Wire, frozen=True):
    """REST `clearinghouseState` and the state inside the WS position channels. A missing coin is flat."""

    margin_summary: MarginSummary
    asset_positions: list[AssetPosition] = msgspec.field(default_factory=list)
    cross_margin_summary: MarginSummary | None = None
    cross_maintenance_margin_used: Decimal = Decimal(0)
    withdrawable: Decimal = Decimal(0)
    time: U64 = 0

    def positions(self) -> dict[str, Position]:
        """Open positions by coin (HIP-3 coins keep their `dex:` prefix)."""
        return {ap.position.coin: ap.position for ap in self.asset_positions}


class ClearinghouseStateData(_Wire, frozen=True):
    """WS `clearinghouseState` data (one dex)."""

    user: str
    clearinghouse_state: ClearinghouseState
    dex: str = ""


class AllDexsClearinghouseStateData(_Wire, frozen=True):
    """WS `allDexsClearinghouseState`: `[dex, state]` pairs, core dex under `""`. Re-sent ~every 5 s."""

    user: str
    clearinghouse_states: list[tuple[str, ClearinghouseState]]


class SpotBalance(_Wire, frozen=True):
    """A spot balance; `coin` is the token name (outcome balances have no `token`)."""

    coin: str
    total: Decimal
    hold: Decimal = Decimal(0)
    token: int | None = None
    entry_ntl: Decimal | None = None

    def __post_init__(self) -> None:
        _require_finite(self.total)


class SpotState(_Wire, frozen=True):
    balances: list[SpotBalance] = msgspec.field(default_factory=list)


# REST `spotClearinghouseState` has the same body as the WS `spotState.spotState`.
SpotClearinghouseState: TypeAlias = SpotState


class SpotStateData(_Wire, frozen=True):
    user: str
    spot_state: SpotState


class OpenOrdersData(_Wire, frozen=True):
    """WS `openOrders`: the full list of resting orders (frontend fields) for one dex."""

    user: str
    orders: list[FrontendOrder]
    dex: str = ""


# ---------------------------------------------------------------------------------------- public feeds


class WsTrade(_Wire, frozen=True):
    """A public trade. `side` is the aggressor; `users` is `[buyer, seller]`; unique id is (time, coin, tid)."""

    coin: str
    side: Side
    px: Decimal
    sz: Decimal
    time: U64
    tid: U64
    hash: str = ""
    users: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        _require_finite(self.px, self.sz)


class AllMidsData(_Wire, frozen=True):
    """WS `allMids` data (`dex` only when requested). REST `allMids` returns the bare map (`AllMids`)."""

    mids: dict[str, Decimal]
    dex: str | None = None

    def __post_init__(self) -> None:
        _require_finite(*self.mids.values())


# REST `allMids`: `{"BTC": "80868.5", ...}`.
AllMids: TypeAlias = dict[str, Decimal]


class BboLevel(_Wire, frozen=True):
    px: Decimal
    sz: Decimal
    n: int


class BboData(_Wire, frozen=True):
    coin: str
    time: U64
    bbo: tuple[BboLevel | None, BboLevel | None]


class NonUserCancel(_Wire, frozen=True):
    """An order the system (not the user) cancelled."""

    coin: str
    oid: U64


class UserFunding(_Wire, frozen=True):
    """A funding payment; `usdc` negative = paid."""

    time: U64
    coin: str
    usdc: Decimal
    szi: Decimal
    funding_rate: Decimal
    n_samples: int | None = None


class LiquidationEvent(msgspec.Struct, frozen=True, gc=False):
    """The `liquidation` event of `userEvents`: its keys are snake_case on the wire (docs/protocol.md §2)."""

    lid: U64
    liquidator: str
    liquidated_user: str
    liquidated_ntl_pos: Decimal
    liquidated_account_value: Decimal


class UserEventsData(_Wire, frozen=True):
    """`userEvents` (channel `user`): exactly one key is set (`twapHistory`/`twapSliceFills` are ignored)."""

    fills: list[Fill] | None = None
    non_user_cancel: list[NonUserCancel] | None = None
    funding: UserFunding | None = None
    liquidation: LiquidationEvent | None = None


# ---------------------------------------------------------------------------------------- frames


class SubAck(_Wire, frozen=True):
    method: str
    subscription: dict[str, Any]


class _Frame(msgspec.Struct, tag_field="channel", frozen=True, gc=False):
    """Every server frame is `{"channel": ..., "data": ...}`; the channel is the union tag."""


class SubscriptionResponseFrame(_Frame, tag="subscriptionResponse", frozen=True):
    data: SubAck


class PongFrame(_Frame, tag="pong", frozen=True):
    """`{"channel":"pong"}`: the only frame without `data`."""


class ErrorFrame(_Frame, tag="error", frozen=True):
    data: str

    @property
    def kind(self) -> str:
        """Bounded label for metrics (`user_cap`, `already_subscribed`, …, `other`)."""
        return classify_error_text(self.data)


class UserFillsFrame(_Frame, tag="userFills", frozen=True):
    data: UserFillsData


class OrderUpdatesFrame(_Frame, tag="orderUpdates", frozen=True):
    """Carries no user: one precise user per connection is the only way to attribute it."""

    data: list[WsOrder]


class UserEventsFrame(_Frame, tag="user", frozen=True):
    data: UserEventsData


class ClearinghouseStateFrame(_Frame, tag="clearinghouseState", frozen=True):
    data: ClearinghouseStateData


class AllDexsClearinghouseStateFrame(_Frame, tag="allDexsClearinghouseState", frozen=True):
    data: AllDexsClearinghouseStateData


class SpotStateFrame(_Frame, tag="spotState", frozen=True):
    data: SpotStateData


class OpenOrdersFrame(_Frame, tag="openOrders", frozen=True):
    data: OpenOrdersData


class UserTwapSliceFillsFrame(_Frame, tag="userTwapSliceFills", frozen=True):
    data: UserTwapSliceFillsData


class UserTwapHistoryFrame(_Frame, tag="userTwapHistory", frozen=True):
    data: UserTwapHistoryData


class TradesFrame(_Frame, tag="trades", frozen=True):
    data: list[WsTrade]


class AllMidsFrame(_Frame, tag="allMids", frozen=True):
    data: AllMidsData


class BboFrame(_Frame, tag="bbo", frozen=True):
    data: BboData


Frame: TypeAlias = (
    SubscriptionResponseFrame
    | PongFrame
    | ErrorFrame
    | UserFillsFrame
    | OrderUpdatesFrame
    | UserEventsFrame
    | ClearinghouseStateFrame
    | AllDexsClearinghouseStateFrame
    | SpotStateFrame
    | OpenOrdersFrame
    | UserTwapSliceFillsFrame
    | UserTwapHistoryFrame
    | TradesFrame
    | AllMidsFrame
    | BboFrame
)

# Derived from the union so a new frame type can never be forgotten here.
KNOWN_CHANNELS: Final[frozenset[str]] = frozenset(str(t.__struct_config__.tag) for t in get_args(Frame))


class _Envelope(msgspec.Struct):
    channel: str


_FRAME_DECODER: Final = msgspec.json.Decoder(Frame)
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)
# Enough of a bad frame to recognise it in a log line without copying megabytes.
_ERROR_HEAD_CHARS: Final = 80


def decode_frame(raw: bytes | str) -> Frame:
    """Decode one server frame.

    Raises `FrameDecodeError` (and nothing else) for non-JSON text, unknown channels and bad shapes.
    """
    try:
        frame: Frame = _FRAME_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        # DecodeError is also the base of ValidationError; tell them apart below.
        if not isinstance(exc, msgspec.ValidationError):
            head = raw[:_ERROR_HEAD_CHARS]
            text = head if isinstance(head, str) else head.decode("utf-8", "replace")
            raise FrameDecodeError("not_json", f"{exc}: {text!r}") from None
        channel = _channel_of(raw)
        if channel is not None and channel not in KNOWN_CHANNELS:
            raise FrameDecodeError("unknown_channel", str(exc), channel=channel) from None
        raise FrameDecodeError("invalid", str(exc), channel=channel) from None
    except UnicodeError as exc:
        # A str frame with lone surrogates cannot even be encoded to UTF-8: it is not JSON.
        raise FrameDecodeError("not_json", f"{type(exc).__name__}: {exc}") from None
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        # msgspec raises plain ValueError/RecursionError on pathological nesting; keep the one-error contract.
        raise FrameDecodeError("invalid", f"{type(exc).__name__}: {exc}") from None
    return frame


def _channel_of(raw: bytes | str) -> str | None:
    try:
        return _ENVELOPE_DECODER.decode(raw).channel
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------- subscriptions


class Subscription(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """A subscription object as sent. `key()` is what the normalised ack echo must match."""

    type: str
    user: str | None = None
    coin: str | None = None
    dex: str | None = None
    aggregate_by_time: bool | None = None

    def key(self) -> tuple[str, str | None, str | None, str]:
        """Identity for ack matching: addresses lowercased, defaults (`dex=""`, aggregateByTime) ignored."""
        return (self.type, self.user.lower() if self.user else None, self.coin, self.dex or "")

    @property
    def is_user_specific(self) -> bool:
        """Counts against the per-IP distinct-user cap."""
        return self.user is not None


def subscription_from_echo(echo: dict[str, Any]) -> Subscription:
    """Rebuild a `Subscription` from an ack's normalised echo (extra keys such as nSigFigs are dropped)."""
    try:
        return Subscription(
            type=str(echo["type"]),
            user=echo.get("user"),
            coin=echo.get("coin"),
            dex=echo.get("dex"),
            aggregate_by_time=echo.get("aggregateByTime"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"ack echo without a subscription type: {echo!r}") from exc


class _Command(msgspec.Struct, omit_defaults=True):
    method: str
    subscription: Subscription | None = None


_ENCODER: Final = msgspec.json.Encoder()
_PING: Final = b'{"method":"ping"}'


def encode_subscribe(sub: Subscription) -> bytes:
    """`{"method":"subscribe","subscription":{...}}`, compact, unset optional keys omitted."""
    return _ENCODER.encode(_Command("subscribe", sub))


def encode_unsubscribe(sub: Subscription) -> bytes:
    """The unsubscribe subscription must equal the original subscribe object (docs/protocol.md §1)."""
    return _ENCODER.encode(_Command("unsubscribe", sub))


def encode_ping() -> bytes:
    return _PING


# ---------------------------------------------------------------------------------------- REST bodies


class PerpUniverseEntry(_Wire, frozen=True):
    """One `meta.universe` entry; a delisted coin keeps its index (`isDelisted: true`)."""

    name: str
    sz_decimals: int = 0
    max_leverage: int = 0
    margin_table_id: int | None = None
    is_delisted: bool | None = None
    only_isolated: bool | None = None


class PerpMeta(_Wire, frozen=True):
    universe: list[PerpUniverseEntry]
    collateral_token: int | None = None


class PerpAssetCtx(_Wire, frozen=True):
    """One `metaAndAssetCtxs` context, aligned by index with `meta.universe` (book-less: mid/premium null)."""

    day_ntl_vlm: Decimal = Decimal(0)
    mark_px: Decimal | None = None
    mid_px: Decimal | None = None
    funding: Decimal | None = None
    open_interest: Decimal | None = None
    oracle_px: Decimal | None = None
    premium: Decimal | None = None
    prev_day_px: Decimal | None = None
    day_base_vlm: Decimal | None = None
    impact_pxs: tuple[Decimal, Decimal] | None = None


class MetaAndAssetCtxs(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """REST `metaAndAssetCtxs`: the wire pair `[meta, [ctx, ...]]`, contexts aligned by index."""

    meta: PerpMeta
    asset_ctxs: list[PerpAssetCtx]

    def __post_init__(self) -> None:
        if len(self.meta.universe) != len(self.asset_ctxs):
            raise ValueError(f"{len(self.meta.universe)} coins but {len(self.asset_ctxs)} asset contexts")

    def by_coin(self) -> dict[str, PerpAssetCtx]:
        return {entry.name: ctx for entry, ctx in zip(self.meta.universe, self.asset_ctxs, strict=True)}


class SpotToken(_Wire, frozen=True):
    name: str
    index: int
    sz_decimals: int = 0
    wei_decimals: int = 0
    is_canonical: bool | None = None
    token_id: str | None = None
    full_name: str | None = None


class SpotPair(_Wire, frozen=True):
    """A spot pair: `tokens` are `[base, quote]` token indexes; the wire coin is `name` (`@N` or `PURR/USDC`)."""

    name: str
    tokens: tuple[int, int]
    index: int
    is_canonical: bool | None = None


class SpotMeta(_Wire, frozen=True):
    tokens: list[SpotToken]
    universe: list[SpotPair]


class SpotAssetCtx(_Wire, frozen=True):
    """One `spotMetaAndAssetCtxs` context; `coin` is the pair's wire name (`@107`, `PURR/USDC`)."""

    coin: str
    day_ntl_vlm: Decimal = Decimal(0)
    mark_px: Decimal | None = None
    mid_px: Decimal | None = None
    prev_day_px: Decimal | None = None
    day_base_vlm: Decimal | None = None
    circulating_supply: Decimal | None = None
    total_supply: Decimal | None = None


class SpotMetaAndAssetCtxs(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """REST `spotMetaAndAssetCtxs`: the wire pair `[spotMeta, [ctx, ...]]` (same weight as `spotMeta` alone)."""

    meta: SpotMeta
    asset_ctxs: list[SpotAssetCtx]

    def volumes(self) -> dict[str, Decimal]:
        """24 h notional volume per pair name; a pair without a context has none."""
        return {ctx.coin: ctx.day_ntl_vlm for ctx in self.asset_ctxs}


class PerpDex(_Wire, frozen=True):
    name: str
    full_name: str | None = None
    deployer: str | None = None


# REST `perpDexs`: the first dex is `null`, builder dexs follow.
PerpDexs: TypeAlias = list[PerpDex | None]


def decode_info(raw: bytes | str, type_: type[_T]) -> _T:
    """Decode a REST /info body into `type_`; raise `ProtocolError` (never anything else) on bad input."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"bad /info body for {getattr(type_, '__name__', type_)}: {exc}") from None


# ---------------------------------------------------------------------------------------- REST answers, item by item
#
# A REST page (`userFills`, `userFillsByTime`, `recentTrades`, `historicalOrders`, `frontendOpenOrders`) is decoded
# entry by entry (docs/protocol.md §3, §4): one odd entry never costs the page. An entry that is not an object or
# cannot be read is skipped and counted (`invalid_item`); a fill without `tid` or `fee` (recorded 2023 fills) is
# kept with a substitute key and a zero fee; unknown fields are ignored and counted. Only a body that is not a JSON
# list raises `ProtocolError`.

OddKind: TypeAlias = Literal[
    "invalid_item", "unknown_field", "missing_tid", "missing_fee", "missing_fee_token", "missing_withdrawable"
]
# Every kind an odd entry is counted under (a bounded metric label).
ODD_KINDS: Final[tuple[OddKind, ...]] = get_args(OddKind)

# Substitute tids carry this bit: real tids are 50-bit hashes, so a substitute never equals one, and with the
# bit the value still fits the signed 64-bit columns the watermark and seen keys are stored in.
SUBSTITUTE_TID_BIT: Final = 1 << 62


def substitute_tid(coin: str, time: int, oid: int, side: str, px: Decimal, sz: Decimal, start_position: Decimal) -> int:
    """The dedup key of a fill that has no `tid`: the same for the same fill on every read.

    `SUBSTITUTE_TID_BIT | blake2b-64("{coin}|{time}|{oid}|{side}|{px}|{sz}|{startPosition}") mod 2^62`, each
    decimal written as its digits without trailing zeros and its power of ten (`1.50` and `1.5` are `15e-1`).
    `startPosition` tells apart the partial fills of one order in one block, which recorded tid-less pages
    contain (docs/protocol.md §3).
    """
    text = "|".join((coin, str(time), str(oid), side, _canonical(px), _canonical(sz), _canonical(start_position)))
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return SUBSTITUTE_TID_BIT | (digest & (SUBSTITUTE_TID_BIT - 1))


def _canonical(value: Decimal) -> str:
    """`digits` `e` `exponent` without trailing zeros; exact for any finite decimal (no context, no rounding)."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int), "only finite decimals reach here"
    while len(digits) > 1 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    if digits == (0,):
        sign, exponent = 0, 0
    return f"{'-' if sign else ''}{''.join(map(str, digits))}e{exponent}"


class Decoded(msgspec.Struct, Generic[_T], frozen=True):
    """A decoded REST answer: the value, how many entries the server sent, and the odd ones by kind.

    `received` counts every entry of a page, decodable or not (paging and the per-20-items weight go by what
    the server sent); it is 0 for answers that are not pages.
    """

    value: _T
    received: int = 0
    odd: dict[str, int] = msgspec.field(default_factory=dict)


class _LooseFill(_Wire, frozen=True):
    """A fill with the fields older fills lack made optional; turned into a `Fill` with substitutes."""

    coin: str
    px: Decimal
    sz: Decimal
    side: Side
    time: U64
    start_position: Decimal
    dir: str
    closed_pnl: Decimal
    hash: str
    oid: U64
    crossed: bool
    fee: Decimal | None = None
    tid: U64 | None = None
    fee_token: str = "USDC"
    twap_id: U64 | None = None
    cloid: str | None = None
    builder_fee: Decimal | None = None
    liquidation: Liquidation | None = None
    fee_trial_escrow: Decimal | None = None

    def __post_init__(self) -> None:
        _require_finite(self.px, self.sz, self.start_position, self.closed_pnl, self.fee)

    def to_fill(self) -> Fill:
        tid = self.tid
        if tid is None:
            tid = substitute_tid(self.coin, self.time, self.oid, self.side, self.px, self.sz, self.start_position)
        fields = {name: getattr(self, name) for name in Fill.__struct_fields__}
        fields["tid"] = tid
        fields["fee"] = Decimal(0) if self.fee is None else self.fee
        return Fill(**fields)


_RAW_LIST_DECODER: Final = msgspec.json.Decoder(list[msgspec.Raw])
_KEYS_DECODER: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_DECODE_ERRORS: Final = (msgspec.DecodeError, ValueError, TypeError, RecursionError)


class _Items(Generic[_T]):
    """Decodes the entries of one page type.

    `repair` reads an entry the strict decoder refused, if it can (else the entry is `invalid_item`);
    `expected` maps fields whose absence (or null) is worth counting to their kind.
    """

    __slots__ = ("_decoder", "_expected", "_known", "_repair", "name")

    def __init__(
        self,
        type_: type[_T],
        repair: Callable[[msgspec.Raw], _T] | None = None,
        expected: Mapping[str, OddKind] | None = None,
    ) -> None:
        self.name = type_.__name__
        self._decoder = msgspec.json.Decoder(type_)
        self._known = _wire_names(type_)
        self._repair = repair
        self._expected = tuple((expected or {}).items())

    def decode(self, raw: bytes | str) -> Decoded[list[_T]]:
        entries = _entries(raw, self.name)
        items: list[_T] = []
        odd: dict[str, int] = {}
        for entry in entries:
            try:
                keys = _KEYS_DECODER.decode(entry)
            except _DECODE_ERRORS:
                _count(odd, "invalid_item")
                continue
            try:
                item = self._decoder.decode(entry)
            except _DECODE_ERRORS:
                if self._repair is None:
                    _count(odd, "invalid_item")
                    continue
                try:
                    item = self._repair(entry)
                except _DECODE_ERRORS:
                    _count(odd, "invalid_item")
                    continue
            _audit_keys(keys, self._known, self._expected, odd)
            items.append(item)
        return Decoded(items, len(entries), odd)


def _wire_names(type_: Any) -> frozenset[str]:
    return frozenset(f.encode_name for f in msgspec.structs.fields(type_))


def _entries(raw: bytes | str, name: str) -> list[msgspec.Raw]:
    try:
        return _RAW_LIST_DECODER.decode(raw)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"bad /info page of {name}: {exc}") from None
    except UnicodeError as exc:  # a str body with lone surrogates is not JSON either
        raise ProtocolError(f"bad /info page of {name}: {type(exc).__name__}") from None


def _audit_keys(
    keys: Mapping[str, msgspec.Raw],
    known: frozenset[str],
    expected: Sequence[tuple[str, OddKind]],
    odd: dict[str, int],
) -> None:
    for name, kind in expected:
        value = keys.get(name)
        if value is None or bytes(value) == b"null":
            _count(odd, kind)
    if not known.issuperset(keys):
        _count(odd, "unknown_field")


def _count(odd: dict[str, int], kind: OddKind) -> None:
    odd[kind] = odd.get(kind, 0) + 1


_LOOSE_FILL_DECODER: Final = msgspec.json.Decoder(_LooseFill)


def _repair_fill(entry: msgspec.Raw) -> Fill:
    return _LOOSE_FILL_DECODER.decode(entry).to_fill()


# Fields recorded 2023 fills lack (docs/protocol.md §3): counted whenever absent, substituted where required.
_FILL_EXPECTED: Final[Mapping[str, OddKind]] = {
    "tid": "missing_tid",
    "fee": "missing_fee",
    "feeToken": "missing_fee_token",
}
_FILL_ITEMS: Final = _Items(Fill, _repair_fill, _FILL_EXPECTED)
_TRADE_ITEMS: Final = _Items(WsTrade)
_ORDER_STATUS_ITEMS: Final = _Items(OrderStatusEntry)
_FRONTEND_ORDER_ITEMS: Final = _Items(FrontendOrder)


def decode_fills_page(raw: bytes | str) -> Decoded[list[Fill]]:
    """A REST `userFills` / `userFillsByTime` body, entry by entry (see above).

    A fill without `tid` gets `substitute_tid` (so dedup holds across reads), one without `fee` a zero fee, one
    without `feeToken` `USDC`; each is counted by kind. Raises `ProtocolError` only if the body is not a list.
    """
    return _FILL_ITEMS.decode(raw)


def decode_fills(raw: bytes | str) -> list[Fill]:
    """The fills of a REST `userFills` / `userFillsByTime` body (`decode_fills_page` without the counts)."""
    return decode_fills_page(raw).value


def decode_trades_page(raw: bytes | str) -> Decoded[list[WsTrade]]:
    """A REST `recentTrades` body, entry by entry."""
    return _TRADE_ITEMS.decode(raw)


def decode_historical_orders_page(raw: bytes | str) -> Decoded[HistoricalOrders]:
    """A REST `historicalOrders` body, entry by entry."""
    return _ORDER_STATUS_ITEMS.decode(raw)


def decode_frontend_orders_page(raw: bytes | str) -> Decoded[list[FrontendOrder]]:
    """A REST `frontendOpenOrders` body, entry by entry."""
    return _FRONTEND_ORDER_ITEMS.decode(raw)


_STATE_DECODER: Final = msgspec.json.Decoder(ClearinghouseState)
_STATE_FIELDS: Final = _wire_names(ClearinghouseState)
_STATE_EXPECTED: Final[tuple[tuple[str, OddKind], ...]] = (("withdrawable", "missing_withdrawable"),)


def decode_clearinghouse_state(raw: bytes | str) -> Decoded[ClearinghouseState]:
    """A REST `clearinghouseState` body, counted like a page entry.

    Decoded whole: a state is absolute, so dropping one broken position would report that coin flat. A missing
    top-level `withdrawable` reads as 0 and unknown top-level fields are ignored; both are counted.
    """
    try:
        keys = _KEYS_DECODER.decode(raw)
        state = _STATE_DECODER.decode(raw)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"bad /info body for ClearinghouseState: {exc}") from None
    except UnicodeError as exc:
        raise ProtocolError(f"bad /info body for ClearinghouseState: {type(exc).__name__}") from None
    odd: dict[str, int] = {}
    _audit_keys(keys, _STATE_FIELDS, _STATE_EXPECTED, odd)
    return Decoded(state, 0, odd)
