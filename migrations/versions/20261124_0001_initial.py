"""Initial schema: accounts, ledger, runs and their items, snapshots, mismatch cases, cursors.

Revision ID: 20261124_0001
Revises:
Create Date: 2026-11-24

A frozen copy of worker/db/models.py as of this date: it never imports the models, which will
move on. Constraint names are spelled out exactly as the models' naming convention makes them,
so later migrations (and batch mode on SQLite) can find them by name. The same DDL runs on
Postgres and SQLite: `id` is BIGINT on Postgres and INTEGER on SQLite (only a column declared
exactly INTEGER auto-increments there), `now()` renders as CURRENT_TIMESTAMP on SQLite, and the
partial unique indexes carry a WHERE clause for both dialects.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261124_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)  # UTCDateTime in the models: aware UTC in and out
COINS = sa.BigInteger()

OPEN_CASES = "status IN ('suspected', 'confirmed', 'acknowledged')"


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", ID, nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("zone_id", sa.String(64), server_default="1", nullable=False),
        sa.Column("last_active_at", TS, nullable=True),
        sa.Column("session_key_enc", sa.Text(), nullable=True),  # Fernet token, never clear
        sa.Column("session_key_updated_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("openid", "zone_id", name=op.f("uq_accounts_openid_zone_id")),
    )
    op.create_index("ix_accounts_last_active_at", "accounts", ["last_active_at"])

    op.create_table(
        "ledger_entries",
        sa.Column("id", ID, nullable=False),
        sa.Column("bill_no", sa.String(128), nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("zone_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", COINS, nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("recorded_at", TS, server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "kind IN ('save', 'cost', 'cancel', 'present')", name=op.f("ck_ledger_entries_kind")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_ledger_entries_amount_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("bill_no", name=op.f("uq_ledger_entries_bill_no")),
    )
    op.create_index(
        "ix_ledger_entries_account_time", "ledger_entries", ["openid", "zone_id", "occurred_at"]
    )

    op.create_table(
        "runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("business_date", sa.Date(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), server_default="planning", nullable=False),
        sa.Column("api_version", sa.String(2), nullable=False),
        sa.Column("planned", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ok", sa.Integer(), server_default="0", nullable=False),
        sa.Column("unobservable", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Integer(), server_default="0", nullable=False),
        sa.Column("mismatches_opened", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint("kind IN ('nightly', 'recheck', 'confirm')", name=op.f("ck_runs_kind")),
        sa.CheckConstraint(
            "status IN ('planning', 'running', 'complete', 'incomplete', 'failed')",
            name=op.f("ck_runs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    # One nightly run per business date, even when two beats fire.
    op.create_index(
        "uq_runs_nightly_business_date",
        "runs",
        ["business_date"],
        unique=True,
        postgresql_where=sa.text("kind = 'nightly'"),
        sqlite_where=sa.text("kind = 'nightly'"),
    )

    op.create_table(
        "balance_snapshots",
        sa.Column("id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("zone_id", sa.String(64), nullable=False),
        sa.Column("fetched_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("errcode", sa.Integer(), nullable=True),
        sa.Column("errmsg", sa.Text(), nullable=True),
        sa.Column("balance", COINS, nullable=True),
        sa.Column("gen_balance", COINS, nullable=True),
        sa.Column("save_amt", COINS, nullable=True),
        sa.Column("save_sum", COINS, nullable=True),
        sa.Column("cost_sum", COINS, nullable=True),
        sa.Column("present_sum", COINS, nullable=True),
        sa.Column("first_save", sa.Boolean(), nullable=True),
        sa.Column("api_version", sa.String(2), nullable=False),
        sa.CheckConstraint(
            "status IN ('ok', 'unobservable', 'error')", name=op.f("ck_balance_snapshots_status")
        ),
        # An unanswered question is never a zero: values exist exactly when status is ok.
        sa.CheckConstraint(
            "(status = 'ok' AND balance IS NOT NULL AND gen_balance IS NOT NULL"
            " AND save_amt IS NOT NULL AND save_sum IS NOT NULL AND cost_sum IS NOT NULL"
            " AND present_sum IS NOT NULL AND first_save IS NOT NULL)"
            " OR (status <> 'ok' AND balance IS NULL AND gen_balance IS NULL"
            " AND save_amt IS NULL AND save_sum IS NULL AND cost_sum IS NULL"
            " AND present_sum IS NULL AND first_save IS NULL)",
            name=op.f("ck_balance_snapshots_values_iff_ok"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_balance_snapshots_run_id_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_balance_snapshots")),
        sa.UniqueConstraint(
            "run_id", "openid", "zone_id", name=op.f("uq_balance_snapshots_run_id_openid_zone_id")
        ),
    )
    op.create_index(
        "ix_balance_snapshots_account_time",
        "balance_snapshots",
        ["openid", "zone_id", "fetched_at"],
    )

    op.create_table(
        "mismatch_cases",
        sa.Column("id", ID, nullable=False),
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("zone_id", sa.String(64), nullable=False),
        sa.Column("check", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("midas_value", COINS, nullable=False),
        sa.Column("ledger_value", COINS, nullable=False),
        sa.Column("delta", COINS, nullable=False),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.Column("opened_run_id", ID, nullable=True),
        sa.Column("confirm_due_at", TS, nullable=True),
        sa.CheckConstraint(
            "status IN ('suspected', 'confirmed', 'cleared', 'resolved', 'acknowledged')",
            name=op.f("ck_mismatch_cases_status"),
        ),
        sa.ForeignKeyConstraint(
            ["opened_run_id"], ["runs.id"], name=op.f("fk_mismatch_cases_opened_run_id_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mismatch_cases")),
    )
    op.create_index("ix_mismatch_cases_status_due", "mismatch_cases", ["status", "confirm_due_at"])
    # One open case per account and check; closed ones stay as history.
    op.create_index(
        "uq_mismatch_cases_open",
        "mismatch_cases",
        ["openid", "zone_id", "check"],
        unique=True,
        postgresql_where=sa.text(OPEN_CASES),
        sqlite_where=sa.text(OPEN_CASES),
    )

    op.create_table(
        "run_items",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("account_id", ID, nullable=False),
        sa.Column("state", sa.String(16), server_default="pending", nullable=False),
        sa.Column("claimed_at", TS, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "state IN ('pending', 'claimed', 'done')", name=op.f("ck_run_items_state")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_run_items_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_items_run_id_runs")),
        sa.PrimaryKeyConstraint("run_id", "account_id", name=op.f("pk_run_items")),
    )
    op.create_index("ix_run_items_run_state", "run_items", ["run_id", "state"])

    op.create_table(
        "mismatch_events",
        sa.Column("id", ID, nullable=False),
        sa.Column("case_id", ID, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("midas_value", COINS, nullable=True),
        sa.Column("ledger_value", COINS, nullable=True),
        sa.Column("snapshot_id", ID, nullable=True),
        sa.Column("run_id", ID, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["mismatch_cases.id"],
            name=op.f("fk_mismatch_events_case_id_mismatch_cases"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_mismatch_events_run_id_runs")
        ),
        sa.ForeignKeyConstraint(
            ["snapshot_id"],
            ["balance_snapshots.id"],
            name=op.f("fk_mismatch_events_snapshot_id_balance_snapshots"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mismatch_events")),
    )
    op.create_index("ix_mismatch_events_case_id", "mismatch_events", ["case_id"])

    op.create_table(
        "cursors",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_cursors")),
    )


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes with it.
    for table in (
        "cursors",
        "mismatch_events",
        "run_items",
        "mismatch_cases",
        "balance_snapshots",
        "runs",
        "ledger_entries",
        "accounts",
    ):
        op.drop_table(table)
