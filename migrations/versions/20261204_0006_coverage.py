"""Coverage: nights that fit the rate, planned by risk, with what did not fit recorded.

Revision ID: 20261204_0006
Revises: 20261204_0005
Create Date: 2026-12-04

- `accounts.last_ok_at` / `last_answer_at` / `last_unobservable_at`: when the account was last
  observed ok, last answered at all (ok or unobservable), last found unobservable. The
  nightly planner ranks accounts by them without reading `balance_snapshots`; they are
  filled here from the snapshots an install already has.
- `run_items.tier` (and the last key of `ix_run_items_run_state`, so claims take the riskiest
  pending items first): why a nightly planned the account (0 moved, 1 open case, 2 never seen
  or session renewed, 3 rotation); items left at the deadline, or when the next night
  closed the run, end `done` with outcome `deferred` (no new state: SQLite would have to
  copy the table, and the views that read it, to change a CHECK).
- `runs.capacity` / `deadline_at` / `deferred` / `coverage_verdict` / `coverage`: what the
  night could hold, when it had to stop, how many active accounts it did not observe, and
  the coverage it closed with (JSON).
- `run_items` vacuumed and analyzed every 50,000 changed rows on Postgres (not at 20 % of
  the table): the dead entries of a big night slowed its own claims.
- `run_deferrals`: active accounts a nightly did not observe, counted by reason and tier.
  Accounts that did not fit the capacity get no per-item row (at millions of accounts that
  would be millions of rows a night that nobody reads): who they are is the active
  accounts without an item in that run.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0006"
down_revision: str | None = "20261204_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

_LAST = (
    "(SELECT MAX(s.fetched_at) FROM balance_snapshots s"
    " WHERE s.openid = accounts.openid AND s.zone_id = accounts.zone_id AND {status})"
)
OK = _LAST.format(status="s.status = 'ok'")
ANSWERED = _LAST.format(status="s.status IN ('ok', 'unobservable')")
UNOBSERVABLE = _LAST.format(status="s.status = 'unobservable'")


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite 3.35+): a batch copy would break the views on SQLite.
    op.add_column("accounts", sa.Column("last_ok_at", TS, nullable=True))
    op.add_column("accounts", sa.Column("last_answer_at", TS, nullable=True))
    op.add_column("accounts", sa.Column("last_unobservable_at", TS, nullable=True))
    op.add_column("run_items", sa.Column("tier", sa.SmallInteger(), nullable=True))
    # Claims take pending items by tier: the (run_id, state) index gains it as its last key.
    op.drop_index("ix_run_items_run_state", table_name="run_items")
    op.create_index("ix_run_items_run_state", "run_items", ["run_id", "state", "tier"])
    if op.get_context().dialect.name == "postgresql":
        # Every item is written three times in a night (pending, claimed, done), and claims
        # step over the dead index entries until a vacuum removes them (docs/benchmarks.md
        # §3). At the default 20 % scale factor a table of millions waits for hundreds of
        # thousands of dead rows; a fixed threshold vacuums and analyzes it every 50,000
        # changed rows, without cost pauses. (Only where autovacuum is on, as by default.)
        op.execute(
            "ALTER TABLE run_items SET (autovacuum_vacuum_scale_factor = 0,"
            " autovacuum_vacuum_threshold = 50000, autovacuum_analyze_scale_factor = 0,"
            " autovacuum_analyze_threshold = 50000, autovacuum_vacuum_cost_delay = 0)"
        )
    op.add_column("runs", sa.Column("capacity", sa.Integer(), nullable=True))
    op.add_column("runs", sa.Column("deadline_at", TS, nullable=True))
    op.add_column("runs", sa.Column("deferred", sa.Integer(), server_default="0", nullable=False))
    op.add_column("runs", sa.Column("coverage_verdict", sa.String(16), nullable=True))
    op.add_column("runs", sa.Column("coverage", sa.JSON(), nullable=True))
    op.create_table(
        "run_deferrals",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("tier", sa.SmallInteger(), nullable=False),
        sa.Column("accounts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_deferrals_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "reason", "tier", name=op.f("pk_run_deferrals")),
    )
    # Constants of this file only, no input: the three sub-selects differ in their status.
    op.execute(
        f"UPDATE accounts SET last_ok_at = {OK}, last_answer_at = {ANSWERED},"  # noqa: S608
        f" last_unobservable_at = {UNOBSERVABLE}"
    )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "ALTER TABLE run_items RESET (autovacuum_vacuum_scale_factor,"
            " autovacuum_vacuum_threshold, autovacuum_analyze_scale_factor,"
            " autovacuum_analyze_threshold, autovacuum_vacuum_cost_delay)"
        )
    op.drop_table("run_deferrals")
    for column in ("coverage", "coverage_verdict", "deferred", "deadline_at", "capacity"):
        op.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    op.drop_index("ix_run_items_run_state", table_name="run_items")
    op.create_index("ix_run_items_run_state", "run_items", ["run_id", "state"])
    op.execute("ALTER TABLE run_items DROP COLUMN tier")
    for column in ("last_unobservable_at", "last_answer_at", "last_ok_at"):
        op.execute(f"ALTER TABLE accounts DROP COLUMN {column}")
