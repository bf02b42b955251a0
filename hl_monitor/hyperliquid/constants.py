"""Hyperliquid endpoints, limits and protocol constants (facts and sources: docs/protocol.md)."""

from __future__ import annotations

from typing import Final

MAINNET_WS_URL: Final = "wss://api.hyperliquid.xyz/ws"
MAINNET_INFO_URL: Final = "https://api.hyperliquid.xyz/info"
TESTNET_WS_URL: Final = "wss://api.hyperliquid-testnet.xyz/ws"
TESTNET_INFO_URL: Final = "https://api.hyperliquid-testnet.xyz/info"

# Per-IP limits, official docs (docs/protocol.md §5). The live server allows 15 users; the documented contract is 10.
MAX_CONNECTIONS: Final = 10
MAX_NEW_CONNECTIONS_PER_MINUTE: Final = 30
MAX_SUBSCRIPTIONS: Final = 1000
MAX_USERS: Final = 10
MAX_CLIENT_MESSAGES_PER_MINUTE: Final = 2000
MAX_INFLIGHT_POSTS: Final = 100
REST_WEIGHT_PER_MINUTE: Final = 1200

# The server closes a connection it has not heard from for 60 s (measured 60.6 s, close 1006).
SERVER_IDLE_TIMEOUT_S: Final = 60.0
# Ping well inside the idle window so one lost ping still leaves time for another.
PING_INTERVAL_S: Final = 20.0
# The nktkas SDK's deadline, kept here: a pong later than 10 s means the socket is dead (docs/protocol.md §8).
PONG_TIMEOUT_S: Final = 10.0
# OneKey caps the ack wait at 5 s and retries; acks are occasionally dropped (docs/protocol.md §1).
ACK_TIMEOUT_S: Final = 5.0

# REST info weights (docs/protocol.md §4). Everything not listed costs the default.
INFO_WEIGHT_DEFAULT: Final = 20
INFO_WEIGHTS: Final[dict[str, int]] = {
    "l2Book": 2,
    "allMids": 2,
    "clearinghouseState": 2,
    "orderStatus": 2,
    "spotClearinghouseState": 2,
    "exchangeStatus": 2,
    "userRole": 60,
}
# Requests that cost one more weight unit per this many returned items (read as +1 per 20, docs/protocol.md §4).
INFO_ITEM_WEIGHTED: Final = frozenset(
    {
        "recentTrades",
        "historicalOrders",
        "userFills",
        "userFillsByTime",
        "fundingHistory",
        "userFunding",
        "nonUserFundingUpdates",
        "twapHistory",
        "userTwapSliceFills",
        "userTwapSliceFillsByTime",
        "delegatorHistory",
        "delegatorRewards",
        "validatorStats",
    }
)
INFO_ITEMS_PER_EXTRA_WEIGHT: Final = 20
# REST `userFills` / `userFillsByTime` return at most 2000 fills per response; only the newest 10000 exist.
MAX_FILLS_PER_RESPONSE: Final = 2000
MAX_REACHABLE_FILLS: Final = 10000

# Order statuses that do not end an order; every other status (32+ known, new ones appear) is terminal.
NON_TERMINAL_STATUSES: Final = frozenset({"open", "triggered"})

USER_CAP_ERROR_PREFIX: Final = "Cannot track more than"
ALREADY_SUBSCRIBED_PREFIX: Final = "Already subscribed"
ALREADY_UNSUBSCRIBED_PREFIX: Final = "Already unsubscribed"
INVALID_SUBSCRIPTION_PREFIX: Final = "Invalid subscription"
PARSE_ERROR_PREFIX: Final = "Error parsing JSON into valid websocket request"
TOO_MANY_POSTS_PREFIX: Final = "too many pending post requests"
GREETING_TEXT: Final = "Websocket connection established."


def is_terminal_status(status: str) -> bool:
    """An order status ends the order unless it is `open` or `triggered` (unknown statuses are terminal)."""
    return status not in NON_TERMINAL_STATUSES


def info_weight(request_type: str, items_returned: int = 0) -> int:
    """REST weight of one /info request, including the per-20-items surcharge where it applies."""
    base = INFO_WEIGHTS.get(request_type, INFO_WEIGHT_DEFAULT)
    if request_type in INFO_ITEM_WEIGHTED and items_returned > 0:
        base += items_returned // INFO_ITEMS_PER_EXTRA_WEIGHT
    return base


def classify_error_text(text: str) -> str:
    """Map an `error` frame's text to a bounded kind label for metrics."""
    for prefix, kind in (
        (USER_CAP_ERROR_PREFIX, "user_cap"),
        (ALREADY_SUBSCRIBED_PREFIX, "already_subscribed"),
        (ALREADY_UNSUBSCRIBED_PREFIX, "already_unsubscribed"),
        (INVALID_SUBSCRIPTION_PREFIX, "invalid_subscription"),
        (PARSE_ERROR_PREFIX, "parse_error"),
        (TOO_MANY_POSTS_PREFIX, "too_many_posts"),
    ):
        if text.startswith(prefix):
            return kind
    return "other"
