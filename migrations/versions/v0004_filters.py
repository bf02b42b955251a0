"""Filters: per-address notional floor and symbol lists, suppressed signals, positions whose open went out.

Existing addresses get no filter (floor 0, no lists); existing signals are not suppressed. The holdings table
starts empty: positions opened before this revision are not protected from a filter until their next open.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hl_monitor.storage.tables import ADDRESS_LEN, COIN_LEN, REASON_LEN, SIGNAL_ID_LEN, ExactDecimal

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("hlm_addresses") as batch:
        batch.add_column(sa.Column("min_notional_usd", ExactDecimal(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("allow_symbols", sa.Text(), nullable=True))
        batch.add_column(sa.Column("deny_symbols", sa.Text(), nullable=True))
    with op.batch_alter_table("hlm_signals") as batch:
        batch.add_column(sa.Column("suppressed", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("suppressed_reason", sa.String(REASON_LEN), nullable=True))
    op.create_table(
        "hlm_signal_holdings",
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("coin", sa.String(COIN_LEN), nullable=False),
        sa.Column("signal_id", sa.String(SIGNAL_ID_LEN), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("address", "coin", name="pk_hlm_signal_holdings"),
    )


def downgrade() -> None:
    op.drop_table("hlm_signal_holdings")
    with op.batch_alter_table("hlm_signals") as batch:
        batch.drop_column("suppressed_reason")
        batch.drop_column("suppressed")
    with op.batch_alter_table("hlm_addresses") as batch:
        batch.drop_column("deny_symbols")
        batch.drop_column("allow_symbols")
        batch.drop_column("min_notional_usd")
