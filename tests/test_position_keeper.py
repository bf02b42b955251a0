"""The position keeper with recording fakes: what goes to the KV view, the table and the publication sink."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from hl_monitor.config import PositionsConfig
from hl_monitor.domain.publication import Publication
from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.metrics import Metrics
from hl_monitor.tracking.portfolio import AddressPortfolio, PositionModel
from hl_monitor.tracking.position_events import PositionEvent
from hl_monitor.watch.positions import ACCOUNT_VALUE_SAMPLE_S, PositionKeeper
from tests.support.factories import ADDR, OTHER
from tests.support.portfolio import state_with, wire_position

T0 = 1_784_050_800_000
REFRESH_S = 5.0


class Recorder:
    """KV view, position store and publication sink at once: every call, in order."""

    def __init__(self) -> None:
        self.kv: list[tuple[str, str]] = []  # (op, address)
        self.table: list[tuple[str, str]] = []
        self.events: list[PositionEvent] = []
        self.published: list[Publication] = []
        self.account_values: list[tuple[str, int, Decimal]] = []

    async def put(self, address: str, doc_json: bytes) -> None:
        self.kv.append(("put", address))

    async def delete(self, address: str) -> None:
        self.kv.append(("delete", address))

    async def put_portfolio(
        self, address: str, doc: AddressPortfolio, encoded: bytes | None = None, model_state: bytes | None = None
    ) -> None:
        assert model_state is not None, "the model's bookkeeping travels with every stored document"
        self.table.append(("put", address))

    async def delete_portfolio(self, address: str) -> None:
        self.table.append(("delete", address))

    async def put_position_event(self, event: PositionEvent) -> None:
        self.events.append(event)

    async def put_account_value(self, address: str, time_ms: int, value: Decimal) -> None:
        self.account_values.append((address, time_ms, value))

    async def __call__(self, publications: Sequence[Publication], /) -> None:
        self.published.extend(publications)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def keeper(recorder: Recorder, clock: Clock, wide: frozenset[str] = frozenset()) -> PositionKeeper:
    return PositionKeeper(
        PositionModel(),
        cfg=PositionsConfig(kv_refresh=REFRESH_S),
        publish=recorder,
        store=recorder,
        kv=recorder,
        metrics=Metrics(),
        tracked_wide=lambda address: address in wide,
        wall_ms=clock,
    )


async def holding_btc(k: PositionKeeper, address: str, clock: Clock) -> None:
    await k.on_rest(address, [("", state_with([wire_position("BTC", "2", "80000")], T0))], None, clock())
    await k.flush_documents()


async def test_a_removed_address_leaves_the_kv_view_the_table_and_the_model() -> None:
    recorder, clock = Recorder(), Clock()
    k = keeper(recorder, clock)
    await holding_btc(k, ADDR, clock)
    await holding_btc(k, OTHER, clock)
    await k.forget([ADDR, "0x" + "99" * 20])  # an address it never held: nothing to delete
    assert recorder.kv == [("put", ADDR), ("put", OTHER), ("delete", ADDR)]
    assert recorder.table == [("put", ADDR), ("put", OTHER), ("delete", ADDR)]
    assert k.portfolio(ADDR) is None
    assert k.portfolio(OTHER) is not None


async def test_mark_moves_refresh_the_kv_view_at_most_every_kv_refresh_and_within_the_budget() -> None:
    recorder, clock = Recorder(), Clock()
    k = keeper(recorder, clock)
    holders = [f"0x{i:040x}" for i in range(1, 6)]
    for address in holders:
        await holding_btc(k, address, clock)
    recorder.kv.clear()
    await k.on_marks({"BTC": Decimal(81000)}, clock())
    await k.apply_marks()
    assert await k.refresh_kv(budget=100) == 0  # each document was just written by its state: not yet due
    assert recorder.table == [("put", a) for a in holders], "mark moves are not stored"
    clock.now += round(REFRESH_S * 1000)
    assert await k.refresh_kv(budget=2) == 2  # the rate budget, oldest first
    assert await k.refresh_kv(budget=100) == 3
    assert await k.refresh_kv(budget=100) == 0  # nothing moved since
    assert sorted(address for _, address in recorder.kv) == holders
    assert recorder.published == [], "a mark move is not an event"


async def test_tape_trades_count_only_for_addresses_the_tape_tracks_as_wide() -> None:
    recorder, clock = Recorder(), Clock()
    k = keeper(recorder, clock, wide=frozenset({ADDR}))
    trade = WsTrade(
        coin="ETH", side="B", px=Decimal(2400), sz=Decimal(3), time=T0, hash="0x" + "1" * 64, tid=7, users=(ADDR, OTHER)
    )
    await k.on_trades([trade], clock())
    assert [(e.address, e.event, e.size_after) for e in recorder.events] == [(ADDR, "opened", Decimal(3))]
    assert [p.subject for p in recorder.published] == [f"hl.positions.{ADDR}.ETHUSDC"]
    assert [p.msg_id for p in recorder.published] == [recorder.events[0].event_id]
    assert k.portfolio(OTHER) is None  # the seller is not watched wide here


async def test_account_value_is_stored_at_most_once_a_minute_per_address_and_only_when_it_moved() -> None:
    recorder, clock = Recorder(), Clock()
    k = keeper(recorder, clock)

    async def worth(address: str, value: str) -> None:
        state = state_with([wire_position("BTC", "2", "80000")], clock.now, account_value=value)
        await k.on_rest(address, [("", state)], None, clock.now)
        await k.flush_documents()

    await worth(ADDR, "1000")
    clock.now += 10_000
    await worth(ADDR, "1100")  # moved, but within the minute of the last sample
    await worth(OTHER, "500")  # another address has its own minute
    clock.now = T0 + round(ACCOUNT_VALUE_SAMPLE_S * 1000)
    await worth(ADDR, "1100")
    clock.now += 5 * round(ACCOUNT_VALUE_SAMPLE_S * 1000)
    await worth(ADDR, "1100")  # unchanged: the chart draws the line on to the current value by itself
    assert recorder.account_values == [
        (ADDR, T0, Decimal(1000)),
        (OTHER, T0 + 10_000, Decimal(500)),
        (ADDR, T0 + round(ACCOUNT_VALUE_SAMPLE_S * 1000), Decimal(1100)),
    ]
