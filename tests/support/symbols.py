"""A SymbolMap built from the captured perp meta plus builder dexes and spot pairs of every documented shape."""

from __future__ import annotations

import json

from hl_monitor.hyperliquid.protocol import PerpDex, PerpMeta, SpotMeta, decode_info
from hl_monitor.hyperliquid.symbols import SymbolMap
from tests.support.paths import FIXTURES

# A spotMeta in the exchange's shape with the pairs the seed documents (@107 HYPE, @142 UBTC, PURR/USDC)
# plus a USDT0-quoted pair and a pair whose base token is missing from `tokens`.
SPOT_META = {
    "tokens": [
        {"name": "USDC", "index": 0, "szDecimals": 8, "weiDecimals": 8},
        {"name": "PURR", "index": 1, "szDecimals": 0, "weiDecimals": 5},
        {"name": "HYPE", "index": 150, "szDecimals": 2, "weiDecimals": 8},
        {"name": "UBTC", "index": 197, "szDecimals": 5, "weiDecimals": 10},
        {"name": "USDT0", "index": 268, "szDecimals": 2, "weiDecimals": 8},
        {"name": "UPUMP", "index": 299, "szDecimals": 0, "weiDecimals": 6},
    ],
    "universe": [
        {"name": "PURR/USDC", "tokens": [1, 0], "index": 0, "isCanonical": True},
        {"name": "@107", "tokens": [150, 0], "index": 107, "isCanonical": False},
        {"name": "@142", "tokens": [197, 0], "index": 142, "isCanonical": False},
        {"name": "@166", "tokens": [268, 0], "index": 166, "isCanonical": False},
        {"name": "@181", "tokens": [150, 268], "index": 181, "isCanonical": False},
        {"name": "@188", "tokens": [299, 0], "index": 188, "isCanonical": False},
        {"name": "@999", "tokens": [4242, 0], "index": 999, "isCanonical": False},
    ],
}
XYZ_META = {"universe": [{"name": "xyz:XYZ100", "szDecimals": 4}, {"name": "xyz:SILVER", "szDecimals": 2}]}
CASH_META = {"universe": [{"name": "cash:NVDA", "szDecimals": 3}]}
CORE_EXTRA = {"universe": [{"name": "PUMP", "szDecimals": 0}, {"name": "UBTC", "szDecimals": 0}]}


def build(categories: dict[str, int] | None = None) -> SymbolMap:
    core = decode_info((FIXTURES / "http_meta_perp_sample.json").read_bytes(), PerpMeta)
    merged = PerpMeta(universe=[*core.universe, *decode_info(json.dumps(CORE_EXTRA), PerpMeta).universe])
    return SymbolMap.build(
        perp_metas={
            "": merged,
            "xyz": decode_info(json.dumps(XYZ_META), PerpMeta),
            "cash": decode_info(json.dumps(CASH_META), PerpMeta),
        },
        spot_meta=decode_info(json.dumps(SPOT_META), SpotMeta),
        perp_dexs=[None, PerpDex(name="xyz"), PerpDex(name="cash"), PerpDex(name="flx")],
        pair_categories=categories,
    )
