"""Initial schema: addresses, positions, aggregations, signals (with the outbox flag), watermarks.

Revision ID: 0001
Revises:
Create Date: 2026-09-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hl_monitor.storage.tables import (
    ADDRESS_LEN,
    COIN_LEN,
    DIR_LEN,
    INSTANCE_LEN,
    LABEL_LEN,
    SHORT_LEN,
    SIGNAL_ID_LEN,
    STATUS_LEN,
    BigId,
    ExactDecimal,
    JsonText,
    PreciseDateTime,
    precise_now,
)

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "hlm_addresses",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("label", sa.String(LABEL_LEN), nullable=False, server_default=""),
        sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("tier", sa.String(SHORT_LEN), nullable=False, server_default="auto"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("server_id", sa.Integer(), nullable=True),
        sa.Column("created_at", PreciseDateTime, nullable=False, server_default=precise_now()),
        sa.Column("updated_at", PreciseDateTime, nullable=False, server_default=precise_now()),
        sa.PrimaryKeyConstraint("id", name="pk_hlm_addresses"),
        sa.UniqueConstraint("address", name="uq_hlm_addresses_address"),
        sa.CheckConstraint("tier IN ('precise', 'wide', 'auto')", name="ck_hlm_addresses_tier"),
    )
    op.create_table(
        "hlm_positions",
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("payload", JsonText(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("address", name="pk_hlm_positions"),
    )
    op.create_table(
        "hlm_aggregations",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("oid", sa.BigInteger(), nullable=False),
        sa.Column("direction", sa.String(DIR_LEN), nullable=False),
        sa.Column("twap_id", sa.BigInteger(), nullable=True),
        sa.Column("coin", sa.String(COIN_LEN), nullable=False),
        sa.Column("status", sa.String(STATUS_LEN), nullable=False),
        sa.Column("fill_count", sa.Integer(), nullable=False),
        sa.Column("first_fill_time", sa.BigInteger(), nullable=False),
        sa.Column("last_fill_time", sa.BigInteger(), nullable=False),
        sa.Column("record", JsonText(), nullable=False),
        sa.Column("closed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("closed_at", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_hlm_aggregations"),
        sa.UniqueConstraint("address", "oid", "direction", name="uq_hlm_aggregations_address_oid_direction"),
    )
    op.create_index("ix_hlm_aggregations_closed_updated_at", "hlm_aggregations", ["closed", "updated_at"])
    op.create_table(
        "hlm_signals",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=False),
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("asset_type", sa.String(SHORT_LEN), nullable=False),
        sa.Column("symbol", sa.String(COIN_LEN), nullable=False),
        sa.Column("coin_type", sa.String(SHORT_LEN), nullable=False),
        sa.Column("direction", sa.String(SHORT_LEN), nullable=False),
        sa.Column("side", sa.String(SHORT_LEN), nullable=False),
        sa.Column("position_rate", ExactDecimal(), nullable=False),
        sa.Column("close_rate", ExactDecimal(), nullable=False),
        sa.Column("size", ExactDecimal(), nullable=False),
        sa.Column("price", ExactDecimal(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("schema_version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(SHORT_LEN), nullable=False),
        sa.Column("coin", sa.String(COIN_LEN), nullable=False),
        sa.Column("dir", sa.String(DIR_LEN), nullable=False),
        sa.Column("oid", sa.BigInteger(), nullable=True),
        sa.Column("twap_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(STATUS_LEN), nullable=True),
        sa.Column("trigger", sa.String(SHORT_LEN), nullable=False),
        sa.Column("fill_count", sa.Integer(), nullable=False),
        sa.Column("first_fill_time", sa.BigInteger(), nullable=False),
        sa.Column("last_fill_time", sa.BigInteger(), nullable=False),
        sa.Column("notional_usd", ExactDecimal(), nullable=False),
        sa.Column("position_before", ExactDecimal(), nullable=True),
        sa.Column("position_after", ExactDecimal(), nullable=True),
        sa.Column("full_close", sa.Boolean(), nullable=False),
        sa.Column("liquidation", JsonText(), nullable=True),
        sa.Column("backfilled", sa.Boolean(), nullable=False),
        sa.Column("lateness_ms", sa.BigInteger(), nullable=True),
        sa.Column("label", sa.String(LABEL_LEN), nullable=True),
        sa.Column("detected_at", sa.BigInteger(), nullable=False),
        sa.Column("detected_by", sa.String(INSTANCE_LEN), nullable=True),
        sa.Column("payload", JsonText(), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("published_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_hlm_signals"),
        sa.UniqueConstraint("signal_id", name="uq_hlm_signals_signal_id"),
    )
    op.create_index("ix_hlm_signals_address", "hlm_signals", ["address"])
    op.create_index("ix_hlm_signals_symbol", "hlm_signals", ["symbol"])
    op.create_index("ix_hlm_signals_created_at", "hlm_signals", ["created_at"])
    op.create_index("ix_hlm_signals_published_id", "hlm_signals", ["published", "id"])
    op.create_table(
        "hlm_watermarks",
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("payload", JsonText(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("address", name="pk_hlm_watermarks"),
    )


def downgrade() -> None:
    op.drop_table("hlm_watermarks")
    op.drop_table("hlm_signals")
    op.drop_table("hlm_aggregations")
    op.drop_table("hlm_positions")
    op.drop_table("hlm_addresses")
