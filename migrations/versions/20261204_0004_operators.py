"""Operators of the console, and the indexes its case and account pages read through.

Revision ID: 20261204_0004
Revises: 20261204_0003
Create Date: 2026-12-04

`operators` holds who may log in to `midas-recon web` (Argon2 hashes, never passwords). The
indexes serve the console: one account's cases in every status (the open-case index covers
only open ones), cases by the day they were first seen, and the cases a run opened.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0004"
down_revision: str | None = "20261204_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(55), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),  # Argon2id, encoded
        sa.Column("disabled_at", TS, nullable=True),
        sa.Column("last_login_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operators")),
        sa.UniqueConstraint("name", name=op.f("uq_operators_name")),
    )
    op.create_index("ix_mismatch_cases_account", "mismatch_cases", ["openid", "zone_id"])
    op.create_index("ix_mismatch_cases_first_seen_at", "mismatch_cases", ["first_seen_at"])
    op.create_index("ix_mismatch_cases_opened_run_id", "mismatch_cases", ["opened_run_id"])


def downgrade() -> None:
    op.drop_index("ix_mismatch_cases_opened_run_id", table_name="mismatch_cases")
    op.drop_index("ix_mismatch_cases_first_seen_at", table_name="mismatch_cases")
    op.drop_index("ix_mismatch_cases_account", table_name="mismatch_cases")
    op.drop_table("operators")
