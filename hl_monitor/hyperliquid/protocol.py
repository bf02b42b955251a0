"""Typed Hyperliquid WebSocket frames and REST bodies, decoders and command encoders.

Pure: bytes in, typed values out (and back). No I/O, no logging, no globals beyond immutable decoders.
Prices, sizes, PnL and fees are `Decimal` (the wire sends decimal strings); times, oids and tids are
`int`. Unknown fields are ignored so new exchange fields never break decoding; unknown channels and
malformed frames raise `FrameDecodeError`, the one error a caller has to count.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final, Literal, TypeAlias

import msgspec

from hl_monitor.errors import FrameDecodeError, ProtocolError

__all__ = [
    "AllDexsClearinghouseStateData",
    "AllDexsClearinghouseStateFrame",
    "AllMidsData",
    "AllMidsFrame",
    "AssetPosition",
    "BboData",
    "BboFrame",
    "ClearinghouseState",
    "ClearinghouseStateData",
    "ClearinghouseStateFrame",
    "ErrorFrame",
    "Fill",
    "Frame",
    "FrontendOrder",
    "Leverage",
    "Liquidation",
    "MarginSummary",
    "OrderStatusResponse",
    "OrderUpdatesFrame",
    "PerpAssetCtx",
    "PerpDex",
    "PerpMeta",
    "PerpUniverseEntry",
    "PongFrame",
    "Position",
    "SpotBalance",
    "SpotMeta",
    "SpotPair",
    "SpotState",
    "SpotStateData",
    "SpotStateFrame",
    "SpotToken",
    "SubAck",
    "Subscription",
    "SubscriptionResponseFrame",
    "TradesFrame",
    "UserEventsData",
    "UserEventsFrame",
    "UserFillsData",
    "UserFillsFrame",
    "WsBasicOrder",
    "WsOrder",
    "WsTrade",
    "decode_fills",
    "decode_frame",
    "decode_info",
    "encode_ping",
    "encode_subscribe",
    "encode_unsubscribe",
    "subscription_from_echo",
]

Side: TypeAlias = Literal["B", "A"]


class _Wire(msgspec.Struct, rename="camel", frozen=True, gc=False):
    """Base for immutable wire objects: camelCase on the wire, snake_case in Python."""


# ---------------------------------------------------------------------------------------- fills


class Liquidation(_Wire, frozen=True):
    """The `liquidation` block of a liquidation fill (`markPx` is a string on the wire)."""

    mark_px: Decimal
    method: str
    liquidated_user: str | None = None


class Fill(_Wire, frozen=True):
    """One fill of `userFills`, `userEvents.fills` and REST `userFills`/`userFillsByTime`."""

    coin: str
    px: Decimal
    sz: Decimal
    side: Side
    time: int
    start_position: Decimal
    dir: str
    closed_pnl: Decimal
    hash: str
    oid: int
    crossed: bool
    fee: Decimal
    tid: int
    fee_token: str = "USDC"
    twap_id: int | None = None
    cloid: str | None = None
    builder_fee: Decimal | None = None
    liquidation: Liquidation | None = None
    fee_trial_escrow: Decimal | None = None


class UserFillsData(_Wire, frozen=True):
    """`userFills` data. Anything but `isSnapshot: true` is a stream frame (docs and live data disagree)."""

    user: str
    fills: list[Fill]
    is_snapshot: bool = False


# ---------------------------------------------------------------------------------------- orders


class WsBasicOrder(_Wire, frozen=True):
    """The order inside an `orderUpdates` entry. `sz` is the remaining size; `timestamp` is placement time."""

    coin: str
    side: Side
    limit_px: Decimal
    sz: Decimal
    oid: int
    timestamp: int
    orig_sz: Decimal
    cloid: str | None = None
    reduce_only: bool | None = None


class WsOrder(_Wire, frozen=True):
    """One `orderUpdates` entry. `status` is an open string: new values keep appearing."""

    order: WsBasicOrder
    status: str
    status_timestamp: int


class FrontendOrder(_Wire, frozen=True):
    """REST `frontendOpenOrders` / `orderStatus` / `historicalOrders` order (frontend fields optional)."""

    coin: str
    side: Side
    limit_px: Decimal
    sz: Decimal
    oid: int
    timestamp: int
    orig_sz: Decimal
    cloid: str | None = None
    reduce_only: bool | None = None
    order_type: str | None = None
    tif: str | None = None
    is_trigger: bool | None = None
    trigger_px: Decimal | None = None
    trigger_condition: str | None = None
    is_position_tpsl: bool | None = None
    children: list[Any] = msgspec.field(default_factory=list)


class OrderStatusEntry(_Wire, frozen=True):
    """`{"order": FrontendOrder, "status": S, "statusTimestamp": ms}` (orderStatus and historicalOrders)."""

    order: FrontendOrder
    status: str
    status_timestamp: int


class OrderStatusResponse(_Wire, frozen=True):
    """REST `orderStatus`: `status` is `order` (with `order` set) or `unknownOid`."""

    status: str
    order: OrderStatusEntry | None = None


# ---------------------------------------------------------------------------------------- positions


class Leverage(_Wire, frozen=True):
    type: str
    value: int
    raw_usd: Decimal | None = None


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
    time: int = 0


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


class SpotState(_Wire, frozen=True):
    balances: list[SpotBalance] = msgspec.field(default_factory=list)


class SpotStateData(_Wire, frozen=True):
    user: str
    spot_state: SpotState


# ---------------------------------------------------------------------------------------- public feeds


class WsTrade(_Wire, frozen=True):
    """A public trade. `side` is the aggressor; `users` is `[buyer, seller]`; unique id is (time, coin, tid)."""

    coin: str
    side: Side
    px: Decimal
    sz: Decimal
    time: int
    tid: int
    hash: str = ""
    users: tuple[str, str] | None = None


class AllMidsData(_Wire, frozen=True):
    mids: dict[str, Decimal]
    dex: str | None = None


class BboLevel(_Wire, frozen=True):
    px: Decimal
    sz: Decimal
    n: int


class BboData(_Wire, frozen=True):
    coin: str
    time: int
    bbo: tuple[BboLevel | None, BboLevel | None]


class UserEventsData(_Wire, frozen=True):
    """`userEvents` (channel `user`): exactly one key is set. Only `fills` and `non_user_cancel` are used."""

    fills: list[Fill] | None = None
    non_user_cancel: list[dict[str, Any]] | None = None
    funding: dict[str, Any] | None = None
    liquidation: dict[str, Any] | None = None


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
    | TradesFrame
    | AllMidsFrame
    | BboFrame
)

KNOWN_CHANNELS: Final = frozenset(
    {
        "subscriptionResponse",
        "pong",
        "error",
        "userFills",
        "orderUpdates",
        "user",
        "clearinghouseState",
        "allDexsClearinghouseState",
        "spotState",
        "trades",
        "allMids",
        "bbo",
    }
)


class _Envelope(msgspec.Struct):
    channel: str


_FRAME_DECODER: Final = msgspec.json.Decoder(Frame)
_ENVELOPE_DECODER: Final = msgspec.json.Decoder(_Envelope)


def decode_frame(raw: bytes | str) -> Frame:
    """Decode one server frame.

    Raises `FrameDecodeError` (and nothing else) for non-JSON text, unknown channels and bad shapes.
    """
    try:
        frame: Frame = _FRAME_DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        # DecodeError is also the base of ValidationError; tell them apart below.
        if not isinstance(exc, msgspec.ValidationError):
            head = raw[:80] if isinstance(raw, str) else raw[:80].decode("utf-8", "replace")
            raise FrameDecodeError("not_json", f"{exc}: {head!r}") from None
        channel = _channel_of(raw)
        if channel is not None and channel not in KNOWN_CHANNELS:
            raise FrameDecodeError("unknown_channel", str(exc), channel=channel) from None
        raise FrameDecodeError("invalid", str(exc), channel=channel) from None
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
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"ack echo without a subscription type: {echo!r}") from exc


class _Command(msgspec.Struct, omit_defaults=True):
    method: str
    subscription: Subscription | None = None


_ENCODER: Final = msgspec.json.Encoder()
_PING: Final = b'{"method":"ping"}'


def encode_subscribe(sub: Subscription) -> bytes:
    return _ENCODER.encode(_Command("subscribe", sub))


def encode_unsubscribe(sub: Subscription) -> bytes:
    """The unsubscribe subscription must equal the original subscribe object (§1.2)."""
    return _ENCODER.encode(_Command("unsubscribe", sub))


def encode_ping() -> bytes:
    return _PING


# ---------------------------------------------------------------------------------------- REST bodies


class PerpUniverseEntry(_Wire, frozen=True):
    name: str
    sz_decimals: int = 0
    max_leverage: int = 0
    is_delisted: bool | None = None
    only_isolated: bool | None = None


class PerpMeta(_Wire, frozen=True):
    universe: list[PerpUniverseEntry]


class PerpAssetCtx(_Wire, frozen=True):
    """One `metaAndAssetCtxs` context, aligned by index with `meta.universe`."""

    day_ntl_vlm: Decimal = Decimal(0)
    mark_px: Decimal | None = None
    mid_px: Decimal | None = None


class SpotToken(_Wire, frozen=True):
    name: str
    index: int
    sz_decimals: int = 0
    wei_decimals: int = 0
    is_canonical: bool | None = None


class SpotPair(_Wire, frozen=True):
    name: str
    tokens: tuple[int, int]
    index: int
    is_canonical: bool | None = None


class SpotMeta(_Wire, frozen=True):
    tokens: list[SpotToken]
    universe: list[SpotPair]


class PerpDex(_Wire, frozen=True):
    name: str
    full_name: str | None = None


def decode_info(raw: bytes | str, type_: type[Any]) -> Any:
    """Decode a REST /info body into `type_`; raise `ProtocolError` (never anything else) on bad input."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"bad /info body for {getattr(type_, '__name__', type_)}: {exc}") from None


_FILLS_DECODER: Final = msgspec.json.Decoder(list[Fill])


def decode_fills(raw: bytes | str) -> list[Fill]:
    """Decode a REST `userFills` / `userFillsByTime` body."""
    try:
        return _FILLS_DECODER.decode(raw)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"bad fills body: {exc}") from None
