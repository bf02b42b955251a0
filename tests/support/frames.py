"""Frames for the decoder property tests: real captured frames, arbitrary JSON, and one-node mutations."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from hl_monitor.errors import FrameDecodeError
from hl_monitor.hyperliquid.protocol import decode_frame
from tests.support.paths import FIXTURES, fixture

WS_LINES = (FIXTURES / "ws_frames.jsonl").read_bytes().splitlines()


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["NaN", "-Infinity", "1e999999999999", "0x" + "f" * 64, "B", "A", ""])
)


json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
REAL_FRAMES = [json.loads(line) for line in WS_LINES] + [
    json.loads(fixture(name))
    for name in (
        "ws_allmids.json",
        "ws_user_fill_liquidation.json",
        "ws_user_twap_history.json",
        "ws_user_twap_slice_fills.json",
    )
]


def assert_decodes_or_typed_error(raw: bytes | str) -> None:
    try:
        frame = decode_frame(raw)
    except FrameDecodeError:
        return
    assert type(frame).__name__.endswith("Frame")


def mutate(value: Any, path: list[int], replacement: Any) -> Any:
    """Replace the node reached by following `path` (indexes modulo the children) with `replacement`."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return replacement
    if isinstance(value, dict):
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: mutate(value[key], path[1:], replacement)}
    index = path[0] % len(value)
    return [*value[:index], mutate(value[index], path[1:], replacement), *value[index + 1 :]]
