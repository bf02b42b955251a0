"""`position_size` (the old service's Small/Medium/Large, by notional USD) and the one decimal format of every
signal payload, on signals built by the real tracking engine."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Final

import msgspec
import pytest

from hl_monitor.config import Config, SignalsConfig, validate
from hl_monitor.delivery.sink import Sink
from hl_monitor.domain.signal import (
    LEGACY_KEYS,
    PositionSize,
    Signal,
    decode_signal,
    encode_legacy,
    encode_signal,
    plain_decimal,
    position_size_of,
)
from hl_monitor.errors import ConfigError
from hl_monitor.metrics import Metrics
from tests.support.factories import ADDR, NOW, T0, engine, fill, frame, update

DEFAULT_BOUNDS: Final = (Decimal(10_000), Decimal(100_000))
# A JSON number in the canonical form: no exponent, no trailing zero after a decimal point, no `-0`.
CANONICAL_NUMBER: Final = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


@pytest.mark.parametrize(
    ("notional", "size"),
    [("0", "Small"), ("9999.99", "Small"), ("10000", "Medium"), ("99999.999", "Medium"), ("100000", "Large")],
)
def test_the_old_services_bounds_apply_to_notional_usd(notional: str, size: PositionSize) -> None:
    assert position_size_of(Decimal(notional), DEFAULT_BOUNDS) == size


class Recorder:
    """The writer and the outbox behind the sink: what reached them."""

    def __init__(self) -> None:
        self.signals: list[Signal] = []

    async def put_signal(self, signal: Signal) -> None:
        self.signals.append(signal)

    async def submit(self, signal: Signal) -> None:
        return None


def built_signals() -> list[Signal]:
    """An open of 2 BTC at 100 (notional 200), then its full close in two fills (a close_rate of exactly 1)."""
    eng = engine()
    out: list[Signal] = []
    eng.on_user_fills(ADDR, frame(fill(1, 10, "2.0", "100.0")), NOW)
    out += eng.on_order_updates(ADDR, [update(1, "filled", orig="2.0")], NOW + 1)
    closing = [
        fill(2, 20, "0.50", "110.00", dir="Close Long", start="2.0", time=T0 + 5),
        fill(2, 21, "1.50", "0.0000001", dir="Close Long", start="1.5", time=T0 + 6),
    ]
    eng.on_user_fills(ADDR, frame(*closing), NOW + 2)
    out += eng.on_order_updates(ADDR, [update(2, "filled", orig="2")], NOW + 3)
    return out


async def test_the_sink_stamps_position_size_from_the_configured_thresholds() -> None:
    recorder = Recorder()
    sink = Sink(
        recorder,
        recorder,
        Metrics(),
        instance_id="test",
        signals=SignalsConfig(position_size_thresholds=[100.0, 150.0]),
    )
    opened, closed = built_signals()
    await sink([opened, closed])
    assert [(s.notional_usd, s.position_size) for s in recorder.signals] == [
        (Decimal(200), "Large"),
        (Decimal("55.00000015"), "Small"),
    ]
    legacy = json.loads(encode_legacy(recorder.signals[0]), parse_float=Decimal)
    assert tuple(legacy) == LEGACY_KEYS
    assert legacy["position_size"] == "Large"
    assert json.loads(encode_signal(recorder.signals[1]))["position_size"] == "Small"


@pytest.mark.parametrize("bounds", [[10_000.0], [5.0, 5.0], [100_000.0, 10_000.0], [-1.0, 10.0]])
def test_thresholds_must_be_two_ascending_amounts(bounds: list[float]) -> None:
    with pytest.raises(ConfigError) as info:
        validate(Config(signals=SignalsConfig(position_size_thresholds=bounds)))
    assert info.value.key == "signals.position_size_thresholds"


def _numbers(payload: bytes) -> dict[str, str]:
    """Every number of a flat (or one level nested) JSON object, as the text it was written with."""
    raw = msgspec.json.decode(payload, type=dict[str, msgspec.Raw])
    out: dict[str, str] = {}
    for key, value in raw.items():
        text = bytes(value).decode()
        if text.startswith("{"):
            out.update({f"{key}.{k}": v for k, v in _numbers(text.encode()).items()})
        elif text[0] in "-0123456789":
            out[key] = text
    return out


async def test_every_decimal_of_every_payload_has_one_form() -> None:
    """`close_rate` used to be `0` on opens and `1.000000` on closes; sizes kept the exchange's trailing zeros
    and tiny prices came out as `1E-7`. Now every number is plain and minimal; ids are unchanged."""
    recorder = Recorder()
    sink = Sink(recorder, recorder, Metrics(), instance_id="test")
    await sink(built_signals())
    opened, closed = recorder.signals
    assert (opened.signal_id, closed.signal_id) == (f"{ADDR}:1:OL", f"{ADDR}:2:CL")
    for signal in (opened, closed):
        for payload in (encode_signal(signal), encode_legacy(signal)):
            numbers = _numbers(payload)
            assert numbers, "the payload has numbers"
            bad = {k: v for k, v in numbers.items() if not CANONICAL_NUMBER.fullmatch(v)}
            assert bad == {}
        assert decode_signal(encode_signal(signal)) == signal  # the same values, exactly
    open_numbers, close_numbers = _numbers(encode_signal(opened)), _numbers(encode_signal(closed))
    assert (open_numbers["close_rate"], close_numbers["close_rate"]) == ("0", "1")
    assert (open_numbers["size"], open_numbers["price"], close_numbers["size"]) == ("2", "100", "2")
    assert _numbers(encode_legacy(closed))["close_rate"] == "1"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("1.000000", "1"),
        ("0", "0"),
        ("-0.000", "0"),
        ("0E-8", "0"),
        ("1E+3", "1000"),
        ("1.2E-7", "0.00000012"),
        ("65000.1234567890123450001", "65000.1234567890123450001"),
        ("-2.50", "-2.5"),
        ("1234567890123456789012345678901234.5", "1234567890123456789012345678901234.5"),
    ],
)
def test_plain_decimal(value: str, text: str) -> None:
    assert plain_decimal(Decimal(value)) == text
    assert Decimal(text) == Decimal(value)
