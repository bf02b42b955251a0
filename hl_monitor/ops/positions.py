"""The read side of what whales hold: position lists, the per-symbol whale bias and the position gauges (pure).

Everything here reads `AddressPortfolio` documents (see `tracking.portfolio`) handed over by a
`PositionsView` and computes answers; nothing is stored and nothing waits. The HTTP routes in `ops.http`
and the composition root's metrics timer call these functions with the live documents.

Arithmetic is exact `Decimal` (a division rounds in the current decimal context) and every decimal leaves
as a string in plain notation (`"98450.0"`, never `"9.845E+4"`), so JSON clients lose no digits. A value the
document does not know (None: no mark yet, no liquidation price) stays unknown: it is never counted as 0 in
a sum, it sorts last, and `min_usd` does not select it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeAlias, get_args

import msgspec
from prometheus_client import Gauge

from hl_monitor.domain.signal import PositionSide
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.portfolio import AddressPortfolio
from hl_monitor.tracking.position_events import PerpPosition, format_decimal

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "SORT_KEYS",
    "Bias",
    "ClosestLiquidation",
    "Holding",
    "LabelOf",
    "PositionsView",
    "SideFilter",
    "SortKey",
    "SymbolSummary",
    "document_json",
    "export_gauges",
    "level_label",
    "list_positions",
    "plain",
    "position_row",
    "select_positions",
    "summarize",
    "summary",
]

SortKey: TypeAlias = Literal["value", "pnl", "liquidation_distance"]
SideFilter: TypeAlias = Literal["long", "short"]
Bias: TypeAlias = Literal["long", "short", "flat"]
LabelOf: TypeAlias = Callable[[str], str]

SORT_KEYS: Final = get_args(SortKey)
DEFAULT_LIMIT: Final = 100  # one screen of the biggest positions
MAX_LIMIT: Final = 1000  # every position of a few hundred whales, and still a small answer
_ZERO: Final = Decimal(0)
_SIDE_OF_FILTER: Final[Mapping[SideFilter, PositionSide]] = {"long": "LONG", "short": "SHORT"}


class PositionsView(Protocol):
    """Read-only view of the live position documents; every method is cheap and called on the event loop."""

    def portfolios(self) -> Iterable[AddressPortfolio]:
        """Every document, one per watched address that has one (addresses lowercase)."""
        ...

    def portfolio(self, address: str) -> AddressPortfolio | None:
        """The document of one address (normalised lowercase), or None when there is none."""
        ...

    def label(self, address: str) -> str:
        """The address's label in the watched set; `""` when it has none."""
        ...


def _no_label(address: str) -> str:
    return ""


# ---------------------------------------------------------------- decimals out


def _decimal_text(value: Decimal) -> str:
    """Exact plain notation: the digits the value has, no exponent, no negative zero."""
    if value.is_zero():
        value = abs(value)
    return format(value, "f")


def plain(value: Any) -> Any:
    """`value` (builtins from `msgspec.to_builtins(..., builtin_types=(Decimal,))`) with decimals as plain text."""
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def _json(struct: msgspec.Struct) -> Any:
    return plain(msgspec.to_builtins(struct, builtin_types=(Decimal,)))


def _opt(value: Decimal | None) -> str | None:
    return None if value is None else _decimal_text(value)


def level_label(level: Decimal) -> str:
    """An alert level as the `level` label value: plain, without trailing zeros (`0.10` → `0.1`, `0.02`)."""
    return format_decimal(level)


# ---------------------------------------------------------------- positions


class Holding(NamedTuple):
    """One non-flat perp position with the address holding it."""

    address: str
    position: PerpPosition


def _matches_symbol(position: PerpPosition, wanted: str) -> bool:
    return wanted in (position.symbol.lower(), position.coin.lower())


def _holdings(docs: Iterable[AddressPortfolio]) -> Iterable[Holding]:
    for doc in docs:
        for dex in doc.dexes.values():
            for position in dex.positions.values():
                if position.size != 0:
                    yield Holding(doc.address, position)


def _sort_key(sort: SortKey) -> Callable[[Holding], tuple[Any, ...]]:
    """Known values first (value and PnL largest first, liquidation distance closest first), then unknown."""

    def key(holding: Holding) -> tuple[Any, ...]:
        position = holding.position
        if sort == "value":
            value = position.position_value_usd
            rank = _ZERO if value is None else -value
        elif sort == "pnl":
            value = position.unrealized_pnl
            rank = _ZERO if value is None else -value
        else:
            value = position.liquidation_distance
            rank = _ZERO if value is None else value
        return (value is None, rank, holding.address, position.coin)

    return key


