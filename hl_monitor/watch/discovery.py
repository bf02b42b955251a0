"""The owner of whale discovery: counts the tape's parties, confirms the top candidates, answers `/discovery`.

Inputs: the deduplicated trades of `feeds.market_tape.MarketTape` (its `discovery` intake), handed to the pure
`tracking.discovery.Discovery` (bounded heavy hitters per window, labels with evidence). Output: candidate rows
for `GET /discovery` and `hl-monitor discover`, each with the account value once confirmed and whether the address
is already watched. Adding a candidate to the watch list goes through the address table like every other admin
change (`POST /admin/discovery/{address}/watch` in `ops/http.py`, tier wide, label `discovered:<label>`).

Confirmation: every `discovery.pass_interval` (30 s) the top `discovery.confirm_top` candidates of each window
(with `discovery.auto_watch` also its top directional ones above `discovery.auto_min_notional_usd`) that have no
confirmation younger than `discovery.confirm_ttl` are read with one `clearinghouseState` each (the first perp
dex), at low priority and paced so these reads never take more than `discovery.rest_share` of the per-IP REST
weight (`docs/protocol.md` §4, §5). A read that fails is counted and retried on a later pass. An account below
`discovery.min_account_usd` is shown with its value and `promotable: false`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import msgspec

from hl_monitor.clock import wall_ms as _wall_ms
from hl_monitor.config import DiscoveryConfig, HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import HlMonitorError
from hl_monitor.hyperliquid.constants import info_weight
from hl_monitor.hyperliquid.protocol import ClearinghouseState, WsTrade
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.discovery import Candidate, Discovery, Label

__all__ = ["Confirmation", "DiscoveryInfo", "DiscoveryKeeper", "parse_window", "window_name"]

log = get_logger(__name__)

# Confirmations remembered at most (each a few numbers): several passes' worth of every window's top.
MAX_CONFIRMATIONS: Final = 10_000
_CONFIRM_WEIGHT: Final = info_weight("clearinghouseState")
_SECONDS_PER_UNIT: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DiscoveryInfo(Protocol):
    async def clearinghouse_state(
        self, user: str, dex: str = "", *, priority: Priority = ...
    ) -> ClearinghouseState: ...


class Confirmation(msgspec.Struct, frozen=True, kw_only=True):
    """One `clearinghouseState` read of a candidate (first perp dex)."""

    account_value_usd: float
    open_positions: int
    max_leverage: float | None  # the highest leverage of its open positions
    read_at_ms: int


def window_name(window_ms: int) -> str:
    """`3600000` → `1h`, `86400000` → `24h`, `90000` → `90s`: the names `/discovery?window=` accepts."""
    seconds = window_ms // 1000
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def parse_window(text: str) -> int | None:
    """A window name (`1h`, `24h`, `90m`, `1d`, `3600s`, `3600`) in ms, or None when it is not one."""
    text = text.strip().lower()
    unit = text[-1:] if text[-1:] in _SECONDS_PER_UNIT else "s"
    number = text[:-1] if text[-1:] in _SECONDS_PER_UNIT else text
    if not number.isdigit():
        return None
    return int(number) * _SECONDS_PER_UNIT[unit] * 1000


class DiscoveryKeeper:
    """See the module docstring. `on_trades` is the tape's intake; `run()` confirms until cancelled."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        hl: HyperliquidConfig,
        *,
        info: DiscoveryInfo,
        metrics: Metrics,
        is_watched: Callable[[str], bool],
        wall_ms: Callable[[], int] = _wall_ms,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cfg = cfg
        self.windows_ms = [round(w * 1000) for w in cfg.windows]
        self.discovery = Discovery(self.windows_ms, cfg.max_tracked, exclude=cfg.exclude, start_ms=wall_ms())
        self._info = info
        self._metrics = metrics
        self._is_watched = is_watched
        self._wall_ms = wall_ms
        self._clock = clock
        self._sleep = sleep
        # Weight per second the confirmation reads may spend.
        self._rate = cfg.rest_share * hl.rest_weight_per_minute / 60.0
        self._next_slot = 0.0
        self._confirmed: OrderedDict[str, Confirmation] = OrderedDict()
        self._evictions = dict.fromkeys(self.windows_ms, 0)
        self.reads = 0
        self.weight_spent = 0

    # ------------------------------------------------------------------ intake

    def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None:
        before = self.discovery.trades
        self.discovery.on_trades(trades, now_ms)
        self._metrics.discovery_trades.inc(self.discovery.trades - before)

    # ------------------------------------------------------------------ reading

    def window_names(self) -> list[str]:
        return [window_name(w) for w in self.windows_ms]

    def window_ms(self, name: str) -> int | None:
        """The configured window a name stands for (`24h` and `1d` are one window), or None."""
        ms = parse_window(name)
        return ms if ms in self.windows_ms else None

    def confirmation(self, address: str) -> Confirmation | None:
        return self._confirmed.get(address)

    def candidates(self, window_ms: int, *, label: Label | None = None, limit: int | None = None) -> list[Candidate]:
        self.discovery.advance(self._wall_ms())
        return self.discovery.candidates(window_ms, label=label, limit=limit)

    def candidate(self, window_ms: int, address: str) -> Candidate | None:
        """One address's candidate in one window (None when it is not tracked there)."""
        self.discovery.advance(self._wall_ms())
        return self.discovery.get(window_ms, address)

    def rows(self, window_ms: int, *, label: Label | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """`GET /discovery`'s candidates, largest notional first."""
        return [self.row(c) for c in self.candidates(window_ms, label=label, limit=limit)]

    def row(self, c: Candidate) -> dict[str, Any]:
        confirmed = self._confirmed.get(c.address)
        return {
            "address": c.address,
            "window": window_name(c.window_s * 1000),
            "label": c.label,
            "notional_usd": c.notional_usd,
            "trades": c.trades,
            "buy_usd": c.buy_usd,
            "sell_usd": c.sell_usd,
            "net_usd_by_coin": c.net_usd_by_coin,
            "evidence": msgspec.to_builtins(c.evidence),
            "account_value_usd": None if confirmed is None else confirmed.account_value_usd,
            "open_positions": None if confirmed is None else confirmed.open_positions,
            "max_leverage": None if confirmed is None else confirmed.max_leverage,
            "promotable": confirmed is not None and confirmed.account_value_usd >= self.cfg.min_account_usd,
            "watched": self._is_watched(c.address),
        }

    def label_of(self, address: str) -> Label | None:
        """The address's label in the longest window that tracks it (the steadiest view), or None."""
        for window in sorted(self.windows_ms, reverse=True):
            c = self.discovery.get(window, address)
            if c is not None:
                return c.label
        return None

    def status(self) -> dict[str, Any]:
        return {
            "trades": self.discovery.trades,
            "tracked": {window_name(w): len(t) for w, t in self.discovery.tables.items()},
            "confirmed": len(self._confirmed),
            "reads": self.reads,
            "weight_spent": self.weight_spent,
            "rest_share_per_minute": round(self._rate * 60),
        }

    def export(self) -> None:
        """Bring the gauges and eviction counters up to date (called by the confirmation loop)."""
        for w, table in self.discovery.tables.items():
            name = window_name(w)
            self._metrics.discovery_tracked.labels(window=name).set(len(table))
            new = table.evictions - self._evictions[w]
            if new:
                self._metrics.discovery_evictions.labels(window=name).inc(new)
                self._evictions[w] = table.evictions

    # ------------------------------------------------------------------ confirmation

    def due(self) -> list[str]:
        """The top candidates of every window without a fresh confirmation, best first, each once."""
        now = self._wall_ms()
        ttl_ms = round(self.cfg.confirm_ttl * 1000)
        out: dict[str, None] = {}
        for window in self.windows_ms:
            for c in self.candidates(window, limit=self.cfg.confirm_top):
                if c.label == "engine":
                    continue  # engine flow is a liquidation or a TWAP, not an account worth a read
                known = self._confirmed.get(c.address)
                if known is None or now - known.read_at_ms >= ttl_ms:
                    out.setdefault(c.address)
            if not self.cfg.auto_watch:
                continue
            # Makers lead by notional: the directional ones automatic watching may add are confirmed as well.
            for c in self.candidates(window, label="directional", limit=self.cfg.confirm_top):
                if c.notional_usd < self.cfg.auto_min_notional_usd:
                    break
                known = self._confirmed.get(c.address)
                if known is None or now - known.read_at_ms >= ttl_ms:
                    out.setdefault(c.address)
        return list(out)

    async def confirm_due(self) -> int:
        """One pass: read every due candidate, paced within the share; returns how many were confirmed."""
        confirmed = 0
        for address in self.due():
            await self._pace(_CONFIRM_WEIGHT)
            self.reads += 1
            self.weight_spent += _CONFIRM_WEIGHT
            try:
                state = await self._info.clearinghouse_state(address, priority="low")
            except HlMonitorError as exc:
                self._metrics.discovery_confirm_reads.labels(outcome="error").inc()
                log.warning("discovery confirmation failed", address=address, error=str(exc))
                continue
            self._metrics.discovery_confirm_reads.labels(outcome="ok").inc()
            self._remember(address, state)
            confirmed += 1
        return confirmed

    def _remember(self, address: str, state: ClearinghouseState) -> None:
        leverages = [float(p.leverage.value) for p in state.positions().values() if p.leverage is not None]
        self._confirmed[address] = Confirmation(
            account_value_usd=float(state.margin_summary.account_value),
            open_positions=sum(1 for p in state.positions().values() if p.szi != 0),
            max_leverage=max(leverages) if leverages else None,
            read_at_ms=self._wall_ms(),
        )
        self._confirmed.move_to_end(address)
        while len(self._confirmed) > MAX_CONFIRMATIONS:
            self._confirmed.popitem(last=False)

    async def _pace(self, weight: int) -> None:
        """Start a read only once the previous reads' weight has drained at the share's rate."""
        now = self._clock()
        start = max(now, self._next_slot)
        self._next_slot = start + weight / self._rate
        if start > now:
            await self._sleep(start - now)

    async def run(self) -> None:
        while True:
            self.export()
            await self.confirm_due()
            await self._sleep(self.cfg.pass_interval)
