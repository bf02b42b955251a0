"""REST answers decoded entry by entry (docs/protocol.md §3, §4): one odd entry never costs the page.

A fill without `tid`, `fee` or `feeToken` (as recorded in 2023) is kept with a substitute key that is the same on
every read, so deduplication still holds; an unreadable entry is skipped; each odd entry is counted by kind. Only a
body that is not a list raises, and only `ProtocolError`. Well-formed entries come through exactly as the strict
decoder reads them, so the dedup keys of normal fills do not change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, Final

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl_monitor.errors import ProtocolError
from hl_monitor.hyperliquid.protocol import (
    ODD_KINDS,
    ClearinghouseState,
    Decoded,
    Fill,
    FrontendOrder,
    OrderStatusEntry,
    WsTrade,
    decode_clearinghouse_state,
    decode_fills_page,
    decode_frontend_orders_page,
    decode_historical_orders_page,
    decode_info,
    decode_trades_page,
    substitute_tid,
)
from tests.support.factories import ADDR, NOW, engine
from tests.support.frames import json_values, mutate
from tests.support.paths import fixture

# Three partial fills of one order in one block, as a 2023 `userFills` answer has them: `fee` but no `tid` and
# no `feeToken` (hyperliquid-dex/hyperliquid-python-sdk, tests/cassettes/info_test/test_get_user_fills.yaml).
RECORDED_2023: Final[list[dict[str, Any]]] = [
    {
        "closedPnl": "-0.25686",
        "coin": "SUI",
        "crossed": True,
        "dir": "Close Long",
        "fee": "0.0",
        "hash": "0x3d4770d0527317ef77c404017559cb0103000b34010cc95e97b437cbc3b6087a",
        "oid": 189324432,
        "px": "1.3189",
        "side": "A",
        "startPosition": "4623.5",
        "sz": "142.7",
        "time": 1683245884863,
    },
    {
        "closedPnl": "-14.771454",
        "coin": "SUI",
        "crossed": True,
        "dir": "Close Long",
        "fee": "0.0",
        "hash": "0x3d4770d0527317ef77c404017559cb0103000b34010cc95e97b437cbc3b6087a",
        "oid": 189324432,
        "px": "1.3167",
        "side": "A",
        "startPosition": "4480.8",
        "sz": "3749.1",
        "time": 1683245884863,
    },
    {
        "closedPnl": "-6.980418",
        "coin": "SUI",
        "crossed": True,
        "dir": "Close Long",
        "fee": "0.0",
        "hash": "0x3d4770d0527317ef77c404017559cb0103000b34010cc95e97b437cbc3b6087a",
        "oid": 189324432,
        "px": "1.3093",
        "side": "A",
        "startPosition": "731.7",
        "sz": "731.7",
        "time": 1683245884863,
    },
]
FILL_FIXTURES: Final = (
    "http_user_fills.json",
    "http_user_fills_with_cloid.json",
    "http_user_fills_dust_conversion.json",
)
GOOD_FILLS: Final[list[dict[str, Any]]] = [f for name in FILL_FIXTURES for f in json.loads(fixture(name))]
# Fields recorded fills may lack; any subset of them may be missing from an entry.
OPTIONAL_IN_OLD_FILLS: Final = ("tid", "fee", "feeToken")
DEADLINE_MS: Final = 2000  # a decoder that goes quadratic on some page fails instead of stalling the suite
EXAMPLES: Final = 150


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def strict(raw: bytes, type_: Any) -> Any | None:
    """What the strict decoder makes of one entry, or None if it refuses it."""
    try:
        return msgspec.json.decode(raw, type=type_)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
        return None


# ------------------------------------------------------------------------------------------- examples


def test_recorded_tid_less_fills_keep_the_page_and_get_distinct_stable_keys() -> None:
    page = decode_fills_page(encode(RECORDED_2023))
    again = decode_fills_page(encode(RECORDED_2023))
    assert page.received == 3
    assert page.odd == {"missing_tid": 3, "missing_fee_token": 3}
    assert page.value == again.value
    tids = [f.tid for f in page.value]
    assert len(set(tids)) == 3, "one order's partial fills in one block must not share a key"
    assert all(f.tid_substituted and f.fee_token == "USDC" for f in page.value)
    assert [f.sz for f in page.value] == [Decimal("142.7"), Decimal("3749.1"), Decimal("731.7")]
    # The key is the documented function of the fill, whatever the decimals' trailing zeros.
    first = RECORDED_2023[0]
    assert tids[0] == substitute_tid(
        "SUI", first["time"], first["oid"], "A", Decimal("1.31890"), Decimal("142.70"), Decimal("4623.50")
    )
    assert decode_fills_page(encode([{**first, "px": "1.31890", "sz": "142.70"}])).value[0].tid == tids[0]


def test_a_fill_without_a_fee_reads_as_a_zero_fee() -> None:
    entry = {k: v for k, v in GOOD_FILLS[0].items() if k != "fee"}
    page = decode_fills_page(encode([entry, GOOD_FILLS[1]]))
    assert page.odd == {"missing_fee": 1}
    assert page.value[0].fee == 0
    assert page.value[0].tid == entry["tid"]
    assert not page.value[0].tid_substituted


def test_tid_less_fills_are_processed_once_however_often_they_are_read() -> None:
    """The substitute key is the engine's dedup key: a re-read page adds nothing, and the three partial fills of
    one order in one block are three fills (a key from oid, coin and time alone would merge them)."""
    eng = engine()
    assert eng.on_backfill(ADDR, decode_fills_page(encode(RECORDED_2023)).value, NOW) == []
    again = decode_fills_page(encode(RECORDED_2023[::-1])).value
    assert eng.unseen_fills(ADDR, again) == 0
    assert eng.on_backfill(ADDR, again, NOW + 1) == []
    assert eng.stats.duplicate_fills == 3
    (signal,) = eng.tick(NOW + 10 * 60 * 1000)  # the quiet timeout flushes the order
    assert (signal.oid, signal.fill_count, signal.size) == (189324432, 3, Decimal("4623.5"))


def test_unreadable_entries_are_skipped_and_counted() -> None:
    broken = [5, "fill", None, {"coin": "BTC"}, {**GOOD_FILLS[0], "px": "NaN"}, {**GOOD_FILLS[0], "side": "X"}]
    page = decode_fills_page(encode([GOOD_FILLS[0], *broken, GOOD_FILLS[1]]))
    assert page.value == decode_info(encode(GOOD_FILLS[:2]), list[Fill])
    assert (page.received, page.odd) == (8, {"invalid_item": 6})


@pytest.mark.parametrize("px", ["sNaN", "-Infinity", "1e999999999", "0.0", "-0"])
def test_a_tid_less_fill_with_any_price_is_read_or_skipped_never_raised(px: str) -> None:
    page = decode_fills_page(encode([{**RECORDED_2023[0], "px": px}, RECORDED_2023[1]]))
    assert page.received == 2
    assert len(page.value) + page.odd.get("invalid_item", 0) == 2
    assert page.value[-1].sz == Decimal("3749.1")


def test_unknown_fields_are_ignored_and_counted() -> None:
    page = decode_fills_page(encode([{**GOOD_FILLS[0], "newExchangeField": {"a": 1}}, GOOD_FILLS[1]]))
    assert page.value == decode_info(encode(GOOD_FILLS[:2]), list[Fill])
    assert page.odd == {"unknown_field": 1}


@pytest.mark.parametrize("name", FILL_FIXTURES)
def test_recorded_pages_decode_exactly_as_before_with_nothing_odd(name: str) -> None:
    raw = fixture(name)
    page = decode_fills_page(raw)
    assert page.value == decode_info(raw, list[Fill])
    assert page.odd == {}
    assert not any(f.tid_substituted for f in page.value)


def test_a_state_without_withdrawable_still_decodes_and_is_counted() -> None:
    body = json.loads(fixture("http_clearinghouse_state.json"))
    del body["withdrawable"]
    state = decode_clearinghouse_state(encode(body))
    assert state.value.withdrawable == 0
    assert (
        state.value.positions() == decode_info(fixture("http_clearinghouse_state.json"), ClearinghouseState).positions()
    )
    assert state.odd == {"missing_withdrawable": 1}
    assert decode_clearinghouse_state(fixture("http_clearinghouse_state.json")).odd == {}


def test_a_state_with_a_broken_position_is_refused_whole() -> None:
    """A state is absolute: leaving out a position it could not read would report that coin flat."""
    body = json.loads(fixture("http_clearinghouse_state.json"))
    body["assetPositions"][0]["position"]["szi"] = "not a size"
    with pytest.raises(ProtocolError):
        decode_clearinghouse_state(encode(body))


# ------------------------------------------------------------------------------------------- properties

good_fills = st.builds(
    lambda base, tid, time: {**base, "tid": tid, "time": time},
    st.sampled_from(GOOD_FILLS),
    st.integers(min_value=0, max_value=2**50),
    st.integers(min_value=0, max_value=2**45),
)
old_fills = st.builds(
    lambda base, missing: {k: v for k, v in base.items() if k not in missing},
    st.sampled_from(GOOD_FILLS + RECORDED_2023),
    st.sets(st.sampled_from(OPTIONAL_IN_OLD_FILLS), min_size=1),
)
damaged_fills = st.builds(
    mutate, st.sampled_from(GOOD_FILLS), st.lists(st.integers(min_value=0, max_value=30), max_size=3), json_values
)
fill_entries = st.one_of(good_fills, old_fills, damaged_fills, json_values)


def assert_page_invariants(page: Decoded[list[Any]], entries: Sequence[Any], type_: Any) -> list[Any]:
    """Common to every page decoder; returns the entries the strict decoder reads, in order."""
    assert page.received == len(entries)
    assert set(page.odd) <= set(ODD_KINDS)
    assert all(count > 0 for count in page.odd.values())
    assert len(page.value) + page.odd.get("invalid_item", 0) == len(entries)
    well_formed = [item for item in (strict(encode(e), type_) for e in entries) if item is not None]
    # Every well-formed entry comes through unchanged and in order (repaired ones may sit between them).
    out = iter(page.value)
    assert all(any(got == want for got in out) for want in well_formed)
    return well_formed


@settings(max_examples=EXAMPLES * 2, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fill_entries, max_size=12))
def test_any_fills_page_keeps_every_well_formed_fill_and_only_repairs_old_ones(entries: list[Any]) -> None:
    raw = encode(entries)
    page = decode_fills_page(raw)
    well_formed = assert_page_invariants(page, entries, Fill)
    # Beyond the well-formed entries only fills without a tid or a fee are read (and only those get substitutes).
    lacking = [e for e in entries if isinstance(e, dict) and (e.get("tid") is None or e.get("fee") is None)]
    assert 0 <= len(page.value) - len(well_formed) <= len(lacking)
    assert sum(f.tid_substituted for f in page.value) <= sum(1 for e in lacking if e.get("tid") is None)
    assert page.value == decode_fills_page(raw).value, "the same page reads the same, substitute keys included"


PAGE_DECODERS: Final[list[tuple[str, Callable[[bytes], Decoded[list[Any]]], Any, list[Any]]]] = [
    ("fills", decode_fills_page, Fill, GOOD_FILLS),
    ("recentTrades", decode_trades_page, WsTrade, json.loads(fixture("http_recent_trades_btc.json"))),
    (
        "historicalOrders",
        decode_historical_orders_page,
        OrderStatusEntry,
        [json.loads(fixture("http_historical_order_liquidation_market.json"))],
    ),
    (
        "frontendOpenOrders",
        decode_frontend_orders_page,
        FrontendOrder,
        json.loads(fixture("http_frontend_open_orders.json")),
    ),
]


@settings(max_examples=EXAMPLES * 2, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(PAGE_DECODERS),
    st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(min_value=0, max_value=30), max_size=3), json_values),
        max_size=10,
    ),
    st.randoms(use_true_random=False),
)
def test_every_page_decoder_keeps_the_well_formed_entries_of_any_list(
    target: tuple[str, Callable[[bytes], Decoded[list[Any]]], Any, list[Any]],
    slots: list[tuple[bool, list[int], Any]],
    rng: Any,
) -> None:
    _, decode, type_, samples = target
    entries = [rng.choice(samples) if keep else mutate(rng.choice(samples), path, value) for keep, path, value in slots]
    page = decode(encode(entries))
    well_formed = assert_page_invariants(page, entries, type_)
    if type_ is not Fill:  # nothing but fills is repaired
        assert page.value == well_formed


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS)
@given(st.sampled_from(PAGE_DECODERS), json_values)
def test_a_body_that_is_not_a_list_is_the_only_error_and_it_is_protocol_error(
    target: tuple[str, Callable[[bytes], Decoded[list[Any]]], Any, list[Any]], body: Any
) -> None:
    _, decode, _, _ = target
    if isinstance(body, list):
        decode(encode(body))  # never raises: every entry is judged on its own
    else:
        with pytest.raises(ProtocolError):
            decode(encode(body))


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=4), json_values, st.sampled_from([True, False]))
def test_any_state_decodes_or_raises_protocol_error(path: list[int], value: Any, drop_withdrawable: bool) -> None:
    body = mutate(json.loads(fixture("http_clearinghouse_state_builder_perp.json")), path, value)
    if drop_withdrawable and isinstance(body, dict):
        body.pop("withdrawable", None)
    try:
        state = decode_clearinghouse_state(encode(body))
    except ProtocolError:
        return
    assert isinstance(body, dict)
    assert set(state.odd) <= {"missing_withdrawable", "unknown_field"}
    assert ("missing_withdrawable" in state.odd) == ("withdrawable" not in body)
