"""Per-IP budgets: one object enforces every Hyperliquid per-IP limit for the whole process.

Hyperliquid counts per egress IP (docs/protocol.md §5): open WebSocket connections, new connections a
minute, subscriptions, distinct users across user-specific subscriptions, client→server messages a
minute and REST weight a minute. Every component asks `Budgets` before it spends any of them, so the
service can never exceed a limit, however many tasks ask at once.

Two kinds of budget:
- counters (connections, subscriptions, users): taken and given back; `try_*` refuses at once.
- sliding windows (new connections, messages, REST weight): the sum taken in any window never exceeds
  the capacity; `await` waits, in FIFO order per priority, until the window has room.

Priorities: `"high"` may use the whole window; `"low"` only `1 - budget_high_priority_reserve` of it, so
periodic polling always leaves headroom for gap recovery (REST) and pings (messages). High waiters are
served before low ones; within a priority the order is strict FIFO, so a large request is never starved
by small ones.

Time comes from an injectable `Clock` (`MonotonicClock` in production, `ManualClock` in tests).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from types import TracebackType
from typing import Final, Generic, TypeVar

from hl_monitor.clock import Clock, MonotonicClock, Timer
from hl_monitor.config import HyperliquidConfig
from hl_monitor.domain.address import Priority
from hl_monitor.errors import BudgetExceededError, ConfigError
from hl_monitor.metrics import Metrics

__all__ = [
    "BUDGET_NAMES",
    "Budgets",
    "ConnectionSlot",
    "WeightGrant",
]

# The exchange's rate limits are per minute.
LIMIT_WINDOW_S: Final = 60.0
# A request stamped at t on our clock reaches the server up to network jitter later; widening our window
# by this much keeps two requests we see 60 s apart from landing inside one server-side window.
WINDOW_SLACK_S: Final = 1.0
# Float slack when comparing an entry's expiry with the clock, so a timer set for the expiry always sees it expired.
EXPIRY_EPSILON_S: Final = 1e-6
# The server frees a closed connection's users/subscriptions about 2 s after the close (docs/protocol.md §5);
# wait a bit longer.
RELEASE_AFTER_CLOSE_S: Final = 3.0

CONNECTIONS: Final = "connections"
NEW_CONNECTIONS: Final = "new_connections"
SUBSCRIPTIONS: Final = "subscriptions"
USERS: Final = "users"
CLIENT_MESSAGES: Final = "client_messages"
REST_WEIGHT: Final = "rest_weight"
BUDGET_NAMES: Final = (CONNECTIONS, NEW_CONNECTIONS, SUBSCRIPTIONS, USERS, CLIENT_MESSAGES, REST_WEIGHT)


# ---------------------------------------------------------------------------------------- limiters


class _Entry:
    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class _Waiter:
    __slots__ = ("amount", "future", "priority", "timer")

    def __init__(self, amount: int, priority: Priority) -> None:
        self.amount = amount
        self.priority = priority
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: Timer | None = None

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def rearm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.future.done():
            self.future = asyncio.get_running_loop().create_future()


_E = TypeVar("_E")


class _Limiter(Generic[_E]):
    """Shared waiting logic: one FIFO queue per priority; only the head waiter watches the clock."""

    def __init__(self, name: str, capacity: int, reserve: float, clock: Clock, metrics: Metrics) -> None:
        self.name = name
        self.capacity = capacity
        # Low priority may fill the window only up to here; at least 1 so low callers are never locked out.
        self.low_limit = max(1, math.floor(capacity * (1.0 - reserve)))
        self._clock = clock
        self._refusals = metrics.budget_refusals.labels(budget=name)
        self._queues: dict[Priority, deque[_Waiter]] = {"high": deque(), "low": deque()}
        self._blocked_until = -math.inf
        metrics.budget_capacity.labels(budget=name).set(capacity)
        metrics.budget_used.labels(budget=name).set_function(self.used)

    # -- subclass hooks
    def used(self) -> int:
        raise NotImplementedError

    def _record(self, amount: int) -> _E:
        raise NotImplementedError

    def _delay_for_room(self, amount: int, limit: int) -> float | None:
        """Seconds until `amount` fits under `limit` with no further takes; None if only a release helps."""
        raise NotImplementedError

    # -- common
    def limit(self, priority: Priority) -> int:
        return self.capacity if priority == "high" else self.low_limit

    @property
    def waiting(self) -> int:
        return len(self._queues["high"]) + len(self._queues["low"])

    def block_for(self, seconds: float) -> None:
        """Admit nothing for `seconds` (the server pushed back, e.g. HTTP 429)."""
        self._blocked_until = max(self._blocked_until, self._clock.now() + seconds)

    def _fits(self, amount: int, priority: Priority) -> bool:
        return self._clock.now() >= self._blocked_until and self.used() + amount <= self.limit(priority)

    def _delay(self, amount: int, priority: Priority) -> float | None:
        blocked = self._blocked_until - self._clock.now()
        room = self._delay_for_room(amount, self.limit(priority))
        if blocked > 0:
            return blocked if room is None else max(blocked, room)
        return room

    def _ahead(self, priority: Priority) -> bool:
        """Is anyone queued who must be served before a new `priority` request?"""
        return bool(self._queues["high"]) or (priority == "low" and bool(self._queues["low"]))

    def _head(self) -> _Waiter | None:
        for queue in self._queues.values():
            if queue:
                return queue[0]
        return None

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.wake()

    def _check_possible(self, amount: int, priority: Priority) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: negative amount {amount}")
        if amount > self.limit(priority):
            self._refusals.inc()
            raise BudgetExceededError(self.name, amount, self.limit(priority))

    def try_take(self, amount: int, priority: Priority = "high") -> bool:
        """Take now or refuse (counted); never jumps the queue."""
        self._check_possible(amount, priority)
        if not self._ahead(priority) and self._fits(amount, priority):
            self._record(amount)
            return True
        self._refusals.inc()
        return False

    async def take(self, amount: int, priority: Priority = "high") -> _E:
        """Wait (FIFO per priority) until `amount` fits, then take it. Cancel-safe."""
        self._check_possible(amount, priority)
        if not self._ahead(priority) and self._fits(amount, priority):
            return self._record(amount)
        self._refusals.inc()
        waiter = _Waiter(amount, priority)
        queue = self._queues[priority]
        queue.append(waiter)
        try:
            while True:
                if self._head() is waiter:
                    if self._fits(amount, priority):
                        queue.popleft()
                        entry = self._record(amount)
                        self._wake_head()
                        return entry
                    delay = self._delay(amount, priority)
                    if delay is not None:
                        waiter.timer = self._clock.call_later(delay, waiter.wake)
                await waiter.future
                waiter.rearm()
        finally:
            waiter.rearm()
            if waiter in queue:  # cancelled while waiting: let the next one in
                was_head = self._head() is waiter
                queue.remove(waiter)
                if was_head:
                    self._wake_head()


class _Window(_Limiter[_Entry]):
    """Sliding log: the sum of amounts stamped within any `window` seconds never exceeds the capacity."""

    def __init__(self, name: str, capacity: int, reserve: float, clock: Clock, metrics: Metrics, window: float) -> None:
        self.window = window
        self._log: deque[_Entry] = deque()
        self._sum = 0
        super().__init__(name, capacity, reserve, clock, metrics)

    def _expired(self, entry: _Entry) -> bool:
        return entry.at + self.window <= self._clock.now() + EXPIRY_EPSILON_S

    def _expire(self) -> None:
        while self._log and self._expired(self._log[0]):
            self._sum -= self._log.popleft().amount

    def used(self) -> int:
        self._expire()
        return self._sum

    def _record(self, amount: int) -> _Entry:
        entry = _Entry(self._clock.now(), amount)
        self._log.append(entry)
        self._sum += amount
        return entry

    def _delay_for_room(self, amount: int, limit: int) -> float | None:
        excess = self.used() + amount - limit
        if excess <= 0:
            return 0.0
        for entry in self._log:
            excess -= entry.amount
            if excess <= 0:
                return entry.at + self.window - self._clock.now()
        return None  # unreachable while amount <= limit; kept for type completeness

    def adjust(self, entry: _Entry, amount: int) -> None:
        """Change an entry's amount after the fact (REST item surcharge or refund of a pessimistic reservation)."""
        self._expire()
        if self._expired(entry):
            return  # already out of the window: nothing left to correct
        self._sum += amount - entry.amount
        entry.amount = amount
        self._wake_head()


