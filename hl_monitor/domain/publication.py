"""Messages other than signals that go out exactly once: position events, liquidation alerts, fills and the
discovery announcements (an address watched or dropped by automatic discovery, README "Discovery").

A `Publication` is what the delivery layer persists first and then publishes to JetStream with
`Nats-Msg-Id = msg_id` (docs/architecture.md §3): a replay, a restart or a second instance builds the same
`msg_id`, so JetStream stores it once. The payload is the message's JSON, already encoded.

A `FillRecord` is one deduplicated fill of a watched address as the trackers accepted it (the engine for a
precise address, the tape tracker for a wide one), with the running totals of the order it belongs to; the
fills sink turns each into a `Publication` of kind `fill` (README "Fills").
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Final, Literal, Protocol, TypeAlias

import msgspec

from hl_monitor.domain.signal import AssetType, LiquidationInfo

__all__ = [
    "DISCOVERY_SCHEMA_VERSION",
    "FILL_SCHEMA_VERSION",
    "DiscoveryAction",
    "DiscoveryAnnouncement",
    "FillRecord",
    "FillSink",
    "FillSource",
    "Publication",
    "PublicationKind",
    "PublicationSink",
    "fill_msg_id",
]

PublicationKind: TypeAlias = Literal["position_event", "alert", "fill", "discovery"]
FillSource: TypeAlias = Literal["user_fills", "market_tape"]
FILL_SCHEMA_VERSION: Final = 1
DISCOVERY_SCHEMA_VERSION: Final = 1
DiscoveryAction: TypeAlias = Literal["watch", "unwatch"]


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class Publication(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    msg_id: str
    kind: PublicationKind
    subject: str
    payload: bytes  # JSON
    created_at: int  # local wall clock, ms


class PublicationSink(Protocol):
    """Persists each publication, then hands it to its outbox; awaiting it is backpressure."""

    async def __call__(self, publications: Sequence[Publication], /) -> None: ...


def fill_msg_id(address: str, coin: str, tid: int, oid: int, time: int) -> str:
    """`{address}:fill:{coin}:{tid}`; a fill without a tid (0: system fills) is named by its oid and time instead,
    the same facts the engine dedups it on (`tracking.fills.fill_key`), so its id is as deterministic."""
    if tid:
        return f"{address}:fill:{coin}:{tid}"
    return f"{address}:fill:{coin}:o{oid}:t{time}"


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class FillRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One deduplicated fill as published on `hl.fills.{address}.{symbol}`. Field order is the JSON key order.

    `order_filled_size` / `order_vwap`: the size and Σ(px·sz)/Σsz of the fills of its order (its TWAP for a TWAP
    slice, its tape block for a tape trade) processed so far, this one included; null for a fill that joins no
    order (a dir that makes no signal, a late fill of an ended order).
    """

    fill_id: str
    address: str
    source: FillSource
    coin: str
    symbol: str
    asset_type: AssetType
    oid: int | None  # null for tape trades (the tape does not say)
    tid: int
    side: Literal["B", "A"]
    px: Decimal
    sz: Decimal
    dir: str
    start_position: Decimal
    time: int  # exchange time, ms
    crossed: bool
    hash: str
    fee: Decimal | None = None  # null for tape trades
    fee_token: str | None = None
    closed_pnl: Decimal | None = None
    liquidation: LiquidationInfo | None = None
    twap_id: int | None = None
    backfilled: bool = False
    order_filled_size: Decimal | None = None
    order_vwap: Decimal | None = None
    label: str | None = None
    detected_at: int  # local wall clock when the tracker accepted it, ms
    schema_version: int = FILL_SCHEMA_VERSION


class FillSink(Protocol):
    """Where the feeds hand the fills their trackers accepted (`delivery.fills.FillSinkImpl`): persisted, then
    published. Awaiting it is backpressure."""

    async def __call__(self, fills: Sequence[FillRecord], /) -> None: ...


class DiscoveryAnnouncement(msgspec.Struct, frozen=True, kw_only=True):
    """One change automatic discovery made to the watch list, as published on `hl.discovery.{address}`.

    `event_id` is `{address}:discovery:{action}:{at_ms}`: the decision's own time, persisted with the message
    before it is published, so a re-publish after an outage or a restart is stored once. The numbers are the
    evidence the decision was taken on (the candidate in `window` at that moment); an `unwatch` carries the last
    qualifying activity instead.
    """

    event_id: str
    address: str
    action: DiscoveryAction
    reason: str  # why, in words: "confirmed directional candidate", "no qualifying activity for 86400 s", …
    label: str  # the address-table label it was given (or had)
    window: str | None  # the window whose candidate qualified (watch), None for an unwatch
    notional_usd: float | None
    net_usd_by_coin: dict[str, float]
    account_value_usd: float | None  # the confirmation's account value (watch)
    evidence: tuple[str, ...]  # the label's reasons
    last_active_ms: int | None  # unwatch: the last time it still qualified
    at_ms: int  # local wall clock of the decision
    instance_id: str
    schema_version: int = DISCOVERY_SCHEMA_VERSION
