"""Business calendar: parked suspected cases, signed statement windows, SQLite timestamps.

Revision ID: 20261204_0003
Revises: 20261124_0002
Create Date: 2026-12-04

- `mismatch_cases.parked_at` / `parked_reason`: a suspected case whose confirming re-fetch
  found the account unobservable waits for the next login, with its reason, instead of being
  re-fetched every pass.
- `v_account_movement` (and `v_run_movement` on it) take the ledger between the two fetches
  with a sign: a backfilled previous run fetched after this one gives the window
  (this fetch, previous fetch] subtracted, so the residual stays the change in disagreement.
- SQLite only: a ledger row written directly with an ISO 8601 `T`, or an offset, is stored in
  the canonical UTC form the worker writes ("YYYY-MM-DD HH:MM:SS.ffffff"). SQLite compares
  timestamps as text, so "2026-11-24T10:00:00+08:00" sorted after every fetch of that day
  and the row was missing from Σ save. The instant is kept; only its spelling changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_0003"
down_revision: str | None = "20261124_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)

# The ledger window between the two fetches, whichever came first, and its sign.
V_ACCOUNT_MOVEMENT = """
{create} v_account_movement AS
SELECT r.id AS run_id,
       r.business_date,
       p.id AS previous_run_id,
       c.openid,
       c.zone_id,
       ps.fetched_at AS opening_fetched_at,
       c.fetched_at AS closing_fetched_at,
       ps.balance AS opening_balance,
       c.balance AS closing_balance,
       c.save_sum - ps.save_sum AS midas_save_sum_change,
       c.cost_sum - ps.cost_sum AS midas_cost_sum_change,
       c.present_sum - ps.present_sum AS midas_present_sum_change,
       {sign} * COALESCE(SUM(CASE WHEN l.kind = 'save' THEN l.amount END), 0) AS top_ups,
       {sign} * COALESCE(SUM(CASE WHEN l.kind = 'present' THEN l.amount END), 0) AS gifts,
       {sign} * COALESCE(SUM(CASE WHEN l.kind = 'cost' THEN l.amount END), 0) AS spends,
       {sign} * COALESCE(SUM(CASE WHEN l.kind = 'cancel' THEN l.amount END), 0) AS cancels,
       c.balance - ps.balance - {sign} * COALESCE(SUM(CASE l.kind WHEN 'save' THEN l.amount
                                                      WHEN 'present' THEN l.amount
                                                      WHEN 'cost' THEN -l.amount
                                                      WHEN 'cancel' THEN l.amount END), 0)
         AS residual
FROM runs r
JOIN runs p ON p.kind = 'nightly' AND p.business_date = {previous_date}
JOIN balance_snapshots c ON c.run_id = r.id AND c.status = 'ok'
JOIN balance_snapshots ps
  ON ps.run_id = p.id AND ps.openid = c.openid AND ps.zone_id = c.zone_id AND ps.status = 'ok'
LEFT JOIN ledger_entries l
  ON l.openid = c.openid AND l.zone_id = c.zone_id
 AND {window}
WHERE r.kind = 'nightly'
GROUP BY r.id, r.business_date, p.id, c.id, ps.id, c.openid, c.zone_id,
         ps.fetched_at, c.fetched_at, ps.balance, c.balance, c.save_sum, ps.save_sum,
         c.cost_sum, ps.cost_sum, c.present_sum, ps.present_sum
"""

SIGNED = {
    "sign": "(CASE WHEN c.fetched_at >= ps.fetched_at THEN 1 ELSE -1 END)",
    "window": "l.occurred_at > {least}(ps.fetched_at, c.fetched_at)"
    " AND l.occurred_at <= {greatest}(ps.fetched_at, c.fetched_at)",
}
# What 20261124_0002 had: the window (previous fetch, this fetch], empty when reversed.
UNSIGNED = {
    "sign": "1",
    "window": "l.occurred_at > ps.fetched_at AND l.occurred_at <= c.fetched_at",
}

# SQLite's strftime reads the ISO forms (with T, with an offset) and writes UTC, to the
# millisecond. Only a value not in the worker's own form is rewritten (a 'T', a 'Z' or an
# offset after the date): what the worker writes keeps its microseconds.
SQLITE_CANONICAL = "strftime('%Y-%m-%d %H:%M:%f000', NEW.occurred_at)"
SQLITE_NOT_CANONICAL = (
    "(instr(NEW.occurred_at, 'T') + instr(NEW.occurred_at, 'Z') + instr(NEW.occurred_at, '+')"
    " + instr(substr(NEW.occurred_at, 11), '-')) > 0"
)
SQLITE_REWRITE = (
    "UPDATE ledger_entries SET occurred_at = strftime('%Y-%m-%d %H:%M:%f000', occurred_at)"
    " WHERE (instr(occurred_at, 'T') + instr(occurred_at, 'Z') + instr(occurred_at, '+')"
    " + instr(substr(occurred_at, 11), '-')) > 0"
)
SQLITE_TRIGGER = """
CREATE TRIGGER ledger_entries_canonical_time_{event} AFTER {when} ON ledger_entries
WHEN {not_canonical}
BEGIN
    UPDATE ledger_entries SET occurred_at = {canonical} WHERE id = NEW.id;
END
"""
SQLITE_TRIGGERS = tuple(
    SQLITE_TRIGGER.replace("{event}", event)
    .replace("{when}", when)
    .replace("{not_canonical}", SQLITE_NOT_CANONICAL)
    .replace("{canonical}", SQLITE_CANONICAL)
    for event, when in (("insert", "INSERT"), ("update", "UPDATE OF occurred_at"))
)


def _movement_view(parts: dict[str, str]) -> None:
    """Replace v_account_movement; v_run_movement reads it and keeps its columns."""
    sqlite = op.get_context().dialect.name == "sqlite"
    sql = V_ACCOUNT_MOVEMENT
    for name, value in parts.items():
        sql = sql.replace("{" + name + "}", value)
    sql = sql.replace("{least}", "min" if sqlite else "LEAST")
    sql = sql.replace("{greatest}", "max" if sqlite else "GREATEST")
    sql = sql.replace(
        "{previous_date}", "date(r.business_date, '-1 day')" if sqlite else "r.business_date - 1"
    )
    if sqlite:  # SQLite does not check dependent views; Postgres replaces in place
        op.execute("DROP VIEW IF EXISTS v_account_movement")
        sql = sql.replace("{create}", "CREATE VIEW")
    else:
        sql = sql.replace("{create}", "CREATE OR REPLACE VIEW")
    op.execute(sql)


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite 3.35+ has both): a batch copy of the table would break
    # the views that read it on SQLite.
    op.add_column("mismatch_cases", sa.Column("parked_at", TS, nullable=True))
    op.add_column("mismatch_cases", sa.Column("parked_reason", sa.Text(), nullable=True))
    _movement_view(SIGNED)
    if op.get_context().dialect.name == "sqlite":
        op.execute(SQLITE_REWRITE)
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_canonical_time_insert")
        op.execute("DROP TRIGGER IF EXISTS ledger_entries_canonical_time_update")
    _movement_view(UNSIGNED)
    op.execute("ALTER TABLE mismatch_cases DROP COLUMN parked_reason")
    op.execute("ALTER TABLE mismatch_cases DROP COLUMN parked_at")
