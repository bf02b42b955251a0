"""Where the captured exchange frames and REST bodies live."""

from __future__ import annotations

from pathlib import Path
from typing import Final

FIXTURES: Final = Path(__file__).resolve().parents[1] / "fixtures"


def fixture(name: str) -> bytes:
    """The raw bytes of one captured file under tests/fixtures."""
    return (FIXTURES / name).read_bytes()
