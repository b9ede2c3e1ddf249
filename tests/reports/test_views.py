"""The SQL views of migration 20261124_0002 give the statement's numbers to BI tools."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from tests.reports.conftest import CAL, D, seed
from worker.db.models import MismatchCase
from worker.db.session import session_scope
from worker.db.statement import open_cases_at
from worker.reports.statement import MOVEMENT_FIELDS, Statement, build_statement
from worker.vocabulary import OPEN_CASE_STATUSES

pytestmark = pytest.mark.integration

TOTALS = (
    "accounts",
    "ok",
    "unobservable",
    "error",
    "balance",
    "save_sum",
    "cost_sum",
    "present_sum",
)


def assert_views_agree(session: Session, st: Statement) -> None:
    rows = (
        session.execute(
            text("SELECT * FROM v_daily_run_totals WHERE run_id = :r ORDER BY zone_id"),
            {"r": st.run.id},
        )
        .mappings()
        .all()
    )
    assert [r["zone_id"] for r in rows] == [z.zone_id for z in st.zones]
    for row, zone in zip(rows, st.zones, strict=True):
        assert row["kind"] == "nightly" and row["run_status"] == "complete"
        assert {k: row[k] for k in TOTALS} == {k: getattr(zone, k) for k in TOTALS}

    moves = (
        session.execute(
            text("SELECT * FROM v_run_movement WHERE run_id = :r ORDER BY zone_id"),
            {"r": st.run.id},
        )
        .mappings()
        .all()
    )
    compared = [z for z in st.zones if z.compared]
    assert [m["zone_id"] for m in moves] == [z.zone_id for z in compared]
    for row, zone in zip(moves, compared, strict=True):
        assert st.previous_run is not None and row["previous_run_id"] == st.previous_run.id
        assert {k: row[k] for k in MOVEMENT_FIELDS} == {
            k: getattr(zone, k) for k in MOVEMENT_FIELDS
        }

    per_account = dict(
        session.execute(
            text(
                "SELECT zone_id, SUM(residual) FROM v_account_movement WHERE run_id = :r"
                " GROUP BY zone_id"
            ),
            {"r": st.run.id},
        ).all()
    )
    assert per_account == {z.zone_id: z.residual for z in compared}

    _, end = CAL.day_bounds(st.business_date)
    dialect = session.get_bind().dialect.name
    # The view stores timestamps as the table does; bind the moment the same way.
    at = end.astimezone(dt.UTC)
    bound = at.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect == "sqlite" else at
    open_at_end = dict(
        session.execute(
            text(
                "SELECT zone_id, COUNT(*) FROM v_case_intervals WHERE opened_at < :t"
                " AND (closed_at IS NULL OR closed_at >= :t) GROUP BY zone_id"
            ),
            {"t": bound},
        ).all()
    )
    assert open_at_end == {z.zone_id: z.cases_open_at_end for z in st.zones if z.cases_open_at_end}


def test_views_agree_with_the_statement_on_postgres(seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    with session_scope(url) as session:
        assert_views_agree(session, build_statement(session, D, calendar=CAL))


def test_views_agree_with_the_statement_on_sqlite(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session:
        seed(session)
    with session_scope(sqlite_url) as session:
        st = build_statement(session, D, calendar=CAL)
        assert st.total.residual == 20 and st.total.cases_open_at_end == 4
        assert_views_agree(session, st)


def test_open_mismatches_view_lists_the_open_cases(seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    with session_scope(url) as session:
        got = session.execute(text("SELECT id, status FROM v_open_mismatches ORDER BY id")).all()
        want = session.execute(
            MismatchCase.__table__.select()
            .with_only_columns(MismatchCase.id, MismatchCase.status)
            .where(MismatchCase.status.in_(OPEN_CASE_STATUSES))
            .order_by(MismatchCase.id)
        ).all()
        assert [tuple(r) for r in got] == [tuple(r) for r in want] and len(got) == 4
        # After every seeded event, "open at T" (the events) and the status agree.
        later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        assert sum(c[0] for c in open_cases_at(session, [later]).values()) == len(got)


def test_view_sql_uses_the_models_status_lists() -> None:
    from tests.conftest import ROOT
    from worker.db.statement import CLOSED_CASE_STATUSES

    sql = (ROOT / "migrations" / "versions" / "20261124_0002_report_views.py").read_text()
    assert f"IN {tuple(OPEN_CASE_STATUSES)!r}" in sql
    assert f"IN {tuple(CLOSED_CASE_STATUSES)!r}" in sql


def test_views_come_and_go_with_their_migration(sqlite_url: str) -> None:
    from sqlalchemy import inspect

    from worker.db.migrate import downgrade, upgrade
    from worker.db.session import make_engine

    def views() -> set[str]:
        engine = make_engine(sqlite_url)
        try:
            return set(inspect(engine).get_view_names())
        finally:
            engine.dispose()

    names = {
        "v_daily_run_totals",
        "v_account_movement",
        "v_run_movement",
        "v_open_mismatches",
        "v_case_intervals",
    }
    assert names <= views()
    downgrade(sqlite_url, "20261124_0001")
    assert not names & views()
    upgrade(sqlite_url)
    assert names <= views()
