"""Snapshot months: the latest fetch stored in each month of `balance_snapshots`.

Revision ID: 20261204_0010
Revises: 20261204_0009
Create Date: 2026-12-04

"Is there a newer ok snapshot of this account" cannot be bounded to the run's month (a
backfill of an old date fetches into that month after newer dates), so with monthly
partitions it descended the account index of every month kept, once per snapshot of every
batch: 8 ms a batch with one month of rows, 28 ms with 24 (docs/benchmarks.md §3b).
`snapshot_months` says which months can hold a snapshot fetched after a given time; every
batch that stores snapshots keeps its month's row within an hour of its latest fetch
(worker/db/partitions.py).

The upgrade gives every existing partition a row at the upgrade's time: nothing in them was
fetched later, so they are read until an hour after the upgrade and then only when a batch
stores into them again. No row is needed on SQLite (no partitions): the table is empty there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0010"
down_revision: str | None = "20261204_0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "snapshot_months",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("fetched_until", TS, nullable=False),
        sa.PrimaryKeyConstraint("month", name=op.f("pk_snapshot_months")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # The partitions' bounds, not their rows: no scan of the snapshots.
        op.execute(
            "INSERT INTO snapshot_months (month, fetched_until)"
            " SELECT to_date(substring(c.relname FROM '(\\d{4}_\\d{2})$'), 'YYYY_MM'), now()"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'balance_snapshots'::regclass"
            " AND c.relname ~ '^balance_snapshots_\\d{4}_\\d{2}$'"
        )


def downgrade() -> None:
    op.drop_table("snapshot_months")
