"""The wide tier as one part: the tape, the REST reader and the planner that hands addresses between tiers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hl_monitor.config import Config
from hl_monitor.domain.address import AddressView
from hl_monitor.domain.publication import FillSink
from hl_monitor.domain.signal import SignalSink
from hl_monitor.feeds.budget import Budgets
from hl_monitor.feeds.holdings import HoldingsIntake
from hl_monitor.feeds.market_tape import DiscoveryIntake, MarketTape
from hl_monitor.feeds.marks import MarkIntake
from hl_monitor.feeds.precise import PreciseManager
from hl_monitor.feeds.wide import WideManager
from hl_monitor.hyperliquid.info import InfoClient
from hl_monitor.hyperliquid.symbols import SymbolMap
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.tape import TapeTracker
from hl_monitor.watch.planner import TierPlanner
from hl_monitor.watch.watchset import WatchSet

__all__ = ["WideTier", "build_tape_tracker", "build_wide_tier"]


@dataclass(frozen=True, slots=True)
class WideTier:
    """The wide tier's components; they exist together or not at all (`wide.enabled`, the tape role)."""

    tape: MarketTape
    wide: WideManager
    planner: TierPlanner


def build_tape_tracker(cfg: Config, symbols: SymbolMap, *, collect_fills: bool) -> TapeTracker | None:
    """The wide tier's tracker, when this member runs a tape (`wide.enabled`; in nats mode `tape_role = "active"`)."""
    if not cfg.wide.enabled or (cfg.cluster.mode == "nats" and cfg.cluster.tape_role != "active"):
        return None
    return TapeTracker(
        symbols,
        block_settle_ms=round(cfg.wide.block_settle * 1000),
        hold_ms=round(cfg.wide.handover_hold * 1000),
        instance_id=cfg.instance_id,
        collect_fills=collect_fills,
    )


def build_wide_tier(
    cfg: Config,
    tracker: TapeTracker,
    *,
    info: InfoClient,
    budgets: Budgets,
    metrics: Metrics,
    sink: SignalSink,
    holdings: HoldingsIntake,
    fills: FillSink | None,
    discovery: DiscoveryIntake | None,
    marks: MarkIntake | None,
    mark_dexes: Sequence[str],
    view: AddressView,
    watch: WatchSet,
    precise: PreciseManager,
) -> WideTier:
    """The tape (with marks and discovery riding on it), the wide REST reader, and the tier planner over `view`."""
    tape = MarketTape(
        cfg.hyperliquid,
        cfg.wide,
        tracker=tracker,
        info=info,
        budget=budgets,
        metrics=metrics,
        on_signals=sink,
        holdings=holdings,
        discovery=discovery,
        on_fills=fills,
        marks=marks,
        mark_dexes=mark_dexes,
    )
    wide = WideManager(
        cfg.wide,
        cfg.hyperliquid,
        tracker=tracker,
        info=info,
        tape=tape,
        clock=budgets.clock,
        metrics=metrics,
        on_signals=sink,
        dexes=lambda: tape.universe.dexes if tape.universe else [],
        holdings=holdings,
    )
    planner = TierPlanner(
        view,
        tracker=tracker,
        watch=watch,
        wide=wide,
        metrics=metrics,
        on_signals=sink,
        precise=precise,
        max_addresses=cfg.wide.max_addresses,
    )
    return WideTier(tape=tape, wide=wide, planner=planner)
