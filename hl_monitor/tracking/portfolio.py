"""What each watched address holds: perp positions per dex, account summaries and spot balances (pure).

`PositionModel` keeps one `AddressPortfolio` document per address (lowercase), built from:
- state frames, absolute: WS `allDexsClearinghouseState` (every dex at once; a dex missing from the frame is
  flat), WS or REST `clearinghouseState` (one dex), WS `spotState` / REST `spotClearinghouseState`;
- executions, relative: a `userFills` fill (it carries `startPosition`) or a public tape trade of the
  address (it does not);
- marks (`allMids`): revalue positions (value, PnL, return on equity, liquidation distance) and spot
  balances; never an event. A state frame's own mark is `positionValue ÷ |szi|`. Marks and state frames come
  on different connections and `allMids` carries no time, so each input's `now_ms` is the local time it was
  received: a mid received before the state frame that last marked a position is older than that frame's mark
  and leaves the position alone (counted in `stale_marks`); applied anyway, it would move the liquidation
  distance back and forth and rearm an alert for a crossing already alerted.
The arithmetic and the event and id forms are in `tracking.position_events`; alerts in `tracking.risk`.

Exactly one event per change, whichever of a fill, a tape trade or a state frame shows it first:
- an execution is remembered per coin by `(time, tid)` until a state frame covers it, so the same fill
  twice, or a fill and the tape trade of the same execution, apply once;
- an execution at or before the exchange `time` of the last state applied to its dex is already in that
  state (no event); a fill whose `startPosition` plus its own size equals the model's size was shown by a
  state without a time (no event);
- a state frame compares each coin with the model's size minus the executions newer than the state: equal
  is a confirmation (no event; the exchange's fields replace the model's), different is a change the
  executions did not show (a state-form event, counted as a drift). The first state of a dex shows what
  was held before the model looked: no events for coins it had never heard of.
After an execution the exchange-computed fields that depend on the size (`liquidation_px`, `margin_used`,
`liquidation_distance`) are unknown (None) until the next state frame: a stale liquidation price would
understate the risk.

Bad input never raises and never reaches a document: it is counted in `PortfolioStats.bad_input` by kind
(`BAD_INPUT_KINDS`); a bad item (a mark of 0, a fill of size 0, a dex outside the configured set) is skipped,
a bad field (a liquidation price of 0, a missing entry price) is stored as unknown (None), and the rest of
the input is applied. `export()` / `PositionModel.restore()` carry the
documents and the per-coin bookkeeping (remembered executions, alert state) across a restart.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Final, NamedTuple, get_args

import msgspec

from hl_monitor.errors import PortfolioStateError
from hl_monitor.hyperliquid.protocol import (
    AllDexsClearinghouseStateData,
    ClearinghouseState,
    Fill,
    MarginSummary,
    Position,
    SpotState,
    WsTrade,
)
from hl_monitor.hyperliquid.symbols import SymbolMap, is_spot_coin
from hl_monitor.tracking.position_events import (
    EventKind,
    LeverageType,
    PerpPosition,
    PositionEvent,
    Source,
    classify,
    fill_event_id,
    leverage_event_id,
    new_entry_px,
    seen_id,
    side_of,
    state_event_id,
    state_stamp,
    valued,
)
from hl_monitor.tracking.positions import STABLE_TOKENS
from hl_monitor.tracking.risk import DEFAULT_ALERT_LEVELS, AlertState, RiskAlert, alert_id, liquidation_distance, step

__all__ = [
    "BAD_INPUT_KINDS",
    "EXPORT_VERSION",
    "MAX_REMEMBERED",
    "AddressPortfolio",
    "CoinLedger",
    "DexAccount",
    "PortfolioStats",
    "PositionChanges",
    "PositionModel",
    "SpotHolding",
]

# Executions remembered per coin between two state frames. A state frame arrives every few seconds on the
# WS tier; a REST-read address trading faster than this on one coin loses the oldest, and an execution
# at or before the oldest forgotten one is then refused (`too_old`) rather than applied twice.
MAX_REMEMBERED: Final = 512
# Bumped when the export layout changes incompatibly; `restore` refuses other versions.
EXPORT_VERSION: Final = 1
_ZERO: Final = Decimal(0)
_NO_TIME: Final = -1
_LEVERAGE_TYPES: Final = frozenset(get_args(LeverageType))

# Kinds of bad input, each counted in `PortfolioStats.bad_input`.
BAD_INPUT_KINDS: Final = (
    "unknown_dex",  # a dex outside the configured set (`set_dexes`)
    "duplicate_dex",  # a dex twice in one allDexs frame (the first one counts)
    "duplicate_coin",  # a coin twice in one state or spot frame (the first one counts)
    "coin_outside_dex",  # a `dex:` coin inside another dex's state (kept where the exchange put it)
    "missing_entry_px",  # a position without entryPx (kept, with the model's entry when it has one)
    "missing_leverage",  # a position without a usable leverage (kept without one)
    "missing_position_value",  # positionValue 0 or negative: no mark from the state
    "bad_liquidation_px",  # liquidationPx 0 or negative (stored as None: no liquidation price)
    "bad_mark",  # a mid of 0 or less (ignored)
    "bad_fill",  # size or price 0 or less (ignored)
    "spot_execution",  # a spot fill or trade: spot balances come from spot state frames only
    "foreign_trade",  # a tape trade whose `users` do not include the address
    "self_trade",  # the address on both sides: no change
    "bad_spot_balance",  # a negative token total
    "too_old",  # an execution older than the remembered ones of its coin
)


class DexAccount(msgspec.Struct, frozen=True, kw_only=True):
    """One perp dex (`""` = the first) of one address. Summary fields are None until a state frame shows them."""

    dex: str
    account_value: Decimal | None = None
    total_ntl_pos: Decimal | None = None
    total_margin_used: Decimal | None = None
    withdrawable: Decimal | None = None
    cross_maintenance_margin_used: Decimal | None = None
    positions: dict[str, PerpPosition] = msgspec.field(default_factory=dict)
    state_time: int | None = None  # exchange time of the last state frame applied (None: none yet)
    source: Source
    as_of: int  # local wall clock of the last input that touched this dex, ms


class SpotHolding(msgspec.Struct, frozen=True, kw_only=True):
    """A spot token balance; `usd_value` is None while the token has no known dollar price."""

    coin: str
    token: int | None
    total: Decimal
    hold: Decimal
    entry_ntl: Decimal | None
    usd_value: Decimal | None


class AddressPortfolio(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one address holds. `source`/`as_of` name the input that last changed it and when."""

    address: str
    dexes: dict[str, DexAccount] = msgspec.field(default_factory=dict)
    spot: dict[str, SpotHolding] = msgspec.field(default_factory=dict)
    spot_as_of: int | None = None
    source: Source
    as_of: int

    @property
    def account_value(self) -> Decimal | None:
        """Perp account value summed over the dexes a state frame has shown."""
        values = [dex.account_value for dex in self.dexes.values() if dex.account_value is not None]
        return sum(values, _ZERO) if values else None

    def position(self, coin: str) -> PerpPosition | None:
        for dex in self.dexes.values():
            position = dex.positions.get(coin)
            if position is not None:
                return position
        return None


