"""Instance leases: one row per instance identity, so two hosts sharing the database never run as one instance.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hl_monitor.storage.tables import INSTANCE_LEN, LEASE_KEY_LEN, LEASE_TOKEN_LEN

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "hlm_instance_leases",
        sa.Column("instance_id", sa.String(LEASE_KEY_LEN), nullable=False),
        sa.Column("holder", sa.String(INSTANCE_LEN), nullable=False),
        sa.Column("token", sa.String(LEASE_TOKEN_LEN), nullable=False),
        sa.Column("acquired_at", sa.BigInteger(), nullable=False),
        sa.Column("renewed_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("instance_id", name="pk_hlm_instance_leases"),
    )


def downgrade() -> None:
    op.drop_table("hlm_instance_leases")