class _Counter(_Limiter[None]):
    """Concurrent use: taken and released explicitly."""

    def __init__(self, name: str, capacity: int, clock: Clock, metrics: Metrics) -> None:
        self._in_use = 0
        super().__init__(name, capacity, 0.0, clock, metrics)

    def used(self) -> int:
        return self._in_use

    def _record(self, amount: int) -> None:
        self._in_use += amount

    def _delay_for_room(self, amount: int, limit: int) -> float | None:
        return 0.0 if self._in_use + amount <= limit else None

    def release(self, amount: int) -> None:
        if amount < 0 or amount > self._in_use:
            raise ValueError(f"{self.name}: releasing {amount} but only {self._in_use} in use")
        self._in_use -= amount
        self._wake_head()


# ---------------------------------------------------------------------------------------- handles


class ConnectionSlot:
    """One open WebSocket connection counted against the per-IP limit; release it when the socket is closed."""

    def __init__(self, counter: _Counter) -> None:
        self._counter = counter
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Idempotent."""
        if not self._released:
            self._released = True
            self._counter.release(1)

    async def __aenter__(self) -> ConnectionSlot:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class WeightGrant:
    """REST weight taken for one request. `settle(actual)` corrects it once the response size is known."""

    def __init__(self, window: _Window, entry: _Entry) -> None:
        self._window = window
        self._entry = entry

    @property
    def weight(self) -> int:
        return self._entry.amount

    def settle(self, actual: int) -> None:
        """Set the final weight: refunds an over-reservation or charges a surcharge (which cannot be refused)."""
        self._window.adjust(self._entry, actual)


# ---------------------------------------------------------------------------------------- budgets


class Budgets:
    """Every per-IP Hyperliquid budget of this process (build exactly one and share it)."""

    def __init__(self, cfg: HyperliquidConfig, metrics: Metrics, *, clock: Clock | None = None) -> None:
        reserve = cfg.budget_high_priority_reserve
        if not 0.0 <= reserve < 1.0:
            raise ConfigError("hyperliquid.budget_high_priority_reserve", f"must be in [0, 1), got {reserve}")
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        window = LIMIT_WINDOW_S + WINDOW_SLACK_S
        self._connections = _Counter(CONNECTIONS, cfg.max_connections, self.clock, metrics)
        self._subscriptions = _Counter(SUBSCRIPTIONS, cfg.max_subscriptions, self.clock, metrics)
        self._users = _Counter(USERS, cfg.max_users, self.clock, metrics)
        self._new_connections = _Window(
            NEW_CONNECTIONS, cfg.max_new_connections_per_minute, 0.0, self.clock, metrics, window
        )
        self._messages = _Window(
            CLIENT_MESSAGES, cfg.max_client_messages_per_minute, reserve, self.clock, metrics, window
        )
        self._rest = _Window(REST_WEIGHT, cfg.rest_weight_per_minute, reserve, self.clock, metrics, window)
        self._user_refs: dict[str, int] = {}

    # ---- connections

    def try_acquire_connection(self) -> ConnectionSlot | None:
        """A connection slot now, or None (counted) when all are open."""
        return ConnectionSlot(self._connections) if self._connections.try_take(1) else None

    async def acquire_connection(self) -> ConnectionSlot:
        """Wait for a free connection slot. Dial only after `new_connection_permit()` as well."""
        await self._connections.take(1)
        return ConnectionSlot(self._connections)

    async def new_connection_permit(self) -> None:
        """Wait until one more connection attempt fits the per-minute window (call before every dial)."""
        await self._new_connections.take(1)

    # ---- subscriptions and users

    def try_add_subscriptions(self, n: int = 1) -> bool:
        return self._subscriptions.try_take(n)

    def release_subscriptions(self, n: int = 1, *, after_close: bool = False) -> None:
        """Give back `n` subscriptions; `after_close` waits until the server has freed a closed socket's."""
        if after_close:
            self.clock.call_later(RELEASE_AFTER_CLOSE_S, lambda: self._subscriptions.release(n))
        else:
            self._subscriptions.release(n)

    def try_add_user(self, address: str) -> bool:
        """Count one user-specific subscription of `address`; False (counted) if it would be a user too many.

        An address counts once however many subscriptions (on however many connections) use it.
        """
        key = address.lower()
        if key in self._user_refs:
            self._user_refs[key] += 1
            return True
        if not self._users.try_take(1):
            return False
        self._user_refs[key] = 1
        return True

    def release_user(self, address: str, *, after_close: bool = False) -> None:
        """Undo one `try_add_user`; the user slot frees with the address's last subscription."""
        key = address.lower()
        if key not in self._user_refs:
            raise ValueError(f"release_user for an address that holds no subscription: {address}")
        if after_close:
            self.clock.call_later(RELEASE_AFTER_CLOSE_S, lambda: self._drop_user_ref(key))
        else:
            self._drop_user_ref(key)

    def _drop_user_ref(self, key: str) -> None:
        refs = self._user_refs[key] - 1
        if refs > 0:
            self._user_refs[key] = refs
        else:
            del self._user_refs[key]
            self._users.release(1)

    def tracks_user(self, address: str) -> bool:
        return address.lower() in self._user_refs

    # ---- rates

    async def message_permit(self, n: int = 1, priority: Priority = "low") -> None:
        """Wait until `n` more client→server WebSocket messages fit the per-minute window (pings: high)."""
        await self._messages.take(n, priority)

    async def rest_weight(self, weight: int, priority: Priority = "low") -> WeightGrant:
        """Wait until `weight` fits the REST window and take it; `settle` the grant once the reply is in."""
        return WeightGrant(self._rest, await self._rest.take(weight, priority))

    def block_rest(self, seconds: float) -> None:
        """Stop every REST request for `seconds` (the server answered 429, so someone else shares the IP)."""
        self._rest.block_for(seconds)

    def rest_limit(self, priority: Priority) -> int:
        """The most weight one request of this priority can ever be granted."""
        return self._rest.limit(priority)

    # ---- reporting

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Used, capacity and waiting callers per budget (for /status)."""
        limiters: tuple[_Counter | _Window, ...] = (
            self._connections,
            self._new_connections,
            self._subscriptions,
            self._users,
            self._messages,
            self._rest,
        )
        return {lim.name: {"used": lim.used(), "capacity": lim.capacity, "waiting": lim.waiting} for lim in limiters}
