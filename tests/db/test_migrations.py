"""The migrations build exactly the schema the models declare, on Postgres and on SQLite."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from worker.db import migrate
from worker.db import runs as repo
from worker.db.models import Account, Base, MismatchCase, Run
from worker.db.partitions import month_of_partition
from worker.db.session import make_engine, session_scope

pytestmark = pytest.mark.integration

TABLES = {t.name for t in Base.metadata.sorted_tables}


def tables(url: str) -> set[str]:
    """The tables, without the month partitions of balance_snapshots (data, not schema)."""
    engine = make_engine(url)
    try:
        found = set(inspect(engine).get_table_names()) - {"alembic_version"}
        return {name for name in found if month_of_partition(name) is None}
    finally:
        engine.dispose()


def test_models_and_migrations_agree_on_postgres(pg_url: str) -> None:
    migrate.check(pg_url)
    assert migrate.current(pg_url) == migrate.head()


def test_models_and_migrations_agree_on_sqlite(sqlite_url: str) -> None:
    migrate.check(sqlite_url)
    assert migrate.current(sqlite_url) == migrate.head()


def test_check_notices_a_difference(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'drift.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_ledger_entries_account_time"))
    engine.dispose()
    with pytest.raises(migrate.SchemaMismatch, match="add_index ix_ledger_entries_account_time"):
        migrate.check(url)


def test_check_refuses_a_database_behind_head(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate.upgrade(url, "20261124_0001")
    with pytest.raises(migrate.SchemaMismatch, match="not up to date"):
        migrate.check(url)


def test_upgrade_downgrade_upgrade_on_postgres(scratch_pg_url: str) -> None:
    url = scratch_pg_url
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.downgrade(url, "base")
    assert tables(url) == set()
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.check(url)
    migrate.upgrade(url)  # at head already: a no-op
    assert migrate.current(url) == migrate.head()


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.downgrade(url, "base")
    assert tables(url) == set()
    migrate.upgrade(url)
    assert tables(url) == TABLES
    migrate.check(url)


# -- the DDL itself, beyond what `alembic check` compares (check constraints, partial indexes)


def _sqlite_ddl(engine: Engine) -> dict[str, list[str]]:
    """Each table's and index's CREATE statement as a sorted list of its clauses."""
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index')"
                " AND sql IS NOT NULL AND name <> 'alembic_version'"
            )
        ).all()
    return {name: sorted(_clauses(sql)) for name, sql in found}


def _clauses(sql: str) -> list[str]:
    """A CREATE statement's clauses, split at the commas outside parentheses: SQLite's ADD
    COLUMN appends a column to the stored text on the last line, not on a line of its own."""
    head, _, body = sql.partition("(")
    head = head.replace('"', "")  # a table rebuilt by Alembic's batch mode has a quoted name
    body = body.rstrip().removesuffix(")")
    parts, depth, current = [head.strip()], 0, ""
    for char in body:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(" ".join(current.split()))
            current = ""
        else:
            current += char
    parts.append(" ".join(current.split()))
    return [p for p in parts if p]


def test_sqlite_ddl_is_what_the_models_declare(sqlite_url: str, tmp_path: Path) -> None:
    declared = create_engine(f"sqlite:///{tmp_path / 'declared.db'}")
    Base.metadata.create_all(declared)
    migrated = make_engine(sqlite_url)
    try:
        assert _sqlite_ddl(migrated) == _sqlite_ddl(declared)
    finally:
        declared.dispose()
        migrated.dispose()


_PG_CATALOG = {
    "columns": """
        SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,
               column_default
        FROM information_schema.columns
        JOIN information_schema.tables USING (table_schema, table_name)
        WHERE table_schema = 'public' AND table_type = 'BASE TABLE'""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'alembic_version'""",
}


def _pg_catalog(url: str) -> dict[str, set[tuple[object, ...]]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            out = {}
            for what, sql in _PG_CATALOG.items():
                rows = conn.execute(text(sql)).all()
                # The views of later migrations are not models; alembic_version is Alembic's;
                # the month partitions are made at run time (worker/db/partitions.py).
                out[what] = {
                    tuple(row)
                    for row in rows
                    if "alembic_version" not in str(row) and month_of_partition(row[0]) is None
                }
            return out
    finally:
        engine.dispose()


def test_postgres_ddl_is_what_the_models_declare(pg_url: str, scratch_pg_url: str) -> None:
    declared = make_engine(scratch_pg_url)
    Base.metadata.create_all(declared)
    declared.dispose()
    assert _pg_catalog(pg_url) == _pg_catalog(scratch_pg_url)


# -- the partial unique indexes behave the same on both dialects


def test_one_nightly_run_per_date_and_one_open_case_per_check(any_db_url: str) -> None:
    day = dt.date(2026, 11, 24)
    now = dt.datetime(2026, 11, 24, 2, 30, tzinfo=dt.UTC)

    def run(kind: str) -> Run:
        return Run(business_date=day, kind=kind, trigger="test", api_version="v1")

    with session_scope(any_db_url) as session:
        session.add_all([run("nightly"), run("recheck"), run("recheck")])
    with pytest.raises(IntegrityError), session_scope(any_db_url) as session:
        session.add(run("nightly"))

    def case(status: str) -> MismatchCase:
        return MismatchCase(
            openid="o1",
            zone_id="1",
            check="balance",
            status=status,
            midas_value=1,
            ledger_value=0,
            delta=1,
            first_seen_at=now,
            last_seen_at=now,
        )

    with session_scope(any_db_url) as session:
        session.add_all([case("cleared"), case("resolved"), case("resolved"), case("suspected")])
    with pytest.raises(IntegrityError), session_scope(any_db_url) as session:
        session.add(case("confirmed"))


@pytest.mark.parametrize(
    ("sql", "constraint"),
    [
        (
            "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)"
            " VALUES ('B1', 'o1', '1', 'refund', 5, CURRENT_TIMESTAMP)",
            "ck_ledger_entries_kind",
        ),
        (
            "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)"
            " VALUES ('B1', 'o1', '1', 'save', 0, CURRENT_TIMESTAMP)",
            "ck_ledger_entries_amount_positive",
        ),
    ],
)
def test_the_ledger_table_refuses_what_is_never_right(
    any_db_url: str, sql: str, constraint: str
) -> None:
    # The game may write this table directly: the database itself holds the line.
    engine = make_engine(any_db_url)
    try:
        with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
            conn.execute(text(sql))
        assert re.search(constraint, str(caught.value)) or engine.dialect.name == "sqlite"
    finally:
        engine.dispose()


def test_two_upgrades_at_once_both_succeed_on_postgres(scratch_pg_url: str) -> None:
    # Every container may run `db upgrade` on start; the advisory lock in env.py serialises
    # them, so the second finds the schema built instead of failing on CREATE TABLE.
    # Processes, not threads: Alembic's `op` and `context` are process-wide.
    code = "import sys; from worker.db.migrate import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, scratch_pg_url], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert migrate.current(scratch_pg_url) == migrate.head()
    migrate.check(scratch_pg_url)


COVERAGE_SEED = [
    "INSERT INTO accounts (id, openid, zone_id, created_at, updated_at) VALUES"
    " (1, 'seen', '1', '2026-11-01 00:00:00+00', '2026-11-01 00:00:00+00'),"
    " (2, 'expired', '1', '2026-11-01 00:00:00+00', '2026-11-01 00:00:00+00'),"
    " (3, 'new', '1', '2026-11-01 00:00:00+00', '2026-11-01 00:00:00+00')",
    "INSERT INTO runs (id, business_date, kind, trigger, status, api_version, created_at)"
    " VALUES (1, '2026-11-01', 'nightly', 'beat', 'complete', 'v1', '2026-11-01 00:00:00+00'),"
    " (2, '2026-11-02', 'nightly', 'beat', 'complete', 'v1', '2026-11-02 00:00:00+00')",
    "INSERT INTO run_items (run_id, account_id, state, outcome) VALUES"
    " (1, 1, 'done', 'ok'), (1, 2, 'done', 'ok'), (2, 1, 'done', 'ok'),"
    " (2, 2, 'done', 'unobservable')",
    "INSERT INTO balance_snapshots (run_id, openid, zone_id, fetched_at, status, balance,"
    " gen_balance, save_amt, save_sum, cost_sum, present_sum, first_save, api_version) VALUES"
    " (1, 'seen', '1', '2026-11-01 02:30:00+00', 'ok', 1, 0, 1, 1, 0, 0, true, 'v1'),"
    " (1, 'expired', '1', '2026-11-01 02:31:00+00', 'ok', 1, 0, 1, 1, 0, 0, true, 'v1'),"
    " (2, 'seen', '1', '2026-11-02 02:30:00+00', 'ok', 2, 0, 2, 2, 0, 0, true, 'v1')",
    "INSERT INTO balance_snapshots (run_id, openid, zone_id, fetched_at, status, api_version,"
    " errcode) VALUES (2, 'expired', '1', '2026-11-02 02:31:00+00', 'unobservable', 'v1', 90016)",
]


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_coverage_migration_fills_the_last_observations_and_keeps_every_row(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        str(request.getfixturevalue("scratch_pg_url"))
        if dialect == "postgres"
        else f"sqlite:///{tmp_path / 'coverage.db'}"
    )
    migrate.upgrade(url, "20261204_0005")
    engine = make_engine(url)
    counts = "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM run_items),"
    counts += " (SELECT COUNT(*) FROM balance_snapshots), (SELECT COUNT(*) FROM runs)"
    try:
        with engine.begin() as conn:
            for sql in COVERAGE_SEED:
                conn.execute(text(sql.replace("true", "1") if dialect == "sqlite" else sql))
            before = conn.execute(text(counts)).one()
        migrate.upgrade(url, "20261204_0006")
        with session_scope(url) as session:
            rows = {
                a.openid: (a.last_ok_at, a.last_answer_at, a.last_unobservable_at)
                for a in session.execute(select(Account)).scalars()
            }
        day = dt.datetime(2026, 11, 2, 2, 30, tzinfo=dt.UTC)
        assert rows == {
            "seen": (day, day, None),
            "expired": (
                day - dt.timedelta(days=1) + dt.timedelta(minutes=1),
                day + dt.timedelta(minutes=1),
                day + dt.timedelta(minutes=1),
            ),
            "new": (None, None, None),
        }
        with engine.connect() as conn:
            assert conn.execute(text(counts)).one() == before
            assert conn.execute(text("SELECT COUNT(*) FROM runs WHERE deferred = 0")).scalar() == 2
            if dialect == "postgres":
                assert "autovacuum_vacuum_threshold=50000" in _run_items_options(conn)
        migrate.downgrade(url, "20261204_0005")
        with engine.connect() as conn:
            assert conn.execute(text(counts)).one() == before
            if dialect == "postgres":
                assert _run_items_options(conn) == []
        migrate.upgrade(url)
        migrate.check(url)
    finally:
        engine.dispose()


def _run_items_options(conn: Any) -> list[str]:
    options = "SELECT reloptions FROM pg_class WHERE relname = 'run_items'"
    return list(conn.execute(text(options)).scalar() or [])


CLAIMS_SEED = [
    "INSERT INTO accounts (id, openid, zone_id, created_at, updated_at) VALUES"
    + ", ".join(
        f" ({i}, 'o{i}', '1', '2026-11-01 00:00:00+00', '2026-11-01 00:00:00+00')"
        for i in range(1, 7)
    ),
    "INSERT INTO runs (id, business_date, kind, trigger, status, api_version, created_at)"
    " VALUES (1, '2026-11-01', 'nightly', 'beat', 'running', 'v1', '2026-11-01 00:00:00+00')",
    # Two batches in flight (claims A and B), one done item of claim A, one pending item.
    "INSERT INTO run_items (run_id, account_id, state, claimed_at, outcome) VALUES"
    " (1, 1, 'done', '2026-11-01 02:30:00+00', 'ok'),"
    " (1, 2, 'claimed', '2026-11-01 02:30:00+00', NULL),"
    " (1, 3, 'claimed', '2026-11-01 02:30:00+00', NULL),"
    " (1, 4, 'claimed', '2026-11-01 02:31:00+00', NULL),"
    " (1, 5, 'pending', NULL, NULL), (1, 6, 'done', NULL, 'deferred')",
]


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_the_claims_in_flight_at_the_upgrade_are_copied_into_run_claims(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        str(request.getfixturevalue("scratch_pg_url"))
        if dialect == "postgres"
        else f"sqlite:///{tmp_path / 'claims.db'}"
    )
    migrate.upgrade(url, "20261204_0006")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for sql in CLAIMS_SEED:
                conn.execute(text(sql))
        migrate.upgrade(url, "20261204_0007")
        with session_scope(url) as session:
            # Read back by the code that reads them, so that the pump would see them.
            claims = repo.claims_before(session, 1, dt.datetime(2026, 11, 2, tzinfo=dt.UTC))
            rows = session.execute(text("SELECT account_id FROM run_claims ORDER BY 1")).all()
        assert sorted(claims) == [
            dt.datetime(2026, 11, 1, 2, 30, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 1, 2, 31, tzinfo=dt.UTC),
        ]
        assert [a for (a,) in rows] == [2, 4]  # each claim's lowest item still claimed
        migrate.downgrade(url, "20261204_0006")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM run_items")).scalar() == 6
        migrate.upgrade(url)
        migrate.check(url)
    finally:
        engine.dispose()


# -- 20261204_0009: balance_snapshots partitioned by month on Postgres

PARTITION_SEED = [
    "INSERT INTO runs (id, business_date, kind, trigger, status, api_version, created_at)"
    " VALUES (1, '2026-09-30', 'nightly', 'beat', 'complete', 'v1', '2026-09-30 18:30:00+00'),"
    " (2, '2026-10-01', 'nightly', 'beat', 'complete', 'v1', '2026-10-01 18:30:00+00'),"
    " (3, '2026-10-01', 'recheck', 'payment', 'complete', 'v1', '2026-10-01 20:00:00+00'),"
    " (4, '2026-11-30', 'nightly', 'beat', 'complete', 'v1', '2026-11-30 18:30:00+00')",
    "INSERT INTO balance_snapshots (id, run_id, openid, zone_id, fetched_at, status, balance,"
    " gen_balance, save_amt, save_sum, cost_sum, present_sum, first_save, api_version) VALUES"
    " (1, 1, 'a', '1', '2026-09-30 18:30:00+00', 'ok', 5, 0, 5, 5, 0, 0, true, 'v1'),"
    " (2, 1, 'b', '1', '2026-09-30 18:31:00+00', 'ok', 7, 1, 6, 6, 0, 1, false, 'v1'),"
    " (3, 2, 'a', '1', '2026-10-01 18:30:00+00', 'ok', 9, 0, 9, 9, 0, 0, true, 'v1'),"
    " (5, 3, 'a', '1', '2026-10-01 20:00:00+00', 'ok', 8, 0, 9, 9, 1, 0, true, 'v1'),"
    " (8, 4, 'a', '1', '2026-11-30 18:30:00+00', 'ok', 8, 0, 9, 9, 1, 0, true, 'v1')",
    "INSERT INTO balance_snapshots (id, run_id, openid, zone_id, fetched_at, status, api_version,"
    " errcode, errmsg) VALUES (4, 2, 'b', '1', '2026-10-01 18:31:00+00', 'unobservable', 'v1',"
    " 90016, 'session expired'), (9, 4, 'b', '1', '2026-11-30 18:31:00+00', 'error', 'v1',"
    " NULL, 'timeout')",
    'INSERT INTO mismatch_cases (id, openid, zone_id, "check", status, midas_value,'
    " ledger_value, delta, first_seen_at, last_seen_at, opened_run_id) VALUES"
    " (1, 'a', '1', 'balance', 'confirmed', 9, 8, 1, '2026-10-01 18:30:00+00',"
    " '2026-10-01 20:00:00+00', 2)",
    "INSERT INTO mismatch_events (id, case_id, at, actor, from_status, to_status, midas_value,"
    " ledger_value, snapshot_id, run_id) VALUES"
    " (1, 1, '2026-10-01 18:30:00+00', 'system', NULL, 'suspected', 9, 8, 3, 2),"
    " (2, 1, '2026-10-01 20:00:00+00', 'system', 'suspected', 'confirmed', 8, 7, 5, 3)",
]
SNAPSHOT_COLUMNS = (
    "id, run_id, openid, zone_id, fetched_at, status, errcode, errmsg, balance, gen_balance,"
    " save_amt, save_sum, cost_sum, present_sum, first_save, api_version"
)
# What BI reads: every view that reads balance_snapshots, whole.
VIEW_READS = [
    "SELECT * FROM v_daily_run_totals ORDER BY run_id, zone_id",
    "SELECT * FROM v_account_movement ORDER BY run_id, openid",
    "SELECT * FROM v_run_movement ORDER BY run_id, zone_id",
]


def _snapshot_state(engine: Engine) -> tuple[list[Any], list[Any], list[Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT {SNAPSHOT_COLUMNS} FROM balance_snapshots ORDER BY id")  # noqa: S608
        ).all()
        events = conn.execute(text("SELECT * FROM mismatch_events ORDER BY id")).all()
        views = [conn.execute(text(sql)).all() for sql in VIEW_READS]
    return rows, events, views


def _pg_partitions(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        names = conn.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'balance_snapshots'::regclass"
            )
        ).scalars()
        return {
            n: conn.execute(text(f"SELECT count(*) FROM {n}")).scalar_one()  # noqa: S608
            for n in list(names)
        }


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_partitioning_and_back_keeps_every_snapshot_id_and_view(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import business_calendar

    monkeypatch.setattr(
        business_calendar, "utcnow", lambda: dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)
    )
    url = (
        str(request.getfixturevalue("scratch_pg_url"))
        if dialect == "postgres"
        else f"sqlite:///{tmp_path / 'partitions.db'}"
    )
    migrate.upgrade(url, "20261204_0008")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for sql in PARTITION_SEED:
                if dialect == "sqlite":
                    sql = sql.replace("true", "1").replace("false", "0")
                conn.execute(text(sql))
            if dialect == "postgres":  # ids were given: move the sequence past them
                conn.execute(text("SELECT setval('balance_snapshots_id_seq', 9)"))
        before = _snapshot_state(engine)
        assert len(before[0]) == 7 and len(before[2][0]) == 4  # the views see every run

        migrate.upgrade(url)  # 0009 and every revision after it
        assert _snapshot_state(engine) == before
        with engine.connect() as conn:
            dated = conn.execute(
                text(
                    "SELECT count(*) FROM balance_snapshots s JOIN runs r ON r.id = s.run_id"
                    " WHERE s.business_date = r.business_date"
                )
            ).scalar_one()
        assert dated == 7
        if dialect == "postgres":
            # Every month with rows, the current one (December) and the two after it.
            assert _pg_partitions(engine) == {
                "balance_snapshots_2026_09": 2,
                "balance_snapshots_2026_10": 3,
                "balance_snapshots_2026_11": 2,
                "balance_snapshots_2026_12": 0,
                "balance_snapshots_2027_01": 0,
                "balance_snapshots_2027_02": 0,
            }
            # 0010: every partition has its month's row, at the upgrade's time (later than
            # anything in it was fetched).
            with engine.connect() as conn:
                months = dict(
                    conn.execute(text("SELECT month, fetched_until FROM snapshot_months")).all()
                )
                newest = conn.execute(text("SELECT max(fetched_at) FROM balance_snapshots"))
                latest = newest.scalar_one()
            assert sorted(m.isoformat()[:7] for m in months) == [
                "2026-09", "2026-10", "2026-11", "2026-12", "2027-01", "2027-02"
            ]  # fmt: skip
            assert all(until > latest for until in months.values())
        migrate.check(url)
        # The ids go on after the copied ones.
        with session_scope(url) as session:
            session.add(
                Run(
                    id=5,
                    business_date=dt.date(2026, 12, 3),
                    kind="recheck",
                    trigger="test",
                    api_version="v1",
                )
            )
        with engine.begin() as conn:
            new_id = conn.execute(
                text(
                    "INSERT INTO balance_snapshots (run_id, business_date, openid, zone_id,"
                    " fetched_at, status, api_version) VALUES (5, '2026-12-03', 'c', '1',"
                    " '2026-12-03 10:00:00+00', 'error', 'v1') RETURNING id"
                )
            ).scalar_one()
        assert new_id == 10
        after = _snapshot_state(engine)

        migrate.downgrade(url, "20261204_0008")
        assert _snapshot_state(engine) == after
        with engine.connect() as conn:
            assert "business_date" not in {
                c["name"] for c in inspect(conn).get_columns("balance_snapshots")
            }
            keys = inspect(conn).get_foreign_keys("mismatch_events")
            assert {"snapshot_id"} in [set(k["constrained_columns"]) for k in keys]
        if dialect == "postgres":
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM balance_snapshots WHERE id = 10"))
                next_id = conn.execute(text("SELECT nextval('balance_snapshots_id_seq')"))
                assert next_id.scalar_one() == 11  # the sequence came back with the table
        migrate.upgrade(url)
        migrate.check(url)
    finally:
        engine.dispose()


def test_downgrade_refuses_when_retention_dropped_a_snapshot_an_event_points_at(
    scratch_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import business_calendar

    monkeypatch.setattr(
        business_calendar, "utcnow", lambda: dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)
    )
    url = scratch_pg_url
    migrate.upgrade(url, "20261204_0008")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for sql in PARTITION_SEED:
                conn.execute(text(sql))
        migrate.upgrade(url)
        with engine.begin() as conn:  # what `db retention` does to a month
            conn.execute(
                text("ALTER TABLE balance_snapshots DETACH PARTITION balance_snapshots_2026_10")
            )
            conn.execute(text("DROP TABLE balance_snapshots_2026_10"))
        before = _snapshot_state(engine)
        with pytest.raises(RuntimeError, match="2 case events point at snapshots"):
            migrate.downgrade(url, "20261204_0008")
        assert migrate.current(url) == migrate.head()
        assert _snapshot_state(engine) == before
        migrate.check(url)
    finally:
        engine.dispose()
