"""Keeps the coin → symbol map current: perps of every dex, spot pairs, aliases and `pair_configs` categories.

`load()` makes one attempt and never raises: a failure keeps the last good map (empty before the first
success), is counted and logged, and `run()` retries it with a doubling delay. `run()` also reloads every
`symbols.refresh_interval` and, at most every `symbols.reload_min_interval`, as soon as `request_reload(coin)`
reports a coin the map does not know (the tracking engine calls it from a frame); while loads fail, requests
wait for the retry backoff like everything else. A coin still unknown after a successful reload is not asked
for again until the next scheduled refresh, so a coin the exchange's metadata never lists cannot turn into a
reload loop. Each new map goes to `on_update` (e.g. `engine.set_symbols`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from hl_monitor.config import SymbolsConfig
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.protocol import PerpMeta
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.logging import get_logger
from hl_monitor.metrics import Metrics

__all__ = ["SymbolLoader"]

log = get_logger(__name__)

# Coins remembered between reloads (requested, or unknown after a reload); the exchange lists a few hundred.
MAX_TRACKED_COINS: Final = 1024


class SymbolLoader:
    """Owns the current `SymbolMap`; `symbols` is always usable (empty until the first successful load)."""

    def __init__(
        self,
        info: InfoClient,
        cfg: SymbolsConfig,
        metrics: Metrics,
        *,
        categories: Callable[[], Awaitable[dict[str, int] | None]] | None = None,
        on_update: Callable[[SymbolMap], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._info = info
        self._cfg = cfg
        self._metrics = metrics
        self._load_pair_categories = categories
        self._on_update = on_update
        self._clock = clock
        self.symbols = SymbolMap.empty()
        self.loads = 0  # successful loads
        self.failures = 0  # consecutive failed loads (0 after a success)
        self.last_error: str | None = None
        self._ok = False  # the last attempt succeeded
        self._last_attempt: float | None = None
        self._categories: Mapping[str, int] | None = None
        self._requested: set[str] = set()
        self._unresolved: set[str] = set()
        self._wake = asyncio.Event()

    @property
    def loaded(self) -> bool:
        """At least one load succeeded."""
        return self.loads > 0

    @property
    def pending_requests(self) -> frozenset[str]:
        """Unknown coins waiting for the next reload."""
        return frozenset(self._requested)

    def request_reload(self, coin: str) -> None:
        """A frame named a coin the map does not know: reload soon (debounced). Never raises."""
        if self.symbols.is_known(coin) or coin in self._unresolved or coin in self._requested:
            return
        if len(self._requested) < MAX_TRACKED_COINS:
            self._requested.add(coin)
        self._wake.set()

    async def load(self) -> bool:
        """One load of every metadata source; True when the map was replaced."""
        self._last_attempt = self._clock()
        requested, self._requested = self._requested, set()
        self._wake.clear()
        try:
            dexs = await self._info.perp_dexs()
            metas: dict[str, PerpMeta] = {}
            for name in ["", *(dex.name for dex in dexs if dex is not None)]:
                metas[name] = await self._info.meta(name)
            spot = await self._info.spot_meta()
        except Exception as exc:
            self._failed(exc, requested)
            return False
        await self._load_categories()
        symbols = SymbolMap.build(perp_metas=metas, spot_meta=spot, perp_dexs=dexs, pair_categories=self._categories)
        self.symbols = symbols
        self.loads += 1
        self.failures = 0
        self.last_error = None
        self._ok = True
        still_unknown = {coin for coin in requested if not symbols.is_known(coin)}
        if len(self._unresolved) + len(still_unknown) <= MAX_TRACKED_COINS:
            self._unresolved |= still_unknown
        self._metrics.symbol_reloads.labels(outcome="ok").inc()
        log.info(
            "symbols loaded",
            coins=len(symbols),
            dexes=len(symbols.dexes),
            requested=sorted(requested),
            still_unknown=sorted(still_unknown),
        )
        if self._on_update is not None:
            self._on_update(symbols)
        return True

    def _failed(self, exc: Exception, requested: set[str]) -> None:
        self.failures += 1
        self._ok = False
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._requested |= requested  # still wanted: the retry answers them
        self._metrics.symbol_reloads.labels(outcome="failed").inc()
        log.warning(
            "symbols load failed; keeping the last good map",
            error=self.last_error,
            failures=self.failures,
            retry_in_s=round(self._retry_delay(), 3),
            coins=len(self.symbols),
        )

    async def _load_categories(self) -> None:
        """`pair_configs` categories (coin_type); a database problem keeps the previous ones."""
        if self._load_pair_categories is None:
            return
        try:
            self._categories = await self._load_pair_categories()
        except Exception as exc:
            self._metrics.symbol_reloads.labels(outcome="categories_failed").inc()
            log.warning("pair_configs reload failed; keeping the previous categories", error=f"{type(exc).__name__}")

    def _retry_delay(self) -> float:
        delay: float = self._cfg.retry_initial_delay * 2.0 ** max(self.failures - 1, 0)
        return min(delay, self._cfg.retry_max_delay)

    def _due(self) -> float:
        """When the next load should start (clock time)."""
        if self._last_attempt is None:
            return self._clock()
        if not self._ok:  # failing: requests wait for the backoff too, or an outage would be hammered
            return self._last_attempt + self._retry_delay()
        scheduled = self._last_attempt + self._cfg.refresh_interval
        if self._requested:
            return min(scheduled, self._last_attempt + self._cfg.reload_min_interval)
        return scheduled

    async def run(self) -> None:
        """Reload on schedule, after failures with backoff, and on request; runs until cancelled."""
        while True:
            wait = self._due() - self._clock()
            if wait > 0:
                if self._requested:
                    await asyncio.sleep(wait)  # debounce: requests arriving meanwhile share this reload
                    continue
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            scheduled = not self._requested
            if scheduled and self._ok:
                self._unresolved.clear()  # a scheduled refresh gives every coin another chance
            await self.load()