def select_positions(
    docs: Iterable[AddressPortfolio],
    *,
    symbol: str | None = None,
    min_usd: Decimal | None = None,
    side: SideFilter | None = None,
    sort: SortKey = "value",
) -> list[Holding]:
    """Every non-flat perp position passing the filters, sorted (ties by address, then coin).

    `symbol` matches a position's symbol (`BTCUSDC`) or wire coin (`BTC`, `xyz:TSLA`), case-insensitively;
    `min_usd` keeps positions whose known value is at least that; `side` keeps one side.
    """
    wanted = symbol.lower() if symbol is not None else None
    keep_side = _SIDE_OF_FILTER[side] if side is not None else None
    selected = [
        holding
        for holding in _holdings(docs)
        if (wanted is None or _matches_symbol(holding.position, wanted))
        and (keep_side is None or holding.position.side == keep_side)
        and (
            min_usd is None
            or (holding.position.position_value_usd is not None and holding.position.position_value_usd >= min_usd)
        )
    ]
    selected.sort(key=_sort_key(sort))
    return selected


def position_row(holding: Holding, label: LabelOf = _no_label) -> dict[str, Any]:
    """One position as a JSON-able row: decimals as strings, unknown values as null, `size` signed."""
    p = holding.position
    return {
        "address": holding.address,
        "label": label(holding.address),
        "coin": p.coin,
        "symbol": p.symbol,
        "dex": p.dex,
        "side": p.side,
        "size": _decimal_text(p.size),
        "entry_px": _opt(p.entry_px),
        "mark_px": _opt(p.mark_px),
        "position_value_usd": _opt(p.position_value_usd),
        "unrealized_pnl": _opt(p.unrealized_pnl),
        "return_on_equity": _opt(p.return_on_equity),
        "leverage_type": p.leverage_type,
        "leverage": p.leverage,
        "liquidation_px": _opt(p.liquidation_px),
        "liquidation_distance": _opt(p.liquidation_distance),
        "margin_used": _opt(p.margin_used),
        "opened_at": p.opened_at,
        "source": p.source,
        "as_of": p.updated_at,
    }


def list_positions(
    docs: Iterable[AddressPortfolio],
    *,
    label: LabelOf = _no_label,
    symbol: str | None = None,
    min_usd: Decimal | None = None,
    side: SideFilter | None = None,
    sort: SortKey = "value",
    limit: int = DEFAULT_LIMIT,
) -> list[dict[str, Any]]:
    """The first `limit` positions of `select_positions` as rows (`position_row`)."""
    selected = select_positions(docs, symbol=symbol, min_usd=min_usd, side=side, sort=sort)
    return [position_row(holding, label) for holding in selected[:limit]]


def document_json(doc: AddressPortfolio, label: LabelOf = _no_label) -> dict[str, Any]:
    """A whole document as JSON-able data, with the address's label and its total perp account value."""
    body: dict[str, Any] = _json(doc)
    return {"address": doc.address, "label": label(doc.address), "account_value": _opt(doc.account_value), **body}


# ---------------------------------------------------------------- whale bias per symbol


class ClosestLiquidation(msgspec.Struct, frozen=True, kw_only=True):
    """The position of a symbol nearest to its liquidation price."""

    address: str
    label: str
    coin: str
    side: PositionSide
    liquidation_distance: Decimal
    liquidation_px: Decimal | None
    mark_px: Decimal | None


class SymbolSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The watched whales' bias on one symbol. Sums and averages cover the positions whose inputs are known."""

    symbol: str
    coins: list[str]  # wire coins of the symbol (one, unless two dexes list the same name)
    longs: int  # addresses holding it long
    shorts: int  # addresses holding it short
    long_notional_usd: Decimal
    short_notional_usd: Decimal
    gross_notional_usd: Decimal  # long + short
    net_notional_usd: Decimal  # long − short
    bias: Bias  # the sign of the net notional
    long_avg_entry_px: Decimal | None  # Σ(value·entry) ÷ Σ value over long positions with both known
    short_avg_entry_px: Decimal | None
    unrealized_pnl_usd: Decimal
    closest_liquidation: ClosestLiquidation | None


@dataclass(slots=True)
class _Side:
    addresses: set[str]
    notional: Decimal = _ZERO
    weighted_entry: Decimal = _ZERO  # Σ value·entry
    weight: Decimal = _ZERO  # Σ value over positions with a known entry

    def add(self, address: str, position: PerpPosition) -> None:
        self.addresses.add(address)
        value = position.position_value_usd
        if value is None:
            return
        self.notional += value
        if position.entry_px is not None:
            self.weighted_entry += value * position.entry_px
            self.weight += value

    def average_entry(self) -> Decimal | None:
        return self.weighted_entry / self.weight if self.weight > 0 else None


@dataclass(slots=True)
class _Symbol:
    coins: set[str]
    long: _Side
    short: _Side
    pnl: Decimal = _ZERO
    closest: Holding | None = None


