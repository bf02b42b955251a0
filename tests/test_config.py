"""Configuration: defaults, cfg.toml documents every key, env overrides, clear errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from hl_monitor.config import SECRET_KEYS, Config, load_config, masked
from hl_monitor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "hl_monitor", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd or ROOT,
        timeout=30,
        check=False,
    )


def test_defaults_need_no_file(tmp_path: Path) -> None:
    """With no cfg.toml the service runs on embedded defaults: SQLite under ./data and embedded NATS."""
    cfg = load_config(tmp_path / "absent.toml" if False else None, environ={})
    assert cfg.nats.url == "embedded"
    assert cfg.database.url.startswith("sqlite+aiosqlite:///./data/")
    assert cfg.signals.legacy_subject == "hl_address_signal"
    assert cfg.hyperliquid.user_slots == 8


def test_cfg_toml_documents_every_key_with_its_default() -> None:
    """cfg.toml holds every non-secret key at its default value; secrets are documented as env variables."""
    text = (ROOT / "cfg.toml").read_text()
    data = tomllib.loads(text)
    defaults = msgspec.to_builtins(Config(), enc_hook=str)
    for section, values in defaults.items():
        assert section in data, f"section [{section}] missing from cfg.toml"
        for key, default in values.items():
            dotted = f"{section}.{key}"
            if dotted in SECRET_KEYS:
                env = f"HL_MONITOR__{section.upper()}__{key.upper()}"
                assert env in text, f"secret {dotted} is not documented as {env}"
                continue
            if default is None:  # TOML has no null: unset keys are documented as a commented line
                assert f"# {key} = " in text, f"{dotted} (unset by default) is not documented"
                continue
            assert key in data[section], f"{dotted} missing from cfg.toml"
            assert data[section][key] == default, f"{dotted}: cfg.toml says {data[section][key]!r}, default {default!r}"
        assert set(data[section]) <= set(values), f"cfg.toml has keys the code does not know in [{section}]"
    assert load_config(ROOT / "cfg.toml", environ={}) == Config()


def test_env_overrides_are_typed() -> None:
    """HL_MONITOR__SECTION__KEY overrides any key, converted to the key's type."""
    cfg = load_config(
        None,
        environ={
            "HL_MONITOR__HYPERLIQUID__USER_SLOTS": "4",
            "HL_MONITOR__AGGREGATION__TIMEOUT": "12.5",
            "HL_MONITOR__SIGNALS__LEGACY_ENABLED": "false",
            "HL_MONITOR__ADDRESSES__INITIAL": "0x" + "a" * 40 + ", 0x" + "B" * 40,
            "HL_MONITOR__NATS__URL": "nats://127.0.0.1:4222",
        },
    )
    assert cfg.hyperliquid.user_slots == 4
    assert cfg.aggregation.timeout == 12.5
    assert cfg.signals.legacy_enabled is False
    assert cfg.addresses.initial == ["0x" + "a" * 40, "0x" + "B" * 40]
    assert cfg.nats.url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        pytest.param("[hyperliquid]\nuser_slot = 3\n", {}, "hyperliquid.user_slot", id="unknown-key"),
        pytest.param("[nope]\nx = 1\n", {}, "nope", id="unknown-section"),
        pytest.param('[hyperliquid]\nuser_slots = "many"\n', {}, "hyperliquid.user_slots", id="wrong-type"),
        pytest.param('[hyperliquid]\nws_url = "http://x"\n', {}, "hyperliquid.ws_url", id="bad-ws-url"),
        pytest.param('[nats]\nurl = "localhost:4222"\n', {}, "nats.url", id="bad-nats-url"),
        pytest.param('[http]\nlisten = "8080"\n', {}, "http.listen", id="bad-listen"),
        pytest.param('[http]\nadmin_token = "x"\n', {}, "http.admin_token", id="secret-in-file"),
        pytest.param('[database]\nurl = "mysql+aiomysql://u:pw@h/db"\n', {}, "database.url", id="password-in-file-dsn"),
        pytest.param("", {"HL_MONITOR__LOG__LEVEL": "loud"}, "log.level", id="env-bad-enum"),
        pytest.param("", {"HL_MONITOR__HTTP__NOPE": "1"}, "http.nope", id="env-unknown-key"),
        pytest.param("[aggregation]\ntimeout = 0\n", {}, "aggregation.timeout", id="non-positive"),
        pytest.param("[hyperliquid]\nuser_slots = 11\n", {}, "hyperliquid.user_slots", id="slots-over-connections"),
        pytest.param(
            "[hyperliquid]\nfill_audit_interval = -1\n", {}, "hyperliquid.fill_audit_interval", id="negative-audit"
        ),
        pytest.param(
            "",
            {"HL_MONITOR__NATS__CREDS": "/run/u.creds", "HL_MONITOR__NATS__NKEY_SEED": "/run/u.nk"},
            "nats.nkey_seed",
            id="creds-and-nkey",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], key: str) -> None:
    """Every kind of bad config raises ConfigError whose key names the offending setting."""
    path = tmp_path / "cfg.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert info.value.key == key


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    """The CLI turns a bad config into exit code 2 and a single stderr line naming the key."""
    path = tmp_path / "cfg.toml"
    path.write_text('[hyperliquid]\nuser_slots = "many"\n')
    for command in (["check-config", "--config", str(path)], ["run", "--config", str(path)]):
        result = _cli(*command)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "hyperliquid.user_slots" in lines[0]


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    """--config pointing nowhere is a config error, not a silent fallback to defaults."""
    result = _cli("check-config", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_check_config_masks_secrets() -> None:
    """check-config prints the effective config; secrets from the environment never appear in it."""
    env = {
        "HL_MONITOR__HTTP__ADMIN_TOKEN": "tok-SECRET-1",
        "HL_MONITOR__DATABASE__PASSWORD": "db-SECRET-2",
        "HL_MONITOR__NATS__PASSWORD": "nats-SECRET-3",
        "HL_MONITOR__DATABASE__URL": "mysql+aiomysql://hl:dsn-SECRET-4@db:3306/hl",
    }
    result = _cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "SECRET" not in result.stdout + result.stderr
    assert '"admin_token": "***"' in result.stdout
    assert "hl:***@db:3306" in result.stdout


def test_secret_repr_never_shows_value() -> None:
    """A Secret prints as *** in reprs (logs of config objects), yet keeps its value for use."""
    cfg = load_config(None, environ={"HL_MONITOR__HTTP__ADMIN_TOKEN": "abc123"})
    assert cfg.http.admin_token == "abc123"
    assert "abc123" not in repr(cfg)
    assert masked(cfg)["http"]["admin_token"] == "***"


def test_database_password_is_injected_into_the_dsn() -> None:
    """The DSN used to connect gets the password from the environment; the printed one does not."""
    cfg = load_config(
        None,
        environ={
            "HL_MONITOR__DATABASE__URL": "mysql+aiomysql://hl@db:3306/hl",
            "HL_MONITOR__DATABASE__PASSWORD": "pw",
        },
    )
    assert cfg.database_url() == "mysql+aiomysql://hl:pw@db:3306/hl"
    assert "pw" not in masked(cfg)["database"]["url"]


def test_every_subcommand_has_help() -> None:
    """`--help` works on the program and on every subcommand."""
    from hl_monitor.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(subparsers.choices, dict)
    names = list(subparsers.choices)
    assert {"run", "check-config"} <= set(names)
    for name in names:
        result = _cli(name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert "usage:" in result.stdout
