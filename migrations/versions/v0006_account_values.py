"""Account-value history: one sample per address at most every `watch.positions.ACCOUNT_VALUE_SAMPLE_S`, read
by the console's address chart and deleted with the position events (`retention.position_events`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hl_monitor.storage.tables import ADDRESS_LEN, ExactDecimal

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "hlm_account_values",
        sa.Column("address", sa.String(ADDRESS_LEN), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("account_value", ExactDecimal(), nullable=False),
        sa.PrimaryKeyConstraint("address", "time", name="pk_hlm_account_values"),
    )
    op.create_index("ix_hlm_account_values_time", "hlm_account_values", ["time"])


def downgrade() -> None:
    op.drop_table("hlm_account_values")
