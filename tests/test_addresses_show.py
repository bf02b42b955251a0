"""`hl-monitor addresses show ADDRESS`: what the database holds for one address, written by the real writer."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest

from hl_monitor.config import Config, DatabaseConfig, WriterConfig
from hl_monitor.hyperliquid.protocol import ClearinghouseState, decode_info
from hl_monitor.metrics import Metrics
from hl_monitor.storage.repository import create_engine
from hl_monitor.storage.writer import BatchWriter
from hl_monitor.tracking.portfolio import PositionModel
from tests.support.cli import run
from tests.support.factories import ADDR, NOW, T0, engine, fill, frame, update
from tests.support.paths import FIXTURES


async def persist_activity(url: str) -> None:
    """Two signals for ADDR (the second with a price only exact decimals keep), a pending order, positions."""
    eng = engine()
    state = decode_info((FIXTURES / "http_clearinghouse_state.json").read_bytes(), ClearinghouseState)
    model = PositionModel()
    model.on_dex_state(ADDR, "", state, NOW)
    signals = []
    eng.on_user_fills(ADDR, frame(fill(1, 10, "1", "80000")), NOW)
    signals += eng.on_order_updates(ADDR, [update(1, "filled")], NOW + 1)
    eng.on_user_fills(ADDR, frame(fill(2, 20, "3", "0.123456789012345678901", time=T0 + 5)), NOW + 2)
    signals += eng.on_order_updates(ADDR, [update(2, "filled", orig="3")], NOW + 3)
    eng.on_user_fills(ADDR, frame(fill(3, 30, "0.5", "81000", time=T0 + 9)), NOW + 4)  # still open
    db = create_engine(Config(database=DatabaseConfig(url=url)))
    writer = BatchWriter(db, WriterConfig(flush_interval=0.01), Metrics())
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run())
            for signal in signals:
                await writer.put_signal(signal)
            await writer.put_delta(eng.take_dirty())
            document = model.get(ADDR)
            assert document is not None
            await writer.put_portfolio(ADDR, document)
            await writer.close()
    finally:
        await db.dispose()


def test_show_prints_row_positions_watermark_pending_and_newest_signals(
    capsys: pytest.CaptureFixture[str],
    cli_config: Path,
) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    added = run(capsys, "addresses", "add", ADDR, "--label", "whale", "--tier", "precise", "--config", str(cli_config))
    assert added[0] == 0
    asyncio.run(persist_activity(f"sqlite+aiosqlite:///{cli_config.parent / 'data' / 'hl.db'}"))

    code, out, _ = run(
        capsys, "addresses", "show", ADDR.upper().replace("0X", "0x"), "--signals", "1", "--config", str(cli_config)
    )
    assert code == 0
    shown = json.loads(out, parse_float=Decimal)
    assert (shown["address"], shown["label"], shown["tier"], shown["is_active"]) == (ADDR, "whale", "precise", True)
    assert shown["watermark"]["time"] == T0 + 9
    (pending,) = shown["pending_orders"]
    assert (pending["oid"], pending["coin"], pending["size"], pending["fill_count"]) == (3, "BTC", "0.5", 1)
    (newest,) = shown["last_signals"]  # --signals 1: only the newest
    assert newest["signal"]["oid"] == 2
    assert newest["signal"]["price"] == Decimal("0.123456789012345678901")  # exact, as stored
    assert newest["published"] is False
    assert shown["positions"]["dexes"][""]["account_value"]


def test_show_unknown_address_exits_1_and_invalid_exits_2(
    capsys: pytest.CaptureFixture[str],
    cli_config: Path,
) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    code, out, err = run(capsys, "addresses", "show", ADDR, "--config", str(cli_config))
    assert (code, out) == (1, "")
    assert f"{ADDR} is not in the address table nor in addresses.initial" in err
    code, _, err = run(capsys, "addresses", "show", "0x12", "--config", str(cli_config))
    assert code == 2
    assert "is not an address" in err


def test_show_an_address_watched_from_the_config(capsys: pytest.CaptureFixture[str], cli_config: Path) -> None:
    """An address the service tracks because of `addresses.initial` is shown, with where it came from."""
    cli_config.write_text(cli_config.read_text() + f'[addresses]\ninitial = ["{ADDR}"]\n')
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    asyncio.run(persist_activity(f"sqlite+aiosqlite:///{cli_config.parent / 'data' / 'hl.db'}"))
    code, out, _ = run(capsys, "addresses", "show", ADDR, "--config", str(cli_config))
    assert code == 0
    shown = json.loads(out, parse_float=Decimal)
    assert (shown["address"], shown["source"], shown["tier"], shown["is_active"]) == (
        ADDR,
        "addresses.initial",
        "auto",
        True,
    )
    assert [s["signal"]["oid"] for s in shown["last_signals"]] == [2, 1]
    assert run(capsys, "addresses", "add", ADDR, "--label", "whale", "--config", str(cli_config))[0] == 0
    shown = json.loads(run(capsys, "addresses", "show", ADDR, "--config", str(cli_config))[1])
    assert (shown["source"], shown["label"]) == ("table", "whale")  # the table wins where both name it
