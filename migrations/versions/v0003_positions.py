"""Positions: the whole position document per address, position event history, the publication outbox.

`hlm_positions` rows written before this revision hold the older per-dex size snapshot, not a position
document; they are a cache of exchange state, so they are deleted and rebuilt from the next state frame.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hl_monitor.storage.tables import (
    ADDRESS_LEN,
    COIN_LEN,
    MSG_ID_LEN,
    SHORT_LEN,
    SIGNAL_ID_LEN,
    SUBJECT_LEN,
    ExactDecimal,
    JsonText,
)

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_SUMMARY_COLUMNS = ("account_value", "total_ntl_pos", "total_margin_used", "withdrawable", "spot_usd")


def upgrade() -> None:
    op.execute(sa.text("DELETE FROM hlm_positions"))
    with op.batch_alter_table("hlm_positions") as batch:
        for name in _SUMMARY_COLUMNS:
            batch.add_column(sa.Column(name, ExactDecimal(), nullable=True))
        batch.add_column(sa.Column("position_count", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("as_of", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("model_state", JsonText(), nullable=True))
    op.create_table(
        "hlm_position_events",
        sa.Column("event_id", sa.String(MSG_ID_LEN), nullable=False),
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("coin", sa.String(COIN_LEN), nullable=False),
        sa.Column("symbol", sa.String(COIN_LEN), nullable=False),
        sa.Column("dex", sa.String(COIN_LEN), nullable=False),
        sa.Column("event", sa.String(SHORT_LEN), nullable=False),
        sa.Column("size_before", ExactDecimal(), nullable=False),
        sa.Column("size_after", ExactDecimal(), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=True),
        sa.Column("payload", JsonText(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_hlm_position_events"),
    )
    op.create_index("ix_hlm_position_events_address_time", "hlm_position_events", ["address", "time"])
    op.create_index("ix_hlm_position_events_time", "hlm_position_events", ["time"])
    op.create_table(
        "hlm_publications",
        sa.Column("msg_id", sa.String(MSG_ID_LEN), nullable=False),
        sa.Column("kind", sa.String(SHORT_LEN), nullable=False),
        sa.Column("subject", sa.String(SUBJECT_LEN), nullable=False),
        sa.Column("payload", JsonText(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("published_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("msg_id", name="pk_hlm_publications"),
    )
    op.create_index("ix_hlm_publications_published_at_created_at", "hlm_publications", ["published_at", "created_at"])


def downgrade() -> None:
    op.drop_table("hlm_publications")
    op.drop_table("hlm_position_events")
    op.execute(sa.text("DELETE FROM hlm_positions"))  # documents do not fit the older snapshot readers
    with op.batch_alter_table("hlm_positions") as batch:
        for name in ("model_state", "as_of", "position_count", *reversed(_SUMMARY_COLUMNS)):
            batch.drop_column(name)
