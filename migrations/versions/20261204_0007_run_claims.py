"""Run claims: a row per batch that may hold items, so the pump finds dead batches there.

Revision ID: 20261204_0007
Revises: 20261204_0006
Create Date: 2026-12-04

The pump used to find a run's claims by scanning its claimed items, which steps over a dead
index entry for every item claimed earlier that night until a vacuum removes them: without
autovacuum a night of a million accounts slowed to a quarter of its speed (docs/benchmarks.md
§3). `run_claims` holds one row per batch in flight instead. Claims open at the upgrade are
copied in, one row per claim.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0007"
down_revision: str | None = "20261204_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "run_claims",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("claimed_at", TS, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_claims_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "claimed_at", "account_id", name=op.f("pk_run_claims")),
    )
    op.execute(
        "INSERT INTO run_claims (run_id, claimed_at, account_id)"
        " SELECT run_id, claimed_at, MIN(account_id) FROM run_items"
        " WHERE state = 'claimed' AND claimed_at IS NOT NULL GROUP BY run_id, claimed_at"
    )


def downgrade() -> None:
    op.drop_table("run_claims")
