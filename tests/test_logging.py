"""Logging: JSON lines with contextvars, stdlib loggers in the same format, no frame locals in tracebacks."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from hl_monitor.logging import configure_logging, get_logger


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.strip().splitlines() if line.startswith("{")]


def test_json_lines_carry_contextvars_and_instance(capsys: pytest.CaptureFixture[str]) -> None:
    """Each line is one JSON object with level, timestamp, instance and the contextvars bound by the task."""
    configure_logging("info", "json", instance_id="host:/data")
    with structlog.contextvars.bound_contextvars(address="0xabc", connection=3):
        get_logger("t").info("subscribed", channel="userFills")
    get_logger("t").debug("filtered out")
    (line,) = _lines(capsys.readouterr().err)
    assert line["event"] == "subscribed"
    assert line["address"] == "0xabc"
    assert line["connection"] == 3
    assert line["instance"] == "host:/data"
    assert line["level"] == "info"
    assert "timestamp" in line


def test_stdlib_loggers_use_the_same_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Third-party libraries logging through stdlib come out as the same JSON lines."""
    configure_logging("info", "json")
    logging.getLogger("some.library").warning("disk %s", "slow")
    (line,) = _lines(capsys.readouterr().err)
    assert line["event"] == "disk slow"
    assert line["level"] == "warning"


def test_tracebacks_never_include_frame_locals(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception logged with its traceback does not leak local variables (which may hold secrets)."""
    configure_logging("info", "json")

    def connect() -> None:
        dsn_password = "hunter2-secret"  # noqa: F841 - the local that must not leak
        raise RuntimeError("connection refused")

    try:
        connect()
    except RuntimeError:
        get_logger("t").exception("db failed")
    err = capsys.readouterr().err
    (line,) = _lines(err)
    assert "hunter2-secret" not in err
    assert "connection refused" in json.dumps(line["exception"])


def test_console_format_is_human(capsys: pytest.CaptureFixture[str]) -> None:
    """make run uses a console renderer: one readable line, not JSON."""
    configure_logging("info", "console")
    get_logger("t").info("hello", n=1)
    err = capsys.readouterr().err
    assert "hello" in err
    assert not err.lstrip().startswith("{")
