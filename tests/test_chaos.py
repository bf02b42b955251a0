"""The chaos scenarios at CI lengths: the service as a subprocess, the simulator, real NATS and a real database.

Each scenario injects its fault while whales trade, then checks that the JetStream stream and the signals table
hold exactly the ledger's signals (by oid/dir with exact size, VWAP and fill count; ids = signal_id, no
duplicate) and that readiness/metrics reported the fault. `make chaos` runs the same scenarios at full length
(database down 60 s instead of 8 s, more repetitions); the CI variant keeps every fault and 20 kill -9 points.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from hl_monitor.chaos.cli import results_table
from hl_monitor.chaos.env import ChaosOptions, compare
from hl_monitor.chaos.scenarios import SCENARIOS, ScenarioResult, run_scenario
from hl_monitor.domain.signal import Signal
from tests.support.storage import make_signal

QUICK_SQLITE = ChaosOptions(quick=True, db="sqlite")
# Scenarios that run on SQLite in CI; db_outage and kill9 run on MariaDB below (the database a production
# deployment uses, and the one that can be cut at the network).
SQLITE_SCENARIOS = [n for n in SCENARIOS if n not in ("db_outage", "kill9", "soak")]  # soak: tests/test_soak.py


def assert_passed(result: ScenarioResult) -> None:
    assert result.passed, "\n".join(result.problems())
    assert result.verdict is not None
    assert result.verdict.expected > 0, "the scenario traded nothing: the comparison proved nothing"


# The storm spends the 30/min new-connection budget (user and tape connections) by design, then waits out the
# one-minute window before it can be ready again: longer than the default per-test timeout.
WAITS_FOR_THE_MINUTE = {"reconnect_storm", "clock_skew"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.timeout(150)) if n in WAITS_FOR_THE_MINUTE else n for n in SQLITE_SCENARIOS],
)
async def test_scenario_delivers_exactly_the_expected_signals(name: str, tmp_path: Path) -> None:
    assert_passed(await run_scenario(name, QUICK_SQLITE, tmp_path))


@pytest.mark.slow
@pytest.mark.mariadb
@pytest.mark.timeout(120)
async def test_kill9_at_20_random_points_loses_and_duplicates_nothing(mariadb_url: str, tmp_path: Path) -> None:
    """Issue 5: SIGKILL the service 20 times at random points while whales trade, restart, compare both sinks."""
    opts = ChaosOptions(quick=True, db="mariadb", mysql_url=mariadb_url, kill_points=20, seed=5)
    assert_passed(await run_scenario("kill9", opts, tmp_path))


@pytest.mark.slow
@pytest.mark.mariadb
async def test_database_outage_is_reported_and_loses_nothing(mariadb_url: str, tmp_path: Path) -> None:
    """CI cuts MariaDB for 8 s (`make chaos`: 60 s); the 5 s readiness probe must see it."""
    opts = ChaosOptions(quick=True, db="mariadb", mysql_url=mariadb_url, db_outage_s=8.0)
    assert_passed(await run_scenario("db_outage", opts, tmp_path))


def test_verdict_catches_missing_duplicate_and_wrong_signals() -> None:
    """The comparison is what makes every scenario meaningful: it must fail on each kind of loss or damage."""
    sigs = [make_signal(n) for n in range(3)]
    want = {(s.oid or 0, s.dir): (s.size, s.price, s.fill_count) for s in sigs}

    def run(stored: list[Signal], rows: list[Signal] | None = None, unpublished: int = 0) -> list[str]:
        table = [(s, True) for s in (stored if rows is None else rows)]
        return compare(want, [(s.signal_id, s) for s in stored], table, unpublished).problems

    assert run(sigs) == []
    assert any("missing" in p for p in run(sigs[:2]))
    assert any("stored twice" in p for p in run([*sigs, sigs[0]]))
    wrong = msgspec.structs.replace(sigs[1], price=sigs[1].price + Decimal("0.01"))
    assert any("ledger says" in p for p in run([sigs[0], wrong, sigs[2]]))
    assert any("different signal_ids" in p for p in run(sigs, rows=sigs[:2]))
    assert any("unpublished" in p for p in run(sigs, unpublished=1))
    bad_id = [(s.signal_id + "x", s) for s in sigs]
    table = [(s, True) for s in sigs]
    assert any("not their signal_id" in p for p in compare(want, bad_id, table, 0).problems)


def test_results_table_has_one_row_per_scenario_with_counts() -> None:
    result = ScenarioResult("kill9", "Service kill -9 at random points")
    result.verdict = compare({}, [], [], 0)
    failed = ScenarioResult("nats_restart", "NATS killed and restarted", error="boom | x")
    text = results_table([result, failed], QUICK_SQLITE)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2
    assert rows[0].startswith("| Service kill -9 at random points | pass | 0 | 0 | 0 |")
    assert "FAIL: error: boom \\| x" in rows[1]
