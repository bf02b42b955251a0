"""Whale discovery from the public tape: bounded heavy hitters per rolling window, and a label with its evidence.

Every tape trade names both parties (`users: [buyer, seller]`, `docs/protocol.md` §2), so the tape shows every
trader of every covered coin. Per window (`discovery.windows`) a `HeavyHitters` table keeps at most
`max_tracked` counters, whatever the number of distinct addresses (Space-Saving, weighted by notional): a new
address replaces the counter with the smallest notional and inherits it as its error bound, so an address that
moves real size cannot be pushed out by a crowd of small ones. A window is cut into `SLICES` slices; a counter
keeps its numbers per slice, and a slice that leaves the window is subtracted, so the totals are always those of
the window (to one slice's precision) on the injected clock.

Labels (`classify`), first match wins:

- `engine`: most of its notional was executed by the engine (all-zero hash, `docs/protocol.md` §7).
- `wash_suspect`: a large share of self-trades (both sides one address), or a pair that mostly trades with each
  other (each is the other's top counterparty) while its net stays near zero.
- `market_maker`: two-sided (net near zero against gross), mostly passive, many coins.
- `directional`: net flow one way per coin, a large share of gross.
- `mixed`: none of these (shown, never auto-watched).

Pure: no I/O, no clock reads; `now_ms` is passed in. Tests: `tests/test_discovery.py`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Final, Literal

import msgspec

from hl_monitor.hyperliquid.protocol import WsTrade
from hl_monitor.tracking.tape import is_engine_trade

__all__ = [
    "LABELS",
    "Candidate",
    "Discovery",
    "Evidence",
    "HeavyHitters",
    "Label",
    "classify",
]

Label = Literal["market_maker", "directional", "wash_suspect", "engine", "mixed"]
LABELS: Final[tuple[Label, ...]] = ("market_maker", "directional", "wash_suspect", "engine", "mixed")

ZERO_ADDRESS: Final = "0x" + "0" * 40
# Slices per window: expiry is exact to 1/12 of the window (5 min of an hour) at 12 small records per counter.
SLICES: Final = 12
# Counterparties remembered per counter and slice: enough to name the top partner of a wash pair, bounded.
MAX_COUNTERPARTIES: Final = 8
# More than half of the notional executed by the engine: liquidations, ADL and TWAP slices dominate the flow.
ENGINE_SHARE: Final = 0.5
# A fifth of the notional traded against itself is no accident of matching: it is printed volume.
SELF_TRADE_SHARE: Final = 0.2
# A pair is a wash suspect when each is the other's top partner for at least this share of its gross.
PAIR_SHARE: Final = 0.6
# |net| ÷ gross at or below this counts as two-sided (flat over the window).
FLAT_NET_RATIO: Final = 0.2
# A market maker provides liquidity: at least this share of its notional was passive (the resting side).
MM_PASSIVE_SHARE: Final = 0.6
# A market maker quotes several books; one or two coins look like a pair trade instead.
MM_MIN_COINS: Final = 3
# |net| ÷ gross at or above this is directional: most of what it traded stayed on the book as a position.
DIRECTIONAL_NET_RATIO: Final = 0.6
# Float residue of subtracting an expired slice: below a cent a coin counts as not traded in the window.
_EPSILON_USD: Final = 1e-6
# Counters a label query classifies at most (largest notional first): a whale worth a look is far inside it,
# and classifying all 50,000 counters would stall the event loop for a second. Also the size of the ranking.
LABEL_SCAN: Final = 2_000
# The heap holds at most this many times the table's entries (stale ones of freed counters included) before it is
# rebuilt from the table, `RANK_STEP` counters per call.
HEAP_SLACK: Final = 2
# An eviction re-ranks at most this many counters that grew since their heap entry was pushed; then the smallest
# of them goes (a counter a little above the minimum: its notional is the newcomer's error bound either way, so
# the bound stays an upper bound). Without it, one eviction could re-rank most of the table: a 0.25 s pause.
EVICT_REPUSH_MAX: Final = 64
# Work per call of `work()` (each tape batch, each query): counters whose expired slices are subtracted, and
# counters the ranking scan looks at (~10 µs and ~1 µs each): a few ms per call, never a pause of the loop.
EXPIRE_STEP: Final = 250
RANK_STEP: Final = 1_000
# A table this small is ranked exactly at every query (a few ms); a larger one from the incremental ranking.
EXACT_RANK_MAX: Final = 2_000
# A new ranking scan starts at most this often, and only after as many additions as the table has counters: the
# top of hour-long windows moves slowly, and so a scan costs at most one counter visit per addition.
RANK_REFRESH_MS: Final = 5_000


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class Evidence(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The numbers behind a label, each a share of the candidate's gross notional in the window."""

    net_ratio: float  # Σ|net per coin| ÷ gross: 0 = flat, 1 = all one way
    taker_share: float  # aggressive (taker) notional ÷ gross
    engine_share: float  # engine-executed (all-zero hash) notional ÷ gross
    self_trade_share: float  # notional where both sides were this address ÷ gross
    top_counterparty: str | None  # the address it traded most notional against
    top_counterparty_share: float  # that partner's notional ÷ gross
    mutual_pair: bool  # the top counterparty's own top counterparty is this address
    coins: int  # distinct coins traded
    notional_error_usd: float  # Space-Saving bound: the notional may be undercounted by at most this much
    reasons: tuple[str, ...]  # the rule that gave the label, in words


