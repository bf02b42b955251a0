"""`hl-monitor db …` and `hl-monitor addresses …` end to end on a SQLite file, run from another directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hl_monitor.storage import migrate
from hl_monitor.storage.cli import parse_import
from tests.support.cli import run

WHALE = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
THIRD = "0x" + "ef" * 20


def listed(capsys: pytest.CaptureFixture[str], cli_config: Path) -> list[dict[str, object]]:
    code, out, _ = run(capsys, "addresses", "list", "--all", "--json", "--config", str(cli_config))
    assert code == 0
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def test_commands_refuse_an_unmigrated_database_then_work_after_db_upgrade(
    capsys: pytest.CaptureFixture[str], cli_config: Path
) -> None:
    code, _, err = run(capsys, "addresses", "list", "--config", str(cli_config))
    assert code == 1
    assert "run `hl-monitor db upgrade`" in err
    code, out, _ = run(capsys, "db", "upgrade", "--config", str(cli_config))
    assert code == 0
    assert f"at revision {migrate.head_revision()}" in out
    assert (cli_config.parent / "data" / "hl.db").exists()
    code, out, _ = run(capsys, "db", "current", "--config", str(cli_config))
    assert (code, "up to date" in out) == (0, True)


def test_add_list_remove(capsys: pytest.CaptureFixture[str], cli_config: Path) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    mixed_case = "0x" + "AB" * 20
    code, _, _ = run(
        capsys, "addresses", "add", mixed_case, OTHER, "--label", "big fish", "--tier", "precise",
        "--priority", "7", "--server-id", "2", "--config", str(cli_config),
    )  # fmt: skip
    assert code == 0
    rows = listed(capsys, cli_config)
    assert [(r["address"], r["label"], r["tier"], r["priority"], r["server_id"]) for r in rows] == [
        (WHALE, "big fish", "precise", 7, 2),
        (OTHER, "big fish", "precise", 7, 2),
    ]
    assert run(capsys, "addresses", "add", WHALE, "--tier", "wide", "--config", str(cli_config))[0] == 0
    assert run(capsys, "addresses", "remove", OTHER, "--config", str(cli_config))[0] == 0
    by_address = {r["address"]: r for r in listed(capsys, cli_config)}
    assert (by_address[WHALE]["tier"], by_address[WHALE]["label"]) == ("wide", "big fish")  # untouched fields kept
    assert by_address[OTHER]["is_active"] is False
    code, out, _ = run(capsys, "addresses", "list", "--config", str(cli_config))
    assert WHALE in out
    assert OTHER not in out
    assert run(capsys, "addresses", "remove", OTHER, "--purge", "--config", str(cli_config))[0] == 0
    assert [r["address"] for r in listed(capsys, cli_config)] == [WHALE]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "0x1234"], "is not an address"),
        (["add", WHALE, "--tier", "fast"], "invalid choice: 'fast'"),
        (["add", WHALE, "--priority", "-1"], "priority must be between"),
        (["add", WHALE, "--label", "x" * 129], "at most 128"),
        (["remove", "whale"], "is not an address"),
        (["add", WHALE, "--min-notional-usd", "-5"], "-5 is not a dollar amount of 0 or more"),
        (["add", WHALE, "--min-notional-usd", "lots"], "'lots' is not a number"),
        (["update", WHALE, "--deny-symbols", "BTC," + "X" * 65], "is not a symbol or coin"),
    ],
)
def test_invalid_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], cli_config: Path, argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, "addresses", *argv, "--config", str(cli_config))
    assert code == 2
    assert message in err


def test_import_validates_the_whole_file_before_writing(capsys: pytest.CaptureFixture[str], cli_config: Path) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    bad = cli_config.parent / "bad.csv"
    bad.write_text(f"address,label\n{WHALE},ok\n0xnothex,broken\n{OTHER},a,b\n")
    code, _, err = run(capsys, "addresses", "import", str(bad), "--config", str(cli_config))
    assert code == 2
    assert f"{bad}:3:" in err
    assert f"{bad}:4: expected `address` or `address,label`" in err
    assert listed(capsys, cli_config) == []  # nothing written

    good = cli_config.parent / "whales.txt"
    good.write_text(f'# exported list\n{WHALE.upper().replace("0X", "0x")}\n\n{OTHER},"Fund, Ltd"\n')
    code, out, _ = run(capsys, "addresses", "import", str(good), "--tier", "wide", "--config", str(cli_config))
    assert code == 0
    assert "imported 2 addresses" in out
    rows = listed(capsys, cli_config)
    assert [(r["address"], r["label"], r["tier"]) for r in rows] == [(WHALE, "", "wide"), (OTHER, "Fund, Ltd", "wide")]
    missing = str(cli_config.parent / "missing.txt")
    code, _, err = run(capsys, "addresses", "import", missing, "--config", str(cli_config))
    assert code == 2
    assert "cannot read" in err


def test_parse_import_last_line_for_an_address_wins() -> None:
    entries, errors = parse_import([WHALE, f"{WHALE},second"], "f")
    assert (entries, errors) == ({WHALE: "second"}, [])


def test_filters_are_set_updated_and_listed(capsys: pytest.CaptureFixture[str], cli_config: Path) -> None:
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    code, _, _ = run(
        capsys, "addresses", "add", WHALE, "--min-notional-usd", "5000.50", "--deny-symbols", " btc,ETH , BTC",
        "--config", str(cli_config),
    )  # fmt: skip
    assert code == 0
    (row,) = listed(capsys, cli_config)
    assert (row["min_notional_usd"], row["allow_symbols"], row["deny_symbols"]) == ("5000.5", [], ["btc", "ETH"])

    code, out, _ = run(
        capsys, "addresses", "update", WHALE, "--deny-symbols", "", "--allow-symbols", "xyz:XYZ100",
        "--config", str(cli_config),
    )  # fmt: skip
    assert (code, out.strip()) == (0, "updated 1 address")
    (row,) = listed(capsys, cli_config)
    assert (row["min_notional_usd"], row["allow_symbols"], row["deny_symbols"]) == ("5000.5", ["xyz:XYZ100"], [])
    assert row["is_active"] is True

    code, _, err = run(capsys, "addresses", "update", OTHER, "--label", "x", "--config", str(cli_config))
    assert code == 1
    assert f"not in the address table (add them first): {OTHER}" in err
    code, _, err = run(capsys, "addresses", "update", WHALE, "--config", str(cli_config))
    assert code == 2
    assert "nothing to change" in err


def test_list_says_where_each_watched_address_comes_from(capsys: pytest.CaptureFixture[str], cli_config: Path) -> None:
    """Addresses of `addresses.initial` are watched too: listed with their source, not left out."""
    cli_config.write_text(
        cli_config.read_text() + f'[addresses]\ninitial = ["{THIRD.upper().replace("0X", "0x")}", "{OTHER}"]\n'
    )
    assert run(capsys, "db", "upgrade", "--config", str(cli_config))[0] == 0
    assert run(capsys, "addresses", "add", WHALE, OTHER, "--config", str(cli_config))[0] == 0
    assert run(capsys, "addresses", "remove", OTHER, "--config", str(cli_config))[0] == 0  # still in the config
    rows = {r["address"]: r for r in listed(capsys, cli_config)}
    assert {a: (r["source"], r["is_active"]) for a, r in rows.items()} == {
        WHALE: ("table", True),
        OTHER: ("addresses.initial", False),  # the table row is inactive, the config keeps it watched
        THIRD: ("addresses.initial", True),
    }
    code, out, _ = run(capsys, "addresses", "list", "--config", str(cli_config))
    assert code == 0
    by_address = {line.split()[0]: line for line in out.splitlines()}
    assert set(by_address) == {WHALE, OTHER, THIRD}
    assert "from table" in by_address[WHALE]
    assert "from addresses.initial" in by_address[THIRD]

    cli_config.write_text('[database]\nurl = "sqlite+aiosqlite:///./data/hl.db"\n')  # OTHER leaves the config
    code, out, _ = run(capsys, "addresses", "list", "--config", str(cli_config))
    assert OTHER not in out
    rows = {r["address"]: r for r in listed(capsys, cli_config)}  # --all: the inactive row, watched by nobody
    assert rows[OTHER]["source"] is None


def test_addresses_tagged_by_automatic_discovery_are_listed_and_removed_in_bulk(
    capsys: pytest.CaptureFixture[str], cli_config: Path
) -> None:
    cfg = ["--config", str(cli_config)]
    assert run(capsys, "db", "upgrade", *cfg)[0] == 0
    auto = ["addresses", "add", WHALE, OTHER, "--label", "discovered:auto:directional", "--tier", "wide"]
    assert run(capsys, *auto, *cfg)[0] == 0
    assert run(capsys, "addresses", "add", THIRD, "--label", "discovered:directional", *cfg)[0] == 0
    code, out, _ = run(capsys, "addresses", "list", "--label-prefix", "discovered:auto:", "--json", *cfg)
    assert code == 0
    assert [r["address"] for r in json.loads(out)] == [WHALE, OTHER]
    code, out, _ = run(capsys, "addresses", "remove", "--label-prefix", "discovered:auto:", *cfg)
    assert (code, out.strip()) == (0, "deactivated 2")
    assert [(r["address"], r["is_active"]) for r in listed(capsys, cli_config)] == [
        (WHALE, False),
        (OTHER, False),
        (THIRD, True),
    ]
    assert run(capsys, "addresses", "remove", *cfg)[0] == 2  # neither addresses nor a prefix
