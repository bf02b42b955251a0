"""Whether a relay's publishes are being acknowledged (docs/architecture.md §8, "NATS publishing").

A connected NATS client is not proof that publishing works: during a stream leader election the connection stays
up while no node answers a publish for seconds. The relay, the one owner of publishing, feeds this record with
what it sees — a publish started, a publish failed, an ack arrived — and readiness reads `degraded`.

The rule: publishing is degraded once messages have waited `degraded_after` seconds with no ack arriving
meanwhile, and it is ok again at the next ack. Time, not a count of errors, decides, so a single failure whose
retry is acknowledged never shows, and a publish that hangs without an error does.
"""

from __future__ import annotations

from typing import Final, Literal

from hl_monitor.clock import Clock

__all__ = ["PUBLISH_DEGRADED_AFTER_S", "PublishHealth", "PublishState"]

# Ten times the first retry pause (`nats.retry_initial_delay`, 0.2 s): a transient failure is retried and
# acknowledged long before this; a leader election (4-9 s raft timeouts) shows for most of its length.
PUBLISH_DEGRADED_AFTER_S: Final = 2.0

PublishState = Literal["ok", "degraded"]


class PublishHealth:
    """Acks against waiting messages, on an injectable clock (`hl_monitor.clock`)."""

    def __init__(self, clock: Clock, degraded_after: float = PUBLISH_DEGRADED_AFTER_S) -> None:
        self._clock = clock
        self._degraded_after = degraded_after
        self._waiting_since: float | None = None  # messages waiting with no ack since then
        self._failures = 0  # failed publishes since the last ack
        self.acks = 0

    def attempt(self) -> None:
        """A publish starts: from now on an ack is due."""
        if self._waiting_since is None:
            self._waiting_since = self._clock.now()

    def failed(self) -> None:
        """A publish failed; its message stays waiting (the relay retries it)."""
        self._failures += 1
        self.attempt()

    def acked(self, *, still_waiting: bool) -> None:
        """An ack arrived: publishing works. `still_waiting`: other messages wait for theirs, from now on."""
        self.acks += 1
        self._failures = 0
        self._waiting_since = self._clock.now() if still_waiting else None

    def resumed(self) -> None:
        """The connection is back after an outage: the wait for an ack starts again (the outage itself is
        reported as disconnected, not as degraded)."""
        if self._waiting_since is not None:
            self._waiting_since = self._clock.now()

    @property
    def unacked_for(self) -> float:
        """Seconds messages have been waiting with no ack meanwhile (0 when nothing waits)."""
        if self._waiting_since is None:
            return 0.0
        return max(0.0, self._clock.now() - self._waiting_since)

    @property
    def failures(self) -> int:
        return self._failures

    def state(self) -> PublishState:
        """A method, not a property: it reads the clock, so two calls may differ."""
        if self._waiting_since is not None and self.unacked_for >= self._degraded_after:
            return "degraded"
        return "ok"