# Not tracked by the garbage collector (gc=False): holds values and other records, never a cycle (architecture §10).
class Candidate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One address's flow over one window, with its label."""

    address: str
    window_s: int
    label: Label
    notional_usd: float
    trades: int
    buy_usd: float
    sell_usd: float
    net_usd_by_coin: dict[str, float]  # + bought, − sold
    coins: tuple[str, ...]
    evidence: Evidence


# Structs with gc=False rather than slotted classes: a counter holds only numbers and dicts of numbers, never a
# cycle, and thousands of them live for a whole window; the collector need not track them (architecture §10).
class _Slice(msgspec.Struct, gc=False):
    """One counter's numbers within one slice of the window (also used, summed, as the running total)."""

    buy: float = 0.0
    sell: float = 0.0
    taker: float = 0.0
    engine: float = 0.0
    self_: float = 0.0
    error: float = 0.0
    trades: int = 0
    net: dict[str, float] = msgspec.field(default_factory=dict)
    coin_gross: dict[str, float] = msgspec.field(default_factory=dict)
    cp: dict[str, float] = msgspec.field(default_factory=dict)

    @property
    def gross(self) -> float:
        return self.buy + self.sell


class _Counter(_Slice, gc=False):
    """A counter is its own running total (one object fewer per counter), untracked like its slices."""

    slices: dict[int, _Slice] = msgspec.field(default_factory=dict)
    # The label as last classified, and the trades and gross it was classified at: queries repeat every few
    # seconds over the same top counters, most of which did not trade since. Plain fields, no tuple.
    label: Label = "mixed"
    label_trades: int = -1
    label_gross: float = 0.0

    @property
    def total(self) -> _Slice:
        return self

    def key(self) -> float:
        """What Space-Saving ranks on: notional plus the inherited bound, so a newcomer is not evicted at once."""
        return self.buy + self.sell + self.error


def _add_cp(cp: dict[str, float], who: str, usd: float) -> None:
    if who in cp or len(cp) < MAX_COUNTERPARTIES:
        cp[who] = cp.get(who, 0.0) + usd
        return
    # Space-Saving within the slice: the smallest partner makes room and hands over its count.
    low = min(cp, key=cp.__getitem__)
    cp[who] = cp.pop(low) + usd


