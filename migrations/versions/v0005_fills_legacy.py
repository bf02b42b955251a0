"""The old service's tables (`hl_address_signal`, `hl_position_cache`, `hl_order_aggregation`), only when asked.

Created when `database.legacy_tables` is on (`hl-monitor db upgrade` passes it, or `--legacy-tables`; plain
Alembic: `-x legacy_tables=true`), and only those missing: a database the old service used keeps its tables and
rows. Without the option nothing changes, so the revision is applied everywhere and the tables are never
required. Turning the option on later: `hl-monitor db upgrade` creates them at head as well. Fills need no
schema: they go through `hlm_publications` (kind `fill`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20
"""

from __future__ import annotations

from alembic import op

from hl_monitor.storage.migrate import create_legacy_tables, legacy_tables_wanted

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if legacy_tables_wanted():
        create_legacy_tables(op.get_bind())


def downgrade() -> None:
    pass  # the old tables may hold the old readers' data (and are never required): drop them by hand if unwanted
