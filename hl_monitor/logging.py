"""structlog setup: JSON lines via orjson in production, a console renderer for `make run`.

Contextvars bound per connection/address are merged into every line; tracebacks are rendered as
dicts without frame locals (locals can hold DSNs and tokens); stdlib loggers (aiohttp, nats,
sqlalchemy, websockets, alembic) go through the same processors so there is one format.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.types import Processor

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_str(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, default=kwargs.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(level: str = "info", fmt: str = "json", instance_id: str | None = None) -> None:
    """Configure structlog and the stdlib root logger. Safe to call more than once (tests, CLI)."""
    numeric = _LEVELS[level]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if instance_id:
        shared.append(_AddInstance(instance_id))
    tracebacks = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        final: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_str)
        final = [tracebacks, renderer]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Third-party libraries are chatty at INFO (access logs, every reconnect attempt); keep them at WARNING.
    for name in ("aiohttp.access", "websockets", "nats", "sqlalchemy.engine", "alembic"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time, not the stream current at configuration.

    A handler holding the stream of its configuration time writes into a closed file once that stream is
    replaced and closed (an in-process CLI run under a capturing test runner, a daemonising wrapper).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _AddInstance:
    """Stamp every line with the instance id, so lines from several instances can be told apart."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("instance", self.instance_id)
        return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
