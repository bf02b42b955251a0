"""Messages other than signals that go out exactly once: position events and liquidation alerts.

A `Publication` is what the delivery layer persists first and then publishes to JetStream with
`Nats-Msg-Id = msg_id` (docs/architecture.md §3): a replay, a restart or a second instance builds the same
`msg_id`, so JetStream stores it once. The payload is the message's JSON, already encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeAlias

import msgspec

__all__ = ["Publication", "PublicationKind", "PublicationSink"]

PublicationKind: TypeAlias = Literal["position_event", "alert"]


class Publication(msgspec.Struct, frozen=True, kw_only=True):
    msg_id: str
    kind: PublicationKind
    subject: str
    payload: bytes  # JSON
    created_at: int  # local wall clock, ms


class PublicationSink(Protocol):
    """Persists each publication, then hands it to its outbox; awaiting it is backpressure."""

    async def __call__(self, publications: Sequence[Publication], /) -> None: ...