def summarize(docs: Iterable[AddressPortfolio], label: LabelOf = _no_label) -> list[SymbolSummary]:
    """One `SymbolSummary` per symbol held, largest gross notional first (ties by symbol)."""
    groups: dict[str, _Symbol] = {}
    for holding in _holdings(docs):
        position = holding.position
        group = groups.get(position.symbol)
        if group is None:
            group = groups[position.symbol] = _Symbol(set(), _Side(set()), _Side(set()))
        group.coins.add(position.coin)
        (group.long if position.side == "LONG" else group.short).add(holding.address, position)
        if position.unrealized_pnl is not None:
            group.pnl += position.unrealized_pnl
        distance = position.liquidation_distance
        if distance is not None:
            best = group.closest
            best_key = None if best is None else (best.position.liquidation_distance, best.address, best.position.coin)
            if best_key is None or (distance, holding.address, position.coin) < best_key:
                group.closest = holding
    out = [_symbol_summary(symbol, group, label) for symbol, group in groups.items()]
    out.sort(key=lambda s: (-s.gross_notional_usd, s.symbol))
    return out


def _symbol_summary(symbol: str, group: _Symbol, label: LabelOf) -> SymbolSummary:
    net = group.long.notional - group.short.notional
    closest = None
    if group.closest is not None:
        address, position = group.closest
        assert position.liquidation_distance is not None  # only positions with a distance are kept
        closest = ClosestLiquidation(
            address=address,
            label=label(address),
            coin=position.coin,
            side=position.side,
            liquidation_distance=position.liquidation_distance,
            liquidation_px=position.liquidation_px,
            mark_px=position.mark_px,
        )
    return SymbolSummary(
        symbol=symbol,
        coins=sorted(group.coins),
        longs=len(group.long.addresses),
        shorts=len(group.short.addresses),
        long_notional_usd=group.long.notional,
        short_notional_usd=group.short.notional,
        gross_notional_usd=group.long.notional + group.short.notional,
        net_notional_usd=net,
        bias="long" if net > 0 else "short" if net < 0 else "flat",
        long_avg_entry_px=group.long.average_entry(),
        short_avg_entry_px=group.short.average_entry(),
        unrealized_pnl_usd=group.pnl,
        closest_liquidation=closest,
    )


def summary(
    docs: Iterable[AddressPortfolio], label: LabelOf = _no_label, *, symbol: str | None = None
) -> list[dict[str, Any]]:
    """`summarize` as JSON-able rows (decimals as strings); `symbol` keeps the one matching symbol or coin."""
    rows = summarize(docs, label)
    if symbol is not None:
        wanted = symbol.lower()
        rows = [s for s in rows if wanted == s.symbol.lower() or wanted in (c.lower() for c in s.coins)]
    return [_json(s) for s in rows]


# ---------------------------------------------------------------- gauges


def _replace_series(gauge: Gauge, names: tuple[str, ...], values: Mapping[tuple[str, ...], float]) -> None:
    """Set `values` (label values in the order of `names`) and remove every other label set the gauge still
    exports (a symbol no longer held)."""
    stale: set[tuple[str, ...]] = set()
    for family in gauge.collect():
        for sample in family.samples:
            labels = tuple(sample.labels[name] for name in names)
            if labels not in values:
                stale.add(labels)
    for labels in stale:
        gauge.remove(*labels)
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


def export_gauges(metrics: Metrics, docs: Iterable[AddressPortfolio], levels: Sequence[Decimal]) -> None:
    """Set the whale gauges from the documents: notional per symbol and side (both sides of every symbol
    held, 0 for a side nobody holds), unrealized PnL per symbol, and per alert level the positions closer
    to liquidation than it (the same strict `<` the alerts use). Symbols no longer held are removed."""
    docs = list(docs)
    notional: dict[tuple[str, ...], float] = {}
    pnl: dict[tuple[str, ...], float] = {}
    for s in summarize(docs):
        notional[(s.symbol, "long")] = float(s.long_notional_usd)
        notional[(s.symbol, "short")] = float(s.short_notional_usd)
        pnl[(s.symbol,)] = float(s.unrealized_pnl_usd)
    near = dict.fromkeys(levels, 0)
    for holding in _holdings(docs):
        distance = holding.position.liquidation_distance
        if distance is None:
            continue
        for level in levels:
            if distance < level:
                near[level] += 1
    # Prometheus side label values are lowercase like every other label value of the service.
    _replace_series(metrics.whale_notional_usd, ("symbol", "side"), notional)
    _replace_series(metrics.whale_unrealized_pnl_usd, ("symbol",), pnl)
    near_series: dict[tuple[str, ...], float] = {(level_label(level),): float(count) for level, count in near.items()}
    _replace_series(metrics.positions_near_liquidation, ("level",), near_series)
