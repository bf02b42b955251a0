"""Fuzzing beyond tests/test_protocol.py's property tests: every REST decoder on mutated real bodies, and whole
frames of realistic to oversized shape (thousands of fills, long strings, wide objects).

Bounded for CI: a fixed example budget per target and a per-example deadline, so a decoder that hangs or goes
quadratic on some input fails the test instead of stalling the suite. The only acceptable outcomes are a decoded
value or the typed error (`ProtocolError` / `FrameDecodeError`); anything else is a crash.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Final

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl_monitor.errors import ProtocolError
from hl_monitor.hyperliquid.protocol import (
    AllMids,
    MetaAndAssetCtxs,
    OrderStatusResponse,
    PerpDexs,
    PerpMeta,
    SpotClearinghouseState,
    SpotMeta,
    SpotMetaAndAssetCtxs,
    decode_clearinghouse_state,
    decode_fills_page,
    decode_frontend_orders_page,
    decode_historical_orders_page,
    decode_info,
    decode_trades_page,
)
from tests.support.frames import REAL_FRAMES, assert_decodes_or_typed_error, json_values, mutate
from tests.support.paths import fixture

# A hang or a quadratic blow-up shows as an example slower than this (a 2 MB frame decodes in ~20 ms).
DEADLINE_MS: Final = 2000
EXAMPLES: Final = 150

ASSET_CTX: Final = {
    "dayNtlVlm": "4490636699.3287734985",
    "funding": "0.0000052974",
    "impactPxs": ["80637.2", "80640.0"],
    "markPx": "80640.0",
    "midPx": "80639.5",
    "openInterest": "36295.80812",
    "oraclePx": "80684.7",
    "premium": "-0.0005540084",
    "prevDayPx": "77759.0",
    "dayBaseVlm": "56265.69068",
}
SPOT_ASSET_CTX: Final = {  # the documented field set
    "prevDayPx": "39.1",
    "dayNtlVlm": "401234567.5",
    "markPx": "40.2",
    "midPx": "40.19",
    "circulatingSupply": "333000000.0",
    "coin": "@107",
    "totalSupply": "999990000.0",
    "dayBaseVlm": "10000000.0",
}
# Every REST /info body the client decodes, with the decoder the client uses (pages entry by entry:
# tests/test_rest_items.py) and a real captured body (or a documented shape) to mutate.
REST_TARGETS: Final[list[tuple[str, Callable[[bytes], Any], Any]]] = [
    (
        "clearinghouseState",
        decode_clearinghouse_state,
        json.loads(fixture("http_clearinghouse_state.json")),
    ),
    (
        "clearinghouseState builder dex",
        decode_clearinghouse_state,
        json.loads(fixture("http_clearinghouse_state_builder_perp.json")),
    ),
    (
        "spotClearinghouseState",
        lambda r: decode_info(r, SpotClearinghouseState),
        json.loads(fixture("http_spot_clearinghouse_state.json")),
    ),
    ("userFills", decode_fills_page, json.loads(fixture("http_user_fills.json"))),
    ("userFills cloid", decode_fills_page, json.loads(fixture("http_user_fills_with_cloid.json"))),
    ("userFills dust", decode_fills_page, json.loads(fixture("http_user_fills_dust_conversion.json"))),
    (
        "frontendOpenOrders",
        decode_frontend_orders_page,
        json.loads(fixture("http_frontend_open_orders.json")),
    ),
    (
        "historicalOrders",
        decode_historical_orders_page,
        [json.loads(fixture("http_historical_order_liquidation_market.json"))],
    ),
    (
        "orderStatus",
        lambda r: decode_info(r, OrderStatusResponse),
        json.loads(fixture("http_order_status_frontend_market.json")),
    ),
    ("meta", lambda r: decode_info(r, PerpMeta), json.loads(fixture("http_meta_perp_sample.json"))),
    (
        "metaAndAssetCtxs",
        lambda r: decode_info(r, MetaAndAssetCtxs),
        [json.loads(fixture("http_meta_perp_sample.json")), [ASSET_CTX] * 3],
    ),
    ("spotMeta", lambda r: decode_info(r, SpotMeta), json.loads(fixture("http_spot_meta_non_usdc_collateral.json"))),
    (
        "spotMetaAndAssetCtxs",
        lambda r: decode_info(r, SpotMetaAndAssetCtxs),
        [json.loads(fixture("http_spot_meta_non_usdc_collateral.json")), [SPOT_ASSET_CTX]],
    ),
    ("recentTrades", decode_trades_page, json.loads(fixture("http_recent_trades_btc.json"))),
    ("allMids", lambda r: decode_info(r, AllMids), {"BTC": "80000.5", "@107": "40.1"}),
    ("perpDexs", lambda r: decode_info(r, PerpDexs), [None, {"name": "xyz", "fullName": "XYZ"}]),
]


def decodes_or_protocol_error(decode: Callable[[bytes], Any], raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(raw)


def test_every_rest_target_decodes_its_unmutated_body() -> None:
    """The fuzz seeds are valid: mutations start from bodies the decoders accept."""
    for name, decode, body in REST_TARGETS:
        assert decode(json.dumps(body).encode()) is not None, name


@settings(max_examples=EXAMPLES * 2, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(REST_TARGETS),
    st.lists(st.integers(min_value=0, max_value=60), max_size=7),
    json_values,
)
def test_rest_decoders_on_mutated_real_bodies_raise_only_protocol_error(
    target: tuple[str, Callable[[bytes], Any], Any], path: list[int], replacement: Any
) -> None:
    _, decode, body = target
    decodes_or_protocol_error(decode, json.dumps(mutate(body, path, replacement)).encode())


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS)
@given(st.sampled_from(REST_TARGETS), st.binary(max_size=64), st.integers(min_value=0, max_value=4000))
def test_rest_decoders_on_truncated_and_spliced_bodies(
    target: tuple[str, Callable[[bytes], Any], Any], splice: bytes, cut: int
) -> None:
    _, decode, body = target
    raw = json.dumps(body).encode()
    decodes_or_protocol_error(decode, raw[: cut % (len(raw) + 1)] + splice)


# ------------------------------------------------------------------------------------- whole frames, big ones

_FILLS_FRAME: Final = next(f for f in REAL_FRAMES if f.get("channel") == "userFills")
_ONE_FILL: Final = _FILLS_FRAME["data"]["fills"][0]


@settings(max_examples=40, deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=5000),
    st.lists(st.integers(min_value=0, max_value=60), max_size=4),
    json_values,
    st.booleans(),
)
def test_big_user_fills_frames_decode_or_fail_cleanly_within_the_deadline(
    fills: int, path: list[int], replacement: Any, snapshot: bool
) -> None:
    """Up to 5000 fills (~2 MB, beyond a real 2000-fill snapshot), one of them damaged anywhere."""
    rows = [_ONE_FILL] * fills
    if rows:
        index = path[0] % len(rows) if path else 0
        rows[index] = mutate(_ONE_FILL, path[1:], replacement)
    frame = {
        "channel": "userFills",
        "data": {"isSnapshot": snapshot, "user": _FILLS_FRAME["data"]["user"], "fills": rows},
    }
    assert_decodes_or_typed_error(json.dumps(frame))


@settings(max_examples=EXAMPLES, deadline=DEADLINE_MS)
@given(
    st.sampled_from(REAL_FRAMES),
    st.sampled_from(["", "x" * 1000, "9" * 5000, "\u0000\ud7ff" * 200, "0." + "0" * 4000 + "1", "1e" + "9" * 50]),
    st.integers(min_value=1, max_value=2000),
)
def test_frames_with_huge_strings_numbers_and_wide_objects(frame: dict[str, Any], text: str, width: int) -> None:
    """Long strings, numbers with thousands of digits, and objects with thousands of unknown keys."""
    data = frame.get("data")
    wide = {f"k{i}": text for i in range(width)}
    assert_decodes_or_typed_error(json.dumps({**frame, "data": text}))
    assert_decodes_or_typed_error(json.dumps({**frame, "extra": wide}))
    if isinstance(data, dict):
        assert_decodes_or_typed_error(json.dumps({**frame, "data": {**data, **wide}}))
        first = sorted(data)[0] if data else "x"
        assert_decodes_or_typed_error(json.dumps({**frame, "data": {**data, first: text}}))
