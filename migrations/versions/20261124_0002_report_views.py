"""Report views: the daily coin statement's numbers for BI tools (docs/finance.md).

Revision ID: 20261124_0002
Revises: 20261124_0001
Create Date: 2026-11-24

Views only, no tables: `alembic check` ignores them and nothing is stored twice. The SQL is
the same on Postgres and SQLite except for date arithmetic. They compute exactly what
`worker.reports.statement` computes (tests/reports/test_views.py holds them to it). Business-day
figures (the ledger of a local day, cases per day) depend on RECON_TIMEZONE and are left to the
statement and to the SQL examples in docs/finance.md, so that no view hard-codes a time zone.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "20261124_0002"
down_revision: str | None = "20261124_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Per run and zone: coverage and Midas totals over the accounts observed ok.
V_DAILY_RUN_TOTALS = """
CREATE VIEW v_daily_run_totals AS
SELECT r.id AS run_id,
       r.business_date,
       r.kind,
       r.status AS run_status,
       s.zone_id,
       COUNT(*) AS accounts,
       SUM(CASE WHEN s.status = 'ok' THEN 1 ELSE 0 END) AS ok,
       SUM(CASE WHEN s.status = 'unobservable' THEN 1 ELSE 0 END) AS unobservable,
       SUM(CASE WHEN s.status = 'error' THEN 1 ELSE 0 END) AS error,
       SUM(s.balance) AS balance,
       SUM(s.save_sum) AS save_sum,
       SUM(s.cost_sum) AS cost_sum,
       SUM(s.present_sum) AS present_sum
FROM runs r
JOIN balance_snapshots s ON s.run_id = r.id
GROUP BY r.id, r.business_date, r.kind, r.status, s.zone_id
"""

# Per nightly run and account observed ok in it and in the previous date's nightly run: the
# account's movement, and the ledger between the two fetches (occurred_at in (t0, t1], the same
# window rule as the reconciliation checks). residual = closing - (opening + ledger movement):
# the accounts behind a statement's residual are the rows where it is not 0.
V_ACCOUNT_MOVEMENT = """
CREATE VIEW v_account_movement AS
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
       COALESCE(SUM(CASE WHEN l.kind = 'save' THEN l.amount END), 0) AS top_ups,
       COALESCE(SUM(CASE WHEN l.kind = 'present' THEN l.amount END), 0) AS gifts,
       COALESCE(SUM(CASE WHEN l.kind = 'cost' THEN l.amount END), 0) AS spends,
       COALESCE(SUM(CASE WHEN l.kind = 'cancel' THEN l.amount END), 0) AS cancels,
       c.balance - ps.balance - COALESCE(SUM(CASE l.kind WHEN 'save' THEN l.amount
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
 AND l.occurred_at > ps.fetched_at AND l.occurred_at <= c.fetched_at
WHERE r.kind = 'nightly'
GROUP BY r.id, r.business_date, p.id, c.id, ps.id, c.openid, c.zone_id,
         ps.fetched_at, c.fetched_at, ps.balance, c.balance, c.save_sum, ps.save_sum,
         c.cost_sum, ps.cost_sum, c.present_sum, ps.present_sum
"""

# Per nightly run and zone: the coin statement. residual = closing - expected closing.
V_RUN_MOVEMENT = """
CREATE VIEW v_run_movement AS
SELECT run_id,
       business_date,
       previous_run_id,
       zone_id,
       compared,
       opening_balance,
       top_ups,
       gifts,
       spends,
       cancels,
       opening_balance + top_ups + gifts - spends + cancels AS expected_closing,
       closing_balance,
       closing_balance - (opening_balance + top_ups + gifts - spends + cancels) AS residual,
       midas_save_sum_change,
       midas_cost_sum_change,
       midas_present_sum_change,
       midas_save_sum_change - top_ups AS unexplained_save_sum,
       midas_cost_sum_change - (spends - cancels) AS unexplained_cost_sum,
       midas_present_sum_change - gifts AS unexplained_present_sum
FROM (
    SELECT run_id, business_date, previous_run_id, zone_id,
           COUNT(*) AS compared,
           SUM(opening_balance) AS opening_balance,
           SUM(closing_balance) AS closing_balance,
           SUM(midas_save_sum_change) AS midas_save_sum_change,
           SUM(midas_cost_sum_change) AS midas_cost_sum_change,
           SUM(midas_present_sum_change) AS midas_present_sum_change,
           SUM(top_ups) AS top_ups,
           SUM(gifts) AS gifts,
           SUM(spends) AS spends,
           SUM(cancels) AS cancels
    FROM v_account_movement
    GROUP BY run_id, business_date, previous_run_id, zone_id
) m
"""

# The cases open now (what `midas-recon mismatches` lists by default).
V_OPEN_MISMATCHES = """
CREATE VIEW v_open_mismatches AS
SELECT id, openid, zone_id, "check", status, midas_value, ledger_value, delta,
       first_seen_at, last_seen_at, opened_run_id, confirm_due_at
FROM mismatch_cases
WHERE status IN ('suspected', 'confirmed', 'acknowledged')
"""

# When each case was opened and closed, from its events: a case is open at time T when
# opened_at < T and (closed_at IS NULL OR closed_at >= T). cleared and resolved are final.
V_CASE_INTERVALS = """
CREATE VIEW v_case_intervals AS
SELECT c.id AS case_id,
       c.openid,
       c.zone_id,
       c."check",
       c.status,
       MIN(e.at) AS opened_at,
       MIN(CASE WHEN e.to_status IN ('cleared', 'resolved') THEN e.at END) AS closed_at
FROM mismatch_cases c
JOIN mismatch_events e ON e.case_id = c.id
GROUP BY c.id, c.openid, c.zone_id, c."check", c.status
"""

VIEWS = (
    ("v_daily_run_totals", V_DAILY_RUN_TOTALS),
    ("v_account_movement", V_ACCOUNT_MOVEMENT),
    ("v_run_movement", V_RUN_MOVEMENT),
    ("v_open_mismatches", V_OPEN_MISMATCHES),
    ("v_case_intervals", V_CASE_INTERVALS),
)


def _previous_date() -> str:
    # SQLite keeps dates as ISO text and has no date - integer.
    if op.get_context().dialect.name == "sqlite":
        return "date(r.business_date, '-1 day')"
    return "r.business_date - 1"


def upgrade() -> None:
    for _name, sql in VIEWS:
        op.execute(sql.replace("{previous_date}", _previous_date()))


def downgrade() -> None:
    for name, _sql in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
