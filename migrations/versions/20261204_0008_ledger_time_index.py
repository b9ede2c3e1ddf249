"""The ledger by time: an index on `ledger_entries.occurred_at` for the daily statement.

Revision ID: 20261204_0008
Revises: 20261204_0007
Create Date: 2026-12-04

`report daily` reads the ledger by time twice: the business day's ledger (local midnight to
midnight) and, for the coin statement, the rows between the previous night's fetches and
this night's. With only (openid, zone_id, occurred_at) Postgres read the whole ledger for
both: 30 M rows (1 M accounts x 30 days, bench/reports.py) took 1.0-1.4 s for the day alone.

A plain CREATE INDEX (not CONCURRENTLY: the upgrade runs in one transaction under its
advisory lock, migrations/env.py): it blocks writes to the ledger while it builds,
about a minute for 30 M rows on the benchmark machine (docs/benchmarks.md §5).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261204_0008"
down_revision: str | None = "20261204_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_ledger_entries_occurred_at", "ledger_entries", ["occurred_at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_entries_occurred_at", table_name="ledger_entries")
