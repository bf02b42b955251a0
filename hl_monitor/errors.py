"""Every error the service raises on purpose.

    HlMonitorError
     ├── ConfigError            bad config: unknown key, wrong type, bad URL (exit code 2)
     ├── InvalidAddressError    not `0x` + 40 hex digits (value)
     ├── ProtocolError          a Hyperliquid frame or REST body we cannot use
     │    └── FrameDecodeError  one WebSocket frame (kind: not_json | unknown_channel | invalid)
     ├── InfoError              REST /info failed (status, body)
     │    └── RateLimitedError  HTTP 429 after the retries ran out
     ├── BudgetExceededError    a per-IP budget refused the request (budget, used, capacity)
     ├── PortfolioStateError    an exported position model that cannot be restored (reason)
     ├── StorageError           the database refused or is unreachable
     │    └── SchemaOutdatedError  the schema is behind the code: run `hl-monitor db upgrade`
     ├── DeliveryError          NATS/JetStream refused or is unreachable
     │    └── PublishError      one publish failed (reason, signal_id); the signal stays pending
     ├── InstanceLockedError    another process holds this instance identity
     ├── LeaseLostError         the database instance lease was lost (instance_id, reason)
     ├── BenchError             a benchmark could not run or its run lost data
     └── ChaosError             the chaos harness could not do what a scenario asked

Each error keeps its facts as attributes so callers can count and log them without parsing text.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "BudgetExceededError",
    "ChaosError",
    "ConfigError",
    "DeliveryError",
    "FrameDecodeError",
    "HlMonitorError",
    "InfoError",
    "InstanceLockedError",
    "InvalidAddressError",
    "LeaseLostError",
    "PortfolioStateError",
    "ProtocolError",
    "PublishError",
    "RateLimitedError",
    "SchemaOutdatedError",
    "StorageError",
]


class HlMonitorError(Exception):
    """Root of every error raised on purpose by hl-monitor."""


class ConfigError(HlMonitorError):
    """The configuration is invalid; `key` names the offending setting (dotted path)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"config error at {key}: {message}")


class InvalidAddressError(HlMonitorError, ValueError):
    """Not an address: Hyperliquid users are `0x` followed by 40 hex digits."""

    def __init__(self, value: object) -> None:
        self.value = value
        super().__init__(f"{value!r} is not 0x followed by 40 hex digits")


class ProtocolError(HlMonitorError):
    """A Hyperliquid payload we cannot use."""


class FrameDecodeError(ProtocolError):
    """One WebSocket frame could not be decoded.

    `kind` is one of `not_json` (e.g. the plain-text greeting), `unknown_channel` (a channel we do
    not model, `channel` holds its name) or `invalid` (known channel, wrong shape).
    """

    def __init__(self, kind: str, detail: str, channel: str | None = None) -> None:
        self.kind = kind
        self.detail = detail
        self.channel = channel
        super().__init__(f"{kind}: {detail}" + (f" (channel {channel})" if channel else ""))


class InfoError(HlMonitorError):
    """A REST /info request failed."""

    def __init__(self, request_type: str, status: int | None, detail: str) -> None:
        self.request_type = request_type
        self.status = status
        self.detail = detail
        super().__init__(f"info {request_type} failed (status {status}): {detail}")


class RateLimitedError(InfoError):
    """HTTP 429 from /info and the retries ran out."""


class BudgetExceededError(HlMonitorError):
    """A per-IP budget refused a request instead of letting the service exceed the exchange's limit."""

    def __init__(self, budget: str, used: float, capacity: float) -> None:
        self.budget = budget
        self.used = used
        self.capacity = capacity
        super().__init__(f"budget {budget} exhausted ({used:g}/{capacity:g})")


class PortfolioStateError(HlMonitorError):
    """An exported position model state that cannot be restored (`reason` says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot restore the position model: {reason}")


class StorageError(HlMonitorError):
    """The database refused a statement or is unreachable."""


class SchemaOutdatedError(StorageError):
    """The database schema is older than the code."""

    def __init__(self, current: str | None, expected: str) -> None:
        self.current = current
        self.expected = expected
        super().__init__(
            f"database schema is at revision {current or 'none'} but this version needs {expected}; "
            "run `hl-monitor db upgrade` (with the same --config) and start again"
        )


class DeliveryError(HlMonitorError):
    """NATS or JetStream refused a publish or is unreachable."""


class PublishError(DeliveryError):
    """One publish failed; `reason` is the `publish_errors` label, the signal stays pending."""

    def __init__(self, reason: str, detail: str, signal_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.signal_id = signal_id
        super().__init__(f"publish failed ({reason}): {detail}" + (f" [{signal_id}]" if signal_id else ""))


class InstanceLockedError(HlMonitorError):
    """Another live process already runs with this instance identity."""

    def __init__(self, instance_id: str, holder: str) -> None:
        self.instance_id = instance_id
        self.holder = holder
        super().__init__(f"instance {instance_id!r} is already running ({holder}); refusing to start twice")


class LeaseLostError(HlMonitorError):
    """This process no longer holds its instance lease; another one may run as this instance now."""

    def __init__(self, instance_id: str, reason: str) -> None:
        self.instance_id = instance_id
        self.reason = reason
        super().__init__(f"instance lease for {instance_id!r} lost: {reason}; stopping")


class BenchError(HlMonitorError):
    """A benchmark could not run or its run lost data."""


class ChaosError(HlMonitorError):
    """The chaos harness itself could not do what a scenario asked (a process would not start, ...)."""