class PositionChanges(msgspec.Struct, frozen=True):
    """What one input produced: position events, and liquidation alerts it triggered."""

    events: list[PositionEvent] = msgspec.field(default_factory=list)
    alerts: list[RiskAlert] = msgspec.field(default_factory=list)


class PortfolioStats(msgspec.Struct, kw_only=True):
    states: int = 0  # dex states applied (one per dex of an allDexs frame)
    spot_states: int = 0
    fills: int = 0
    trades: int = 0
    mark_updates: int = 0
    events: int = 0
    alerts: int = 0
    duplicates: int = 0  # an execution already applied
    covered_by_state: int = 0  # an execution a state frame had already shown
    drifts: int = 0  # a state frame showed a size the executions had not produced
    states_out_of_order: int = 0  # a state older than one already applied to its dex (ignored)
    states_behind: int = 0  # coins whose state was older than executions already applied (kept)
    stale_marks: int = 0  # a position's mid received before the state frame that marked it (not applied)
    start_mismatches: int = 0  # a fill's startPosition disagreed with the model (the fill wins)
    bad_input: dict[str, int] = msgspec.field(default_factory=dict)  # by kind, see BAD_INPUT_KINDS


def _execution_key(entry: tuple[int, int, Decimal]) -> tuple[int, int]:
    return entry[0], entry[1]


class CoinLedger(msgspec.Struct, kw_only=True):
    """Bookkeeping of one coin of one address: executions newer than the last state, and alert state.

    `applied` is kept sorted by (time, tid): every fill is looked up in it and the oldest is forgotten first, so
    both are a binary search instead of a scan (and a sort) of up to `MAX_REMEMBERED` entries per fill.
    """

    applied: list[tuple[int, int, Decimal]] = msgspec.field(default_factory=list)  # (time, tid, delta)
    floor: int = _NO_TIME  # executions at or before this time were applied and forgotten
    marked_at: int = _NO_TIME  # local receive time of the state frame or mid that set the position's mark
    alert: AlertState | None = None

    def __post_init__(self) -> None:
        # Restored state may come from a version that kept arrival order.
        self.applied.sort(key=_execution_key)

    def has(self, time: int, tid: int) -> bool:
        i = bisect_left(self.applied, (time, tid), key=_execution_key)
        return i < len(self.applied) and _execution_key(self.applied[i]) == (time, tid)

    def remember(self, time: int, tid: int, delta: Decimal) -> None:
        insort(self.applied, (time, tid, delta), key=_execution_key)
        if len(self.applied) > MAX_REMEMBERED:
            forgotten = self.applied.pop(0)
            self.floor = max(self.floor, forgotten[0])


