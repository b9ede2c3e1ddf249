"""Ledger totals per account up to a moment: one set-based query, read from the index."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.orm import Session

from tests.recon.conftest import T0
from worker.db.ledger_totals import AccountAt, _sums_query, ledger_sums
from worker.db.models import LedgerEntry
from worker.db.session import engine_for

pytestmark = pytest.mark.integration

SECOND = dt.timedelta(seconds=1)


@pytest.fixture(params=["postgresql", "sqlite"])
def session(request: pytest.FixtureRequest) -> Session:
    url: str = request.getfixturevalue("db_url" if request.param == "postgresql" else "sqlite_url")
    s = Session(engine_for(url))
    request.addfinalizer(s.close)
    return s


def add(session: Session, rows: list[tuple[str, str, str, int, dt.datetime]]) -> None:
    session.execute(
        insert(LedgerEntry),
        [
            {
                "bill_no": f"B{i}",
                "openid": o,
                "zone_id": z,
                "kind": k,
                "amount": a,
                "occurred_at": t,
            }
            for i, (o, z, k, a, t) in enumerate(rows)
        ],
    )


def test_sums_per_kind_up_to_fetched_at_inclusive(session: Session) -> None:
    shanghai = dt.timezone(dt.timedelta(hours=8))
    add(
        session,
        [
            ("o1", "1", "save", 600, T0 - SECOND),
            ("o1", "1", "save", 60, T0),  # at fetched_at exactly: counted
            ("o1", "1", "cost", 100, T0.astimezone(shanghai)),  # same instant, other offset
            ("o1", "1", "cancel", 30, T0 - SECOND),
            ("o1", "1", "present", 7, T0 + SECOND),  # after the fetch: not yet in Midas
            ("o1", "2", "save", 5000, T0 - SECOND),  # another zone, another account
            ("o2", "1", "present", 9, T0 - SECOND),
        ],
    )
    o1, o1_later, o1z2 = AccountAt("o1", "1", T0), AccountAt("o1", "1", T0 + SECOND), None
    o1z2 = AccountAt("o1", "2", T0)
    nobody = AccountAt("nobody", "1", T0)
    sums = ledger_sums(session, [o1, o1_later, o1z2, nobody, o1])
    assert sums == {
        o1: {"save": 660, "cost": 100, "cancel": 30, "present": 0},
        o1_later: {"save": 660, "cost": 100, "cancel": 30, "present": 7},
        o1z2: {"save": 5000, "cost": 0, "cancel": 0, "present": 0},
        # No ledger rows is a real zero: the game's own books say nothing moved.
        nobody: {"save": 0, "cost": 0, "cancel": 0, "present": 0},
    }
    assert all(type(v) is int for kinds in sums.values() for v in kinds.values())


def test_one_query_per_batch(session: Session) -> None:
    add(session, [(f"o{i}", "1", "save", i + 1, T0) for i in range(50)])
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", count)
    try:
        sums = ledger_sums(session, [AccountAt(f"o{i}", "1", T0) for i in range(50)])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 1
    assert [sums[AccountAt(f"o{i}", "1", T0)]["save"] for i in range(50)] == list(range(1, 51))


def test_postgres_reads_the_account_time_index(db_url: str) -> None:
    """With a ledger far larger than the batch, the plan probes the index per account."""
    engine = engine_for(db_url)
    with engine.begin() as conn:
        # 200,000 rows for 20,000 accounts, generated server-side to keep the test quick. A
        # ledger this size is still small: real ones only make the index more attractive.
        conn.execute(
            text(
                "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)"
                " SELECT 'P' || g, 'o' || (g % 20000), '1',"
                " (ARRAY['save','cost','cancel','present'])[1 + g % 4], 1 + g % 97,"
                " :t0 - (g * interval '1 minute') FROM generate_series(1, 200000) g"
            ),
            {"t0": T0},
        )
        conn.execute(text("ANALYZE ledger_entries"))
    keys = [AccountAt(f"o{i}", "1", T0 - dt.timedelta(days=3)) for i in range(0, 20000, 200)]
    query = _sums_query(keys)
    compiled = query.compile(engine)
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars().all()
    plan_text = "\n".join(plan)
    print(plan_text)  # shown with -s: the plan the report quotes
    assert "ix_ledger_entries_account_time" in plan_text, plan_text
    assert "Seq Scan on ledger_entries" not in plan_text, plan_text


def test_sqlite_reads_the_account_time_index(sqlite_url: str) -> None:
    engine = engine_for(sqlite_url)
    compiled = _sums_query([AccountAt("o1", "1", T0), AccountAt("o2", "1", T0)]).compile(engine)
    params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    with engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)]
    assert any(
        step.startswith("SEARCH ledger_entries USING INDEX ix_ledger_entries_account_time")
        for step in plan
    ), plan
