"""The dir table and fill splitting: flips, liquidation/ADL/settlement arithmetic, dedup keys."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from hl_monitor.tracking.fills import fill_key, split_fill
from tests.support.factories import fill, fixture_fills


def test_trade_dirs_map_to_one_leg_each() -> None:
    """Open/Close Long/Short are futures legs; Buy is spot open LONG, Sell spot close LONG."""
    table = {
        "Open Long": ("OL", "open", "LONG", "futures"),
        "Open Short": ("OS", "open", "SHORT", "futures"),
        "Close Long": ("CL", "close", "LONG", "futures"),
        "Close Short": ("CS", "close", "SHORT", "futures"),
        "Buy": ("B", "open", "LONG", "spot"),
        "Sell": ("S", "close", "LONG", "spot"),
    }
    for dir_, expected in table.items():
        parts = split_fill(fill(1, 1, "2", dir=dir_))
        assert parts is not None
        assert len(parts) == 1
        leg, part = parts[0]
        assert (leg.code, leg.direction, leg.side, leg.asset_type) == expected
        assert part.sz == Decimal("2")


def test_flip_splits_into_close_of_start_position_and_open_of_rest() -> None:
    """Long > Short with startPosition 2 and sz 5: Close Long 2 + Open Short 3 (same tid/px/time)."""
    original = fill(7, 70, "5", "101.5", dir="Long > Short", start="2", side="A")
    parts = split_fill(original)
    assert parts is not None
    (close_leg, close), (open_leg, opened) = parts
    assert (close_leg.code, close.dir, close.sz, close.start_position) == ("CL", "Close Long", Decimal(2), Decimal(2))
    assert (open_leg.code, opened.dir, opened.sz, opened.start_position) == ("OS", "Open Short", Decimal(3), Decimal(0))
    assert close.tid == opened.tid == 70
    assert close.px == opened.px == Decimal("101.5")
    assert close.fee == original.fee
    assert opened.fee == 0


def test_flip_that_only_closes_makes_no_zero_size_open() -> None:
    """sz == |startPosition|: only the close half exists (the old service emitted a 0-size open)."""
    parts = split_fill(fill(7, 71, "3", dir="Short > Long", start="-3", side="B"))
    assert parts is not None
    assert [(leg.code, p.sz) for leg, p in parts] == [("CS", Decimal(3))]


def test_liquidation_and_adl_close_the_side_of_the_start_position() -> None:
    """Liquidated/ADL fills become closes of the start position's side; absorbing fills open by side."""
    liq = split_fill(fill(8, 80, "1", dir="Liquidated Cross Long", start="1", side="A"))
    assert liq is not None
    assert [(leg.code, leg.direction, leg.side, leg.liquidation) for leg, _ in liq] == [
        ("LCL-CL", "close", "LONG", True)
    ]
    adl = split_fill(fill(8, 81, "0.5", dir="Auto-Deleveraging", start="-2", side="B"))
    assert adl is not None
    assert [(leg.code, leg.side) for leg, _ in adl] == [("ADL-CS", "SHORT")]
    absorbed = split_fill(fill(8, 82, "1", dir="Liquidated Isolated Short", start="0", side="A"))
    assert absorbed is not None
    assert [(leg.code, leg.direction, leg.side) for leg, _ in absorbed] == [("LIS-OS", "open", "SHORT")]
    settled = split_fill(fill(8, 83, "4", dir="Settlement", start="4", side="A", coin="xyz:SILVER"))
    assert settled is not None
    assert [(leg.code, leg.liquidation) for leg, _ in settled] == [("SET-CL", False)]
    borrow = split_fill(fill(8, 84, "4", dir="Backstop Borrow Liquidation", start="10", side="A", coin="@107"))
    assert borrow is not None
    assert borrow[0][0].asset_type is None


def test_ignored_and_unknown_dirs_make_no_legs() -> None:
    """Dust conversions, vault netting and unknown labels produce nothing (real captured fills)."""
    by_dir = {f.dir: f for f in fixture_fills("http_user_fills_dust_conversion.json")}
    assert split_fill(by_dir["Spot Dust Conversion"]) is None
    assert split_fill(by_dir["Net Child Vaults"]) is None
    assert split_fill(fill(9, 90, "1", dir="Outcome Split")) is None


def test_tid_zero_fills_get_distinct_keys() -> None:
    """System fills share tid 0; their keys include oid, coin and time so they never collide."""
    dust = [f for f in fixture_fills("http_user_fills_dust_conversion.json") if f.tid == 0]
    assert len(dust) == 1
    a = fill(1, 0, "1", dir="Spot Dust Conversion", coin="@142")
    b = fill(2, 0, "1", dir="Spot Dust Conversion", coin="@142")
    c = fill(1, 0, "1", dir="Spot Dust Conversion", coin="@151")
    assert len({fill_key(a), fill_key(b), fill_key(c), fill_key(dust[0])}) == 4
    assert fill_key(fill(1, 55, "1")) == 55


sizes = st.decimals(min_value=Decimal("0.00001"), max_value=Decimal("100000"), places=5)
prices = st.decimals(min_value=Decimal("0.000001"), max_value=Decimal("200000"), places=6)
flip_dirs = st.sampled_from(
    ["Long > Short", "Short > Long", "Liquidated Cross Long", "Auto-Deleveraging", "Settlement"]
)


@given(sz=sizes, start=sizes, px=prices, dir_=flip_dirs, buy=st.booleans())
def test_split_conserves_size_and_notional(sz: Decimal, start: Decimal, px: Decimal, dir_: str, buy: bool) -> None:
    """Any split: sizes sum to the fill, notional and VWAP are unchanged, no zero-size leg, the close half
    ends exactly flat, and position arithmetic over the halves equals the original fill's."""
    side = "B" if buy else "A"
    if dir_ == "Long > Short":
        side = "A"
    elif dir_ == "Short > Long":
        side = "B"
    signed_start = -start if side == "B" else start  # flips and liquidations reduce first
    original = fill(1, 1, str(sz), str(px), dir=dir_, start=str(signed_start), side=side)
    parts = split_fill(original)
    assert parts is not None
    assert all(p.sz > 0 for _, p in parts)
    assert sum((p.sz for _, p in parts), Decimal(0)) == sz
    assert sum((p.sz * p.px for _, p in parts), Decimal(0)) == sz * px
    delta = sz if side == "B" else -sz
    end = parts[-1][1].start_position + (parts[-1][1].sz if side == "B" else -parts[-1][1].sz)
    if len(parts) == 2:
        close = parts[0][1]
        assert close.start_position + (close.sz if side == "B" else -close.sz) == 0
        assert end == signed_start + delta
    else:
        assert parts[0][1].start_position + delta == signed_start + delta