class _Execution(NamedTuple):
    """A fill or tape trade reduced to what changes a position (`start` only from fills)."""

    coin: str
    time: int
    tid: int
    delta: Decimal
    px: Decimal
    start: Decimal | None
    liquidated: bool
    source: Source


class _StateInput(NamedTuple):
    """One dex state being applied, and how it is named in ids."""

    dex: str
    state: ClearinghouseState
    first: bool  # no state of this dex applied before: coins the model never heard of are no event
    stamp: str
    time: int  # the state's exchange time, else the local time it arrived
    source: Source
    now_ms: int
    signal_id: str | None


class _Account:
    __slots__ = ("ledgers", "portfolio")

    def __init__(self, portfolio: AddressPortfolio, ledgers: dict[str, CoinLedger]) -> None:
        self.portfolio = portfolio
        self.ledgers = ledgers


class _AccountExport(msgspec.Struct, kw_only=True):
    portfolio: AddressPortfolio
    ledgers: dict[str, CoinLedger]


class _ModelExport(msgspec.Struct, kw_only=True):
    version: int
    accounts: list[_AccountExport]


_EXPORT_ENCODER: Final = msgspec.json.Encoder()
_EXPORT_DECODER: Final = msgspec.json.Decoder(_ModelExport)
_ACCOUNT_DECODER: Final = msgspec.json.Decoder(_AccountExport)


def _dex_of(coin: str) -> str:
    return coin.split(":", 1)[0] if ":" in coin else ""


