"""Night figures: a closed nightly run's statement figures per zone, stored when it closes.

Revision ID: 20261204_0011
Revises: 20261204_0010
Create Date: 2026-12-04

`night_figures` holds, per nightly run and zone, the coverage, the Midas totals and the
movement against the previous date's nightly run that `report daily` would otherwise
aggregate from a million snapshots a night (docs/benchmarks.md §5b), with what they were
computed from (worker/db/night_figures.py). The run's close writes them; for runs closed
before this revision `midas-recon report refresh` stores them (until then the statement
computes them as before: the figures are the same either way).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0011"
down_revision: str | None = "20261204_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
COINS = sa.BigInteger()
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "night_figures",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("zone_id", sa.String(64), nullable=False),
        sa.Column("accounts", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Integer(), nullable=False),
        sa.Column("unobservable", sa.Integer(), nullable=False),
        sa.Column("error", sa.Integer(), nullable=False),
        *(sa.Column(c, COINS) for c in ("balance", "save_sum", "cost_sum", "present_sum")),
        sa.Column("previous_run_id", ID),
        sa.Column("compared", sa.Integer()),
        *(
            sa.Column(c, COINS)
            for c in (
                "opening_balance",
                "closing_balance",
                "midas_save_sum_change",
                "midas_cost_sum_change",
                "midas_present_sum_change",
                "top_ups",
                "gifts",
                "spends",
                "cancels",
            )
        ),
        sa.Column("first_fetch_at", TS),
        sa.Column("last_fetch_at", TS),
        sa.Column("ledger_watermark", sa.BigInteger()),
        sa.Column("run_state", sa.String(120), nullable=False),
        sa.Column("previous_state", sa.String(120)),
        sa.Column("computed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "zone_id", name=op.f("pk_night_figures")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_night_figures_run_id_runs")),
        sa.ForeignKeyConstraint(
            ["previous_run_id"],
            ["runs.id"],
            name=op.f("fk_night_figures_previous_run_id_runs"),
        ),
    )


def downgrade() -> None:
    op.drop_table("night_figures")