class HeavyHitters:
    """One window's Space-Saving table: at most `capacity` counters (see the module docstring)."""

    def __init__(self, window_ms: int, capacity: int, *, start_ms: int = 0) -> None:
        if window_ms <= 0 or capacity <= 0:
            raise ValueError("window and capacity must be positive")
        self.window_ms = window_ms
        self.capacity = capacity
        self._slice_ms = max(1, window_ms // SLICES)
        self._current = start_ms // self._slice_ms
        self._counters: dict[str, _Counter] = {}
        self._heap: list[tuple[float, str]] = []
        self.evictions = 0
        # Expiry, incremental: slice index → addresses with a record in it; those of slices that left the window
        # wait in `_expiring` and are subtracted `EXPIRE_STEP` at a time.
        self._members: dict[int, set[str]] = {}
        self._expiring: list[str] = []
        # Ranking, incremental: the top `LABEL_SCAN` addresses by notional at the last finished scan, a scan in
        # progress over a snapshot of the keys, and the addresses admitted since that scan began.
        self._ranked: list[str] = []
        self._scan: list[str] | None = None
        self._scan_pos = 0
        self._scan_top: list[tuple[float, str]] = []
        self._scan_started_ms: int | None = None
        self._fresh: set[str] = set()  # risers: not in `_ranked`, grown to at least its floor since
        self._ranked_set: frozenset[str] = frozenset()
        self._rank_floor = 0.0
        self._adds_since_scan = 0
        # Heap compaction in steps: the new heap being filled from a snapshot of the keys.
        self._compact: list[str] | None = None
        self._compact_pos = 0
        self._next_heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._counters)

    @property
    def heap_entries(self) -> int:
        return len(self._heap)

    def structures(self) -> int:
        """Counters plus every per-slice record, heap entry and bookkeeping entry: the measure of memory the tests
        bound."""
        return (
            len(self._counters)
            + sum(len(c.slices) for c in self._counters.values())
            + len(self._heap)
            + sum(len(m) for m in self._members.values())
            + len(self._expiring)
            + len(self._ranked)
            + len(self._scan or ())
            + len(self._scan_top)
            + len(self._fresh)
            + len(self._ranked_set)
            + len(self._compact or ())
            + len(self._next_heap)
        )

    @property
    def expiring(self) -> int:
        """Counters with expired slices not yet subtracted (0 once `settle()` ran)."""
        return len(self._expiring)

    # ------------------------------------------------------------------ writing

    def advance(self, now_ms: int) -> None:
        """Move to the slice of `now_ms`; the counters of slices that left the window are queued for expiry and
        subtracted a step at a time (`work`), so a slice boundary never pauses the caller for a whole table."""
        index = now_ms // self._slice_ms
        if index > self._current:
            self._current = index
            oldest = index - SLICES + 1
            for i in [i for i in self._members if i < oldest]:
                self._expiring.extend(self._members.pop(i))
        self.work(now_ms)

    def work(self, now_ms: int) -> None:
        """One bounded step of expiry and of the ranking scan (module constants `EXPIRE_STEP`, `RANK_STEP`)."""
        self._expire(EXPIRE_STEP)
        self._rank(now_ms, RANK_STEP)
        self._compact_step(RANK_STEP)

    def settle(self, now_ms: int) -> None:
        """Finish every pending expiry and a fresh ranking (tests and benchmarks; the service works in steps)."""
        self.advance(now_ms)
        self._expire(len(self._expiring))
        self._scan_started_ms = None
        self._scan = None
        self._rank(now_ms, len(self._counters) + 1)

    def _expire(self, budget: int) -> None:
        oldest = self._current - SLICES + 1
        for _ in range(min(budget, len(self._expiring))):
            address = self._expiring.pop()
            counter = self._counters.get(address)
            if counter is None:
                continue  # evicted since its slice expired
            for i in [i for i in counter.slices if i < oldest]:
                _subtract(counter.total, counter.slices.pop(i))
            if not counter.slices:
                del self._counters[address]  # its heap entry goes stale; `_evict` skips it
                self._fresh.discard(address)

    def _rank(self, now_ms: int, budget: int) -> None:
        if self._scan is None:
            due = (
                self._scan_started_ms is None
                or len(self._fresh) > LABEL_SCAN  # so many risers that queries would rank them: rank afresh
                or (now_ms - self._scan_started_ms >= RANK_REFRESH_MS and self._adds_since_scan >= self.capacity)
            )
            if not due or len(self._counters) <= EXACT_RANK_MAX:
                return
            self._scan, self._scan_pos, self._scan_top = list(self._counters), 0, []
            self._scan_started_ms = now_ms
            self._adds_since_scan = 0
        scan, top = self._scan, self._scan_top
        end = min(len(scan), self._scan_pos + budget)
        for address in scan[self._scan_pos : end]:
            counter = self._counters.get(address)
            if counter is None:
                continue
            entry = (counter.total.gross, address)
            if len(top) < LABEL_SCAN:
                heapq.heappush(top, entry)
            elif entry > top[0]:
                heapq.heapreplace(top, entry)
        self._scan_pos = end
        if end == len(scan):
            self._ranked = [a for _, a in top]
            self._ranked_set = frozenset(self._ranked)
            self._rank_floor = top[0][0] if len(top) >= LABEL_SCAN else 0.0
            # Risers seen during the scan may have been visited before they rose: keep those still above the floor.
            self._fresh = {
                a
                for a in self._fresh
                if a not in self._ranked_set
                and (c := self._counters.get(a)) is not None
                and c.total.gross >= self._rank_floor
            }
            self._scan, self._scan_top = None, []

    def _push(self, entry: tuple[float, str]) -> None:
        heapq.heappush(self._heap, entry)
        if self._compact is not None:
            heapq.heappush(self._next_heap, entry)

    def _compact_step(self, budget: int) -> None:
        if self._compact is None:
            if len(self._heap) <= HEAP_SLACK * self.capacity:
                return
            self._compact, self._compact_pos, self._next_heap = list(self._counters), 0, []
        end = min(len(self._compact), self._compact_pos + budget)
        for address in self._compact[self._compact_pos : end]:
            counter = self._counters.get(address)
            if counter is not None:
                heapq.heappush(self._next_heap, (counter.key(), address))
        self._compact_pos = end
        if end == len(self._compact):
            self._heap, self._next_heap, self._compact = self._next_heap, [], None

    def add(
        self,
        address: str,
        coin: str,
        usd: float,
        *,
        buy: bool,
        taker: bool,
        engine: bool,
        counterparty: str,
        self_trade: bool,
    ) -> None:
        self._adds_since_scan += 1
        counter = self._counters.get(address)
        if counter is None:
            counter = self._admit(address)
        piece = counter.slices.get(self._current)
        if piece is None:
            piece = counter.slices[self._current] = _Slice()
            self._members.setdefault(self._current, set()).add(address)
        # A self-trade is both sides at once: gross twice, one side aggressive, no net, no counterparty.
        legs = 2 if self_trade else 1
        for s in (piece, counter.total):
            if self_trade or buy:
                s.buy += usd
            if self_trade or not buy:
                s.sell += usd
            if taker or self_trade:
                s.taker += usd
            if engine:
                s.engine += usd * legs
            if self_trade:
                s.self_ += usd * legs
            else:
                s.net[coin] = s.net.get(coin, 0.0) + (usd if buy else -usd)
            s.coin_gross[coin] = s.coin_gross.get(coin, 0.0) + usd * legs
            s.trades += 1
        if self._ranked and address not in self._ranked_set and counter.total.gross >= self._rank_floor:
            self._fresh.add(address)  # risen into the top since the last ranking: every query considers it
        if not self_trade:
            _add_cp(piece.cp, counterparty, usd)
            counter.total.cp[counterparty] = counter.total.cp.get(counterparty, 0.0) + usd
            if len(counter.total.cp) > MAX_COUNTERPARTIES * SLICES:
                _trim_cp(counter.total.cp)

    def _admit(self, address: str) -> _Counter:
        counter = _Counter()
        if len(self._counters) >= self.capacity:
            floor = self._evict()
            piece = counter.slices[self._current] = _Slice()
            self._members.setdefault(self._current, set()).add(address)
            piece.error = floor
            counter.total.error = floor
        self._counters[address] = counter
        self._push((counter.key(), address))
        return counter

    def _evict(self) -> float:
        """Remove the counter with the smallest key (or, after `EVICT_REPUSH_MAX` re-ranked ones, the smallest of
        those); return its key (the newcomer's error bound)."""
        grown: tuple[float, str] | None = None  # the smallest counter re-ranked by this eviction
        repushed = 0
        while True:
            if repushed >= EVICT_REPUSH_MAX and grown is not None:
                current, address = grown
                counter = self._counters[address]
                break
            key, address = heapq.heappop(self._heap)
            found = self._counters.get(address)
            if found is None:
                continue  # an entry of a counter freed or evicted earlier
            current = found.key()
            if current > key:
                self._push((current, address))  # grew since it was pushed: re-rank it
                repushed += 1
                if grown is None or (current, address) < grown:
                    grown = (current, address)
                continue
            counter = found
            break
        del self._counters[address]  # its entries left in the heap go stale
        for i in counter.slices:
            members = self._members.get(i)
            if members is not None:
                members.discard(address)
        self._fresh.discard(address)
        self.evictions += 1
        return current

    # ------------------------------------------------------------------ reading

    def candidates(
        self, exclude: Iterable[str] = (), *, label: Label | None = None, limit: int | None = None
    ) -> list[Candidate]:
        """Candidates largest notional first, built lazily. A `label` query looks at the top `LABEL_SCAN`
        counters by notional only, so a label that matches nothing costs a bounded scan, not the whole table."""
        excluded = set(exclude)
        if len(self._counters) <= EXACT_RANK_MAX or not self._ranked or (label is None and limit is None):
            pool: Iterable[str] = self._counters  # small, not ranked yet, or every counter asked for: exact
        else:
            # The last finished ranking plus the newcomers since its scan began (`_rank`): a bounded pool.
            pool = itertools.chain(self._ranked, self._fresh)
        live = (
            (c.total.gross, a)
            for a in dict.fromkeys(pool)
            if (c := self._counters.get(a)) is not None and c.total.gross > _EPSILON_USD
        )
        if label is None and limit is not None:
            inspect = limit + len(excluded)
        elif label is not None:
            inspect = LABEL_SCAN
        else:
            inspect = len(self._counters)
        ranked = sorted(heapq.nlargest(inspect, live, key=itemgetter(0)), key=lambda ga: (-ga[0], ga[1]))
        out: list[Candidate] = []
        for _, address in ranked:
            if limit is not None and len(out) >= limit:
                break
            if address in excluded:
                continue
            if label is not None and self.label_of(address) != label:
                continue  # the label alone is cheap; the full candidate is built only for those returned
            candidate = self.get(address)
            if candidate is not None:
                out.append(candidate)
        return out

    def label_of(self, address: str) -> Label | None:
        """The address's label without building its candidate (same rules and numbers as `get`)."""
        counter = self._counters.get(address)
        if counter is None or counter.total.gross <= _EPSILON_USD:
            return None
        total = counter.total
        gross = total.gross
        if counter.label_trades == total.trades and counter.label_gross == gross:
            return counter.label
        partner, partner_usd = _top_cp(total)
        mutual = False
        if partner is not None and (other := self._counters.get(partner)) is not None:
            mutual = _top_cp(other.total)[0] == address
        coins = len(total.coin_gross)
        one_sided = sum(abs(round(total.net.get(c, 0.0), 2)) for c in total.coin_gross)
        label, _ = classify(
            net_ratio=_ratio(one_sided, gross),
            taker_share=_ratio(total.taker, gross),
            engine_share=_ratio(total.engine, gross),
            self_trade_share=_ratio(total.self_, gross),
            pair_share=_ratio(partner_usd, gross),
            mutual_pair=mutual,
            coins=coins,
        )
        counter.label, counter.label_trades, counter.label_gross = label, total.trades, gross
        return label

    def get(self, address: str) -> Candidate | None:
        counter = self._counters.get(address)
        if counter is None or counter.total.gross <= _EPSILON_USD:
            return None
        tops = {address: _top_cp(counter.total)}
        partner = tops[address][0]
        if partner is not None and (other := self._counters.get(partner)) is not None:
            tops[partner] = _top_cp(other.total)
        return _candidate(address, counter.total, self.window_ms // 1000, tops)


def _subtract(total: _Slice, piece: _Slice) -> None:
    total.buy -= piece.buy
    total.sell -= piece.sell
    total.taker -= piece.taker
    total.engine -= piece.engine
    total.self_ -= piece.self_
    total.error -= piece.error
    total.trades -= piece.trades
    for coin, usd in piece.net.items():
        total.net[coin] = total.net.get(coin, 0.0) - usd
    for coin, usd in piece.coin_gross.items():
        left = total.coin_gross.get(coin, 0.0) - usd
        if left <= _EPSILON_USD:
            total.coin_gross.pop(coin, None)
            total.net.pop(coin, None)
        else:
            total.coin_gross[coin] = left
    for who, usd in piece.cp.items():
        if who in total.cp:
            left = total.cp[who] - usd
            if left <= 0:
                del total.cp[who]
            else:
                total.cp[who] = left


def _trim_cp(cp: dict[str, float]) -> None:
    keep = sorted(cp.items(), key=lambda kv: -kv[1])[:MAX_COUNTERPARTIES]
    cp.clear()
    cp.update(keep)


def _top_cp(total: _Slice) -> tuple[str | None, float]:
    if not total.cp:
        return None, 0.0
    who = max(total.cp, key=lambda k: (total.cp[k], k))
    return who, total.cp[who]


def _ratio(part: float, whole: float) -> float:
    return round(max(0.0, part) / whole, 4) if whole > 0 else 0.0


def _candidate(address: str, total: _Slice, window_s: int, tops: dict[str, tuple[str | None, float]]) -> Candidate:
    gross = total.gross
    partner, partner_usd = tops.get(address) or _top_cp(total)
    mutual = partner is not None and partner in tops and tops[partner][0] == address
    coins = tuple(sorted(total.coin_gross))
    net = {c: round(total.net.get(c, 0.0), 2) for c in coins}
    one_sided = sum(abs(v) for v in net.values())
    evidence_numbers = {
        "net_ratio": _ratio(one_sided, gross),
        "taker_share": _ratio(total.taker, gross),
        "engine_share": _ratio(total.engine, gross),
        "self_trade_share": _ratio(total.self_, gross),
        "top_counterparty_share": _ratio(partner_usd, gross),
    }
    label, reasons = classify(
        net_ratio=evidence_numbers["net_ratio"],
        taker_share=evidence_numbers["taker_share"],
        engine_share=evidence_numbers["engine_share"],
        self_trade_share=evidence_numbers["self_trade_share"],
        pair_share=evidence_numbers["top_counterparty_share"],
        mutual_pair=mutual,
        coins=len(coins),
    )
    return Candidate(
        address=address,
        window_s=window_s,
        label=label,
        notional_usd=round(gross, 2),
        trades=total.trades,
        buy_usd=round(total.buy, 2),
        sell_usd=round(total.sell, 2),
        net_usd_by_coin=net,
        coins=coins,
        evidence=Evidence(
            **evidence_numbers,
            top_counterparty=partner,
            mutual_pair=mutual,
            coins=len(coins),
            notional_error_usd=round(max(0.0, total.error), 2),
            reasons=reasons,
        ),
    )


def classify(
    *,
    net_ratio: float,
    taker_share: float,
    engine_share: float,
    self_trade_share: float,
    pair_share: float,
    mutual_pair: bool,
    coins: int,
) -> tuple[Label, tuple[str, ...]]:
    """The label and the rule that gave it (module docstring: first match wins)."""
    if engine_share > ENGINE_SHARE:
        return "engine", (f"{engine_share:.0%} of notional engine-executed (all-zero hash)",)
    if self_trade_share >= SELF_TRADE_SHARE:
        return "wash_suspect", (f"{self_trade_share:.0%} of notional traded against itself",)
    if mutual_pair and pair_share >= PAIR_SHARE and net_ratio <= FLAT_NET_RATIO:
        return "wash_suspect", (
            f"{pair_share:.0%} of notional against one partner whose top partner it is, net {net_ratio:.0%} of gross",
        )
    passive = 1 - taker_share
    if net_ratio <= FLAT_NET_RATIO and passive >= MM_PASSIVE_SHARE and coins >= MM_MIN_COINS:
        return "market_maker", (
            f"net {net_ratio:.0%} of gross (two-sided)",
            f"{passive:.0%} passive",
            f"{coins} coins",
        )
    if net_ratio >= DIRECTIONAL_NET_RATIO:
        return "directional", (f"net {net_ratio:.0%} of gross one way per coin",)
    return "mixed", (f"net {net_ratio:.0%} of gross, {passive:.0%} passive, {coins} coins: no clear pattern",)


class Discovery:
    """Every window's table fed from the deduplicated tape; the zero address and `exclude` are never counted."""

    def __init__(
        self, windows_ms: Sequence[int], capacity: int, *, exclude: Iterable[str] = (), start_ms: int = 0
    ) -> None:
        self.tables = {w: HeavyHitters(w, capacity, start_ms=start_ms) for w in windows_ms}
        self.exclude = frozenset(a.lower() for a in exclude) | {ZERO_ADDRESS}
        self.trades = 0

    def on_trades(self, trades: Sequence[WsTrade], now_ms: int) -> None:
        for table in self.tables.values():
            table.advance(now_ms)  # also one bounded step of expiry and ranking
        for t in trades:
            if t.users is None:
                continue
            buyer, seller = t.users[0].lower(), t.users[1].lower()
            usd = float(t.px) * float(t.sz)
            if usd <= 0:
                continue
            self.trades += 1
            engine = is_engine_trade(t)
            buyer_takes = t.side == "B"
            for table in self.tables.values():
                if buyer == seller:
                    if buyer not in self.exclude:
                        table.add(
                            buyer, t.coin, usd, buy=True, taker=True, engine=engine, counterparty=buyer, self_trade=True
                        )
                    continue
                if buyer not in self.exclude:
                    table.add(
                        buyer,
                        t.coin,
                        usd,
                        buy=True,
                        taker=buyer_takes,
                        engine=engine,
                        counterparty=seller,
                        self_trade=False,
                    )
                if seller not in self.exclude:
                    table.add(
                        seller,
                        t.coin,
                        usd,
                        buy=False,
                        taker=not buyer_takes,
                        engine=engine,
                        counterparty=buyer,
                        self_trade=False,
                    )

    def advance(self, now_ms: int) -> None:
        for table in self.tables.values():
            table.advance(now_ms)

    def settle(self, now_ms: int) -> None:
        for table in self.tables.values():
            table.settle(now_ms)

    def candidates(self, window_ms: int, *, label: Label | None = None, limit: int | None = None) -> list[Candidate]:
        return self.tables[window_ms].candidates(self.exclude, label=label, limit=limit)

    def get(self, window_ms: int, address: str) -> Candidate | None:
        return self.tables[window_ms].get(address)