class PositionModel:
    """Position documents per address; see the module docstring. Every input takes the caller's `now_ms`."""

    def __init__(
        self,
        *,
        symbols: SymbolMap | None = None,
        dexes: Iterable[str] | None = None,
        alert_levels: Sequence[Decimal] = DEFAULT_ALERT_LEVELS,
    ) -> None:
        self._symbols = symbols if symbols is not None else SymbolMap.empty()
        self._dexes = None if dexes is None else frozenset(dexes)
        self._levels = tuple(sorted(alert_levels, reverse=True))
        self._accounts: dict[str, _Account] = {}
        self._holders: dict[str, set[str]] = {}  # perp coin → addresses holding it (for marks)
        self._marks: dict[str, Decimal] = {}
        self._token_px: dict[str, Decimal] = {}
        self.stats = PortfolioStats()

    # ------------------------------------------------------------------------------------ configuration

    @property
    def alert_levels(self) -> tuple[Decimal, ...]:
        """The liquidation-distance alert levels, widest first."""
        return self._levels

    def set_symbols(self, symbols: SymbolMap) -> None:
        """New metadata: symbols of positions changed from now on, token prices from the next marks."""
        self._symbols = symbols

    def set_dexes(self, dexes: Iterable[str] | None) -> None:
        """Perp dexes accepted from now on (None: any)."""
        self._dexes = None if dexes is None else frozenset(dexes)

    # ------------------------------------------------------------------------------------ reading

    def get(self, address: str) -> AddressPortfolio | None:
        """The address's document (immutable: every input builds a new one)."""
        account = self._accounts.get(address.lower())
        return None if account is None else account.portfolio

    def __len__(self) -> int:
        return len(self._accounts)

    def __iter__(self) -> Iterator[str]:
        return iter(self._accounts)

    def holders(self, coins: Iterable[str]) -> set[str]:
        """Addresses holding a perp position in any of `coins` (their documents move with those coins' marks)."""
        out: set[str] = set()
        for coin in coins:
            out.update(self._holders.get(coin, ()))
        return out

    def remove(self, address: str) -> bool:
        """Forget an address (no events: nothing changed on the exchange)."""
        account = self._accounts.pop(address.lower(), None)
        if account is None:
            return False
        for dex in account.portfolio.dexes.values():
            for coin in dex.positions:
                self._unhold(coin, account.portfolio.address)
        return True

    # ------------------------------------------------------------------------------------ state frames

    def on_all_dexs_state(
        self, data: AllDexsClearinghouseStateData, now_ms: int, *, signal_id: str | None = None
    ) -> PositionChanges:
        """A WS `allDexsClearinghouseState` frame: replaces every dex (a dex missing from it is flat)."""
        account = self._account(data.user, "ws_state", now_ms)
        out = PositionChanges()
        seen: set[str] = set()
        latest = 0
        for dex, state in data.clearinghouse_states:
            if dex in seen:
                self._bad("duplicate_dex")
                continue
            seen.add(dex)
            latest = max(latest, state.time)
            self._apply_state(account, dex, state, "ws_state", now_ms, signal_id, out)
        for dex in [d for d in account.portfolio.dexes if d not in seen]:
            if self._dexes is not None and dex not in self._dexes:
                continue
            flat = ClearinghouseState(margin_summary=MarginSummary(account_value=_ZERO), time=latest)
            self._apply_state(account, dex, flat, "ws_state", now_ms, signal_id, out)
            if not account.portfolio.dexes[dex].positions:
                dexes = dict(account.portfolio.dexes)
                del dexes[dex]
                account.portfolio = msgspec.structs.replace(account.portfolio, dexes=dexes)
        return out

    def on_dex_state(
        self,
        address: str,
        dex: str,
        state: ClearinghouseState,
        now_ms: int,
        *,
        source: Source = "rest",
        signal_id: str | None = None,
    ) -> PositionChanges:
        """One dex's absolute state: REST `clearinghouseState`, or the WS channel of the same name."""
        account = self._account(address, source, now_ms)
        out = PositionChanges()
        self._apply_state(account, dex, state, source, now_ms, signal_id, out)
        return out

    def on_spot_state(self, address: str, state: SpotState, now_ms: int, *, source: Source = "ws_state") -> None:
        """WS `spotState` or REST `spotClearinghouseState`: replaces the spot balances (never an event)."""
        account = self._account(address, source, now_ms)
        self.stats.spot_states += 1
        spot: dict[str, SpotHolding] = {}
        for balance in state.balances:
            if balance.coin in spot:
                self._bad("duplicate_coin")
                continue
            if balance.total < 0:
                self._bad("bad_spot_balance")
                continue
            if balance.total == 0:
                continue
            spot[balance.coin] = SpotHolding(
                coin=balance.coin,
                token=balance.token,
                total=balance.total,
                hold=balance.hold,
                entry_ntl=balance.entry_ntl,
                usd_value=self._usd(balance.coin, balance.total),
            )
        account.portfolio = msgspec.structs.replace(
            account.portfolio, spot=spot, spot_as_of=now_ms, source=source, as_of=now_ms
        )

    # ------------------------------------------------------------------------------------ executions

    def on_fill(self, address: str, fill: Fill, now_ms: int, *, signal_id: str | None = None) -> PositionChanges:
        """A `userFills` / `userEvents` / REST fill of `address`."""
        self.stats.fills += 1
        address = address.lower()
        if is_spot_coin(fill.coin):
            self._bad("spot_execution")
            return PositionChanges()
        if fill.sz <= 0 or fill.px <= 0:
            self._bad("bad_fill")
            return PositionChanges()
        liq = fill.liquidation
        liquidated = liq is not None and (
            (liq.liquidated_user or "").lower() == address
            or (liq.liquidated_user is None and fill.dir.startswith("Liquidated"))
        )
        delta = fill.sz if fill.side == "B" else -fill.sz
        execution = _Execution(fill.coin, fill.time, fill.tid, delta, fill.px, fill.start_position, liquidated, "fills")
        return self._execute(address, execution, now_ms, signal_id)

    def on_trade(self, address: str, trade: WsTrade, now_ms: int, *, signal_id: str | None = None) -> PositionChanges:
        """A public tape trade with `address` among its `users` (`[buyer, seller]`)."""
        self.stats.trades += 1
        address = address.lower()
        users = tuple(u.lower() for u in trade.users) if trade.users is not None else ()
        if address not in users:
            self._bad("foreign_trade")
            return PositionChanges()
        if users[0] == users[1]:
            self._bad("self_trade")
            return PositionChanges()
        if is_spot_coin(trade.coin):
            self._bad("spot_execution")
            return PositionChanges()
        if trade.sz <= 0 or trade.px <= 0:
            self._bad("bad_fill")
            return PositionChanges()
        delta = trade.sz if users[0] == address else -trade.sz
        execution = _Execution(trade.coin, trade.time, trade.tid, delta, trade.px, None, False, "tape")
        return self._execute(address, execution, now_ms, signal_id)

    # ------------------------------------------------------------------------------------ marks

    def on_marks(self, mids: Mapping[str, Decimal], now_ms: int) -> list[RiskAlert]:
        """An `allMids` map (coin → mid) received at `now_ms`: revalues holders of those coins whose mark is not
        newer (see the module docstring); returns the alerts it triggered."""
        self.stats.mark_updates += 1
        alerts: list[RiskAlert] = []
        for coin, mid in mids.items():
            if mid <= 0:
                self._bad("bad_mark")
                continue
            self._marks[coin] = mid
            for address in list(self._holders.get(coin, ())):
                account = self._accounts[address]
                ledger = account.ledgers.setdefault(coin, CoinLedger())
                if ledger.marked_at > now_ms:
                    self.stats.stale_marks += 1
                    continue
                ledger.marked_at = now_ms
                dex_name = self._locate(account.portfolio, coin)
                dex = account.portfolio.dexes[dex_name]
                position = dex.positions[coin]
                revalued = valued(position, mid, now_ms)
                self._store_position(account, dex_name, coin, revalued)
                self._assess(account, revalued, now_ms, alerts)
        prices = {t: px for t, px in self._symbols.token_prices(mids).items() if px > 0}
        changed = {t for t, px in prices.items() if self._token_px.get(t) != px}
        if changed:
            self._token_px.update(prices)
            for account in self._accounts.values():
                spot = account.portfolio.spot
                if any(coin in changed for coin in spot):
                    repriced = {
                        coin: msgspec.structs.replace(h, usd_value=self._usd(coin, h.total)) for coin, h in spot.items()
                    }
                    account.portfolio = msgspec.structs.replace(account.portfolio, spot=repriced)
        return alerts

    # ------------------------------------------------------------------------------------ export

    def export(self) -> bytes:
        """Documents and per-coin bookkeeping as JSON (decimals as strings), for `restore`."""
        accounts = [_AccountExport(portfolio=a.portfolio, ledgers=a.ledgers) for a in self._accounts.values()]
        return _EXPORT_ENCODER.encode(_ModelExport(version=EXPORT_VERSION, accounts=accounts))

    def export_account(self, address: str) -> bytes | None:
        """One address's document and bookkeeping (for `restore_account`), stored beside its document."""
        account = self._accounts.get(address.lower())
        if account is None:
            return None
        return _EXPORT_ENCODER.encode(_AccountExport(portfolio=account.portfolio, ledgers=account.ledgers))

    def restore_account(self, raw: bytes | str) -> str:
        """Bring back one address from `export_account` output (its address); `PortfolioStateError` otherwise.

        The remembered executions and alert states come back with the document, so fills replayed after a
        restart are recognised and an alert already sent is not sent again.
        """
        try:
            item = _ACCOUNT_DECODER.decode(raw)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            raise PortfolioStateError(f"undecodable account export: {exc}") from None
        self.remove(item.portfolio.address)
        return self._adopt(item)

    @classmethod
    def restore(
        cls,
        raw: bytes | str,
        *,
        symbols: SymbolMap | None = None,
        dexes: Iterable[str] | None = None,
        alert_levels: Sequence[Decimal] = DEFAULT_ALERT_LEVELS,
    ) -> PositionModel:
        """A model from `export()` output; raises `PortfolioStateError` for anything else."""
        try:
            exported = _EXPORT_DECODER.decode(raw)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            raise PortfolioStateError(f"undecodable export: {exc}") from None
        if exported.version != EXPORT_VERSION:
            raise PortfolioStateError(f"export version {exported.version}, expected {EXPORT_VERSION}")
        model = cls(symbols=symbols, dexes=dexes, alert_levels=alert_levels)
        for item in exported.accounts:
            model._adopt(item)
        return model

    def _adopt(self, item: _AccountExport) -> str:
        """Take an exported account in as it is, with the coins it holds registered for marks; its address."""
        address = item.portfolio.address
        self._accounts[address] = _Account(item.portfolio, item.ledgers)
        for dex in item.portfolio.dexes.values():
            for coin in dex.positions:
                self._holders.setdefault(coin, set()).add(address)
        return address

    # ------------------------------------------------------------------------------------ internals

    def _bad(self, kind: str) -> None:
        self.stats.bad_input[kind] = self.stats.bad_input.get(kind, 0) + 1

    def _account(self, address: str, source: Source, now_ms: int) -> _Account:
        address = address.lower()
        account = self._accounts.get(address)
        if account is None:
            portfolio = AddressPortfolio(address=address, source=source, as_of=now_ms)
            account = self._accounts[address] = _Account(portfolio, {})
        return account

    def _usd(self, token: str, total: Decimal) -> Decimal | None:
        if token in STABLE_TOKENS:
            return total
        px = self._token_px.get(token)
        return None if px is None else total * px

    def _locate(self, portfolio: AddressPortfolio, coin: str) -> str:
        """The dex holding `coin`: its prefix's, or wherever a state frame put it."""
        home = _dex_of(coin)
        dex = portfolio.dexes.get(home)
        if dex is not None and coin in dex.positions:
            return home
        for name, other in portfolio.dexes.items():
            if coin in other.positions:
                return name
        return home

    def _unhold(self, coin: str, address: str) -> None:
        holders = self._holders.get(coin)
        if holders is not None:
            holders.discard(address)
            if not holders:
                del self._holders[coin]

    def _store_position(self, account: _Account, dex_name: str, coin: str, position: PerpPosition | None) -> None:
        """Copy-on-write of one position into the document (documents handed out never change)."""
        portfolio = account.portfolio
        dex = portfolio.dexes[dex_name]
        positions = dict(dex.positions)
        if position is None:
            positions.pop(coin, None)
            self._unhold(coin, portfolio.address)
        else:
            positions[coin] = position
            self._holders.setdefault(coin, set()).add(portfolio.address)
        dexes = dict(portfolio.dexes)
        dexes[dex_name] = msgspec.structs.replace(dex, positions=positions)
        account.portfolio = msgspec.structs.replace(portfolio, dexes=dexes)

    def _assess(self, account: _Account, position: PerpPosition, now_ms: int, alerts: list[RiskAlert]) -> None:
        ledger = account.ledgers.get(position.coin)
        if ledger is None or ledger.alert is None:
            return
        distance = position.liquidation_distance
        level = step(ledger.alert, distance, self._levels)
        if level is None or distance is None or position.liquidation_px is None or position.mark_px is None:
            return
        self.stats.alerts += 1
        alerts.append(
            RiskAlert(
                alert_id=alert_id(ledger.alert.anchor, level, ledger.alert.crossings),
                address=account.portfolio.address,
                coin=position.coin,
                symbol=position.symbol,
                dex=position.dex,
                side=position.side,
                size=position.size,
                level=level,
                liquidation_distance=distance,
                liquidation_px=position.liquidation_px,
                mark_px=position.mark_px,
                time=now_ms,
            )
        )

    def _execute(self, address: str, execution: _Execution, now_ms: int, signal_id: str | None) -> PositionChanges:
        coin, time, tid, delta, px, start, liquidated, source = execution
        account = self._accounts.get(address)
        portfolio = account.portfolio if account is not None else None
        dex_name = self._locate(portfolio, coin) if portfolio is not None else _dex_of(coin)
        if self._dexes is not None and dex_name not in self._dexes:
            self._bad("unknown_dex")
            return PositionChanges()
        account = self._account(address, source, now_ms)
        ledger = account.ledgers.setdefault(coin, CoinLedger())
        if ledger.has(time, tid):
            self.stats.duplicates += 1
            return PositionChanges()
        dex = account.portfolio.dexes.get(dex_name)
        if dex is not None and dex.state_time is not None and time <= dex.state_time:
            self.stats.covered_by_state += 1
            return PositionChanges()
        if time <= ledger.floor:
            self._bad("too_old")
            return PositionChanges()
        current = dex.positions.get(coin) if dex is not None else None
        before = current.size if current is not None else _ZERO
        base = before
        if start is not None and start != before:
            if start + delta == before:
                # A state frame without a time already showed this fill's result.
                ledger.remember(time, tid, delta)
                self.stats.covered_by_state += 1
                return PositionChanges()
            self.stats.start_mismatches += 1
            base = start
        after = base + delta
        ledger.remember(time, tid, delta)
        kind = classify(before, after, liquidated=liquidated)
        if kind is None:
            return PositionChanges()
        old_entry = current.entry_px if current is not None and (base > 0) == (before > 0) else None
        entry = new_entry_px(base, old_entry, after, px)
        if dex is None:
            dex = DexAccount(dex=dex_name, source=source, as_of=now_ms)
        dexes = dict(account.portfolio.dexes)
        dexes[dex_name] = msgspec.structs.replace(dex, source=source, as_of=now_ms)
        account.portfolio = msgspec.structs.replace(account.portfolio, dexes=dexes, source=source, as_of=now_ms)
        position: PerpPosition | None = None
        if after != 0:
            fresh = current is None or kind in ("opened", "flipped")
            position = PerpPosition(
                coin=coin,
                symbol=self._symbols.lookup(coin, spot=False).symbol,
                dex=dex_name,
                size=after,
                side=side_of(after),
                entry_px=entry,
                leverage_type=current.leverage_type if current is not None else None,
                leverage=current.leverage if current is not None else None,
                max_leverage=current.max_leverage if current is not None else None,
                cum_funding_since_open=_ZERO if fresh or current is None else current.cum_funding_since_open,
                opened_at=time if fresh or current is None else current.opened_at,
                updated_at=now_ms,
                source=source,
            )
            mark = self._marks.get(coin) or (current.mark_px if current is not None else None) or px
            position = valued(position, mark, now_ms)
        self._store_position(account, dex_name, coin, position)
        event_id = fill_event_id(address, coin, time, tid)
        ledger.alert = AlertState(anchor=event_id) if position is not None else None
        event = self._event(account, kind, event_id, coin, dex_name, current, position, time, source, now_ms, signal_id)
        return PositionChanges(events=[event])

    def _apply_state(
        self,
        account: _Account,
        dex_name: str,
        state: ClearinghouseState,
        source: Source,
        now_ms: int,
        signal_id: str | None,
        out: PositionChanges,
    ) -> None:
        if self._dexes is not None and dex_name not in self._dexes:
            self._bad("unknown_dex")
            return
        old = account.portfolio.dexes.get(dex_name)
        if old is not None and old.state_time and 0 < state.time < old.state_time:
            self.stats.states_out_of_order += 1  # e.g. two REST reads in flight: the newer one already applied
            return
        self.stats.states += 1
        first = old is None or old.state_time is None
        old_positions = old.positions if old is not None else {}
        shown: dict[str, Position] = {}
        for asset in state.asset_positions:
            position = asset.position
            if position.szi == 0:
                continue
            if position.coin in shown:
                self._bad("duplicate_coin")
                continue
            if _dex_of(position.coin) != dex_name:
                self._bad("coin_outside_dex")
            shown[position.coin] = position
        summary = state.margin_summary
        dex = DexAccount(
            dex=dex_name,
            account_value=summary.account_value,
            total_ntl_pos=summary.total_ntl_pos,
            total_margin_used=summary.total_margin_used,
            withdrawable=state.withdrawable,
            cross_maintenance_margin_used=state.cross_maintenance_margin_used,
            positions=dict(old_positions),
            # 0: a state was applied but carried no time (no execution is older than that).
            state_time=state.time if state.time > 0 else (old.state_time if old is not None and old.state_time else 0),
            source=source,
            as_of=now_ms,
        )
        dexes = dict(account.portfolio.dexes)
        dexes[dex_name] = dex
        account.portfolio = msgspec.structs.replace(account.portfolio, dexes=dexes, source=source, as_of=now_ms)
        state_time = state.time if state.time > 0 else now_ms
        context = _StateInput(dex_name, state, first, state_stamp(state), state_time, source, now_ms, signal_id)
        for coin in sorted(shown.keys() | old_positions.keys()):
            self._apply_state_coin(account, context, coin, shown.get(coin), old_positions.get(coin), out)
        if state.time > 0:
            for coin in list(account.ledgers):
                ledger = account.ledgers[coin]
                if _dex_of(coin) != dex_name and coin not in shown and coin not in old_positions:
                    continue
                ledger.applied = [entry for entry in ledger.applied if entry[0] > state.time]
                if not ledger.applied and ledger.alert is None:
                    del account.ledgers[coin]

    def _apply_state_coin(
        self,
        account: _Account,
        context: _StateInput,
        coin: str,
        shown: Position | None,
        current: PerpPosition | None,
        out: PositionChanges,
    ) -> None:
        dex_name, state, first, stamp, state_time, source, now_ms, signal_id = context
        address = account.portfolio.address
        ledger = account.ledgers.get(coin)
        applied = ledger.applied if ledger is not None else []
        later = sum((d for t, _, d in applied if t > state.time), _ZERO) if state.time > 0 else _ZERO
        model_size = current.size if current is not None else _ZERO
        actual = shown.szi if shown is not None else _ZERO
        if later != 0 and actual == model_size - later:
            self.stats.states_behind += 1  # the executions after this state already moved the position on
            return
        size = actual + later
        position: PerpPosition | None = None
        if size != 0:
            if later == 0 and shown is not None:
                position = self._from_state(shown, dex_name, current, state_time, source, now_ms)
            else:
                # Older than executions the state has not seen: its size moved on, its other fields are stale.
                base = current if current is not None else None
                if base is None and shown is not None:
                    base = self._from_state(shown, dex_name, None, state_time, source, now_ms)
                if base is None:
                    base = PerpPosition(
                        coin=coin,
                        symbol=self._symbols.lookup(coin, spot=False).symbol,
                        dex=dex_name,
                        size=size,
                        side=side_of(size),
                        entry_px=None,
                        opened_at=state_time,
                        updated_at=now_ms,
                        source=source,
                    )
                position = msgspec.structs.replace(
                    base,
                    size=size,
                    side=side_of(size),
                    liquidation_px=None,
                    liquidation_distance=None,
                    margin_used=None,
                    updated_at=now_ms,
                    source=source,
                )
                if position.mark_px is not None:
                    position = valued(position, position.mark_px, now_ms)
        self._store_position(account, dex_name, coin, position)
        kind = classify(model_size, size)
        if ledger is None:
            ledger = account.ledgers[coin] = CoinLedger()
        if later == 0 and shown is not None and shown.position_value > 0:
            ledger.marked_at = max(ledger.marked_at, now_ms)  # the state's own mark (see `_from_state`)
        changed = (current, position, state_time, source, now_ms, signal_id)
        if kind is None:
            if (
                current is not None
                and position is not None
                and current.leverage is not None
                and position.leverage is not None
                and (current.leverage_type, current.leverage) != (position.leverage_type, position.leverage)
            ):
                event_id = leverage_event_id(address, coin, stamp, position.leverage_type, position.leverage)
                out.events.append(self._event(account, "leverage_changed", event_id, coin, dex_name, *changed))
        elif first and current is None and not applied:
            ledger.alert = AlertState(anchor=seen_id(address, coin, stamp))  # held before the model looked
        else:
            self.stats.drifts += 1
            event_id = state_event_id(address, coin, stamp, size)
            out.events.append(self._event(account, kind, event_id, coin, dex_name, *changed))
            ledger.alert = AlertState(anchor=event_id)
        if position is None:
            ledger.alert = None
            return
        if ledger.alert is None:
            ledger.alert = AlertState(anchor=seen_id(address, coin, stamp))
        self._assess(account, position, now_ms, out.alerts)

    def _event(
        self,
        account: _Account,
        kind: EventKind,
        event_id: str,
        coin: str,
        dex_name: str,
        before: PerpPosition | None,
        after: PerpPosition | None,
        time: int,
        source: Source,
        now_ms: int,
        signal_id: str | None,
    ) -> PositionEvent:
        self.stats.events += 1
        return PositionEvent(
            event_id=event_id,
            event=kind,
            address=account.portfolio.address,
            coin=coin,
            symbol=self._symbols.lookup(coin, spot=False).symbol,
            dex=dex_name,
            size_before=before.size if before is not None else _ZERO,
            size_after=after.size if after is not None else _ZERO,
            before=before,
            after=after,
            time=time,
            detected_at=now_ms,
            source=source,
            signal_id=signal_id,
        )

    def _from_state(
        self,
        shown: Position,
        dex_name: str,
        current: PerpPosition | None,
        state_time: int,
        source: Source,
        now_ms: int,
    ) -> PerpPosition:
        """The exchange's view of one position, validated field by field (bad fields counted, not stored)."""
        size = shown.szi
        same_side = current is not None and (current.size > 0) == (size > 0)
        entry = shown.entry_px
        if entry is None or entry <= 0:
            self._bad("missing_entry_px")
            entry = current.entry_px if current is not None and same_side else None
        liq = shown.liquidation_px
        if liq is not None and liq <= 0:
            self._bad("bad_liquidation_px")
            liq = None
        leverage_type: LeverageType | None = None
        leverage: int | None = None
        lev = shown.leverage
        if lev is not None and lev.type in _LEVERAGE_TYPES and lev.value > 0:
            leverage_type = "cross" if lev.type == "cross" else "isolated"
            leverage = lev.value
        else:
            self._bad("missing_leverage")
        mark: Decimal | None = None
        value: Decimal | None = None
        if shown.position_value > 0:
            value = shown.position_value
            mark = shown.position_value / abs(size)
        else:
            self._bad("missing_position_value")
            mark = self._marks.get(shown.coin)
            value = abs(size) * mark if mark is not None else None
        funding = shown.cum_funding.since_open if shown.cum_funding is not None else None
        return PerpPosition(
            coin=shown.coin,
            symbol=self._symbols.lookup(shown.coin, spot=False).symbol,
            dex=dex_name,
            size=size,
            side=side_of(size),
            entry_px=entry,
            mark_px=mark,
            position_value_usd=value,
            unrealized_pnl=shown.unrealized_pnl,
            return_on_equity=shown.return_on_equity,
            leverage_type=leverage_type,
            leverage=leverage,
            max_leverage=shown.max_leverage,
            liquidation_px=liq,
            liquidation_distance=liquidation_distance(mark, liq),
            margin_used=shown.margin_used,
            cum_funding_since_open=funding,
            opened_at=current.opened_at if current is not None and same_side else state_time,
            updated_at=now_ms,
            source=source,
        )
