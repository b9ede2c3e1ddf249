"""Monthly snapshot partitions on Postgres: made ahead, made for a backfill, and dropped by
`db retention` only after saying what goes, never under an open case."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import text

from worker import business_calendar
from worker.cli.base import cli
from worker.config import get_settings
from worker.db import migrate
from worker.db import runs as repo
from worker.db.models import MismatchCase, MismatchEvent
from worker.db.session import make_engine, session_scope
from worker.db.snapshots import VALUE_FIELDS, SnapshotRow, insert_snapshots

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 12, 4, 4, 0, tzinfo=dt.UTC)  # 12:00 on 2026-12-04 in Asia/Shanghai
# One run a month, from August to December: three snapshots each.
DATES = [dt.date(2026, m, 10) for m in (8, 9, 10, 11, 12)]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, dt.datetime]:
    now = {"now": NOW}
    monkeypatch.setattr(business_calendar, "utcnow", lambda: now["now"])
    return now


@pytest.fixture
def url(scratch_pg_url: str, clock: dict[str, dt.datetime]) -> Iterator[str]:
    """A database at head with a run and three snapshots in each month of DATES."""
    migrate.upgrade(scratch_pg_url)
    with session_scope(scratch_pg_url) as session:
        for day in DATES:
            run_id = repo.insert_run(
                session,
                kind="recheck",
                business_date=day,
                trigger="test",
                api_version="v1",
                now=NOW,
            )
            at = dt.datetime.combine(day, dt.time(3), tzinfo=dt.UTC)
            rows = [SnapshotRow(o, "1", at, "error", "v1", errmsg="x") for o in ("a", "b", "c")]
            insert_snapshots(session, run_id, day, rows)
    yield scratch_pg_url


def partitions(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            names = conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                    " WHERE i.inhparent = 'balance_snapshots'::regclass ORDER BY c.relname"
                )
            ).scalars()
            return {
                n: conn.execute(text(f"SELECT count(*) FROM {n}")).scalar_one()  # noqa: S608
                for n in list(names)
            }
    finally:
        engine.dispose()


ALL = {
    "balance_snapshots_2026_08": 3,
    "balance_snapshots_2026_09": 3,
    "balance_snapshots_2026_10": 3,
    "balance_snapshots_2026_11": 3,
    "balance_snapshots_2026_12": 3,
    "balance_snapshots_2027_01": 0,
    "balance_snapshots_2027_02": 0,
}


def run(url: str, *args: str, input: str | None = None) -> Result:
    get_settings.cache_clear()
    return CliRunner().invoke(
        cli, ["db", "retention", *args], env={"DATABASE_URL": url}, input=input
    )


def error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_run_of_an_old_date_makes_its_month_and_the_migration_the_coming_ones(
    url: str,
) -> None:
    # The migration made December to February; each run made its own month (a backfill).
    assert partitions(url) == ALL


def test_the_daily_task_makes_the_coming_months(
    url: str, clock: dict[str, dt.datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.tasks import ensure_partitions

    monkeypatch.setenv("DATABASE_URL", url)
    clock["now"] = dt.datetime(2027, 1, 31, 16, 30, tzinfo=dt.UTC)  # 2027-02-01 in Shanghai
    get_settings.cache_clear()  # importing the tasks read the settings before
    ensure_partitions.apply().get()
    assert partitions(url) == {
        **ALL,
        "balance_snapshots_2027_03": 0,
        "balance_snapshots_2027_04": 0,
    }
    ensure_partitions.apply().get()  # again: nothing new, no error
    assert len(partitions(url)) == len(ALL) + 2


def test_dry_run_lists_each_partition_and_drops_nothing(url: str) -> None:
    result = run(url, "--keep-months", "3", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "keeping 2026-10 and later (--keep-months 3, business date 2026-12-04)\n"
        "would drop 2 partition(s):\n"
        "  balance_snapshots_2026_08  2026-08  3 snapshots\n"
        "  balance_snapshots_2026_09  2026-09  3 snapshots\n"
        "dry run: nothing dropped\n"
    )
    assert partitions(url) == ALL


def test_it_asks_and_drops_only_when_told_yes(url: str) -> None:
    declined = run(url, "--keep-months", "4", input="n\n")
    assert declined.exit_code == 1
    assert "not confirmed; nothing dropped" in declined.stderr
    assert partitions(url) == ALL

    agreed = run(url, "--keep-months", "4", input="y\n")
    assert agreed.exit_code == 0, agreed.stderr
    assert "balance_snapshots_2026_08  2026-08  3 snapshots" in agreed.stdout
    assert agreed.stdout.endswith("dropped balance_snapshots_2026_08 (2026-08, 3 snapshots)\n")
    assert partitions(url) == {k: v for k, v in ALL.items() if k != "balance_snapshots_2026_08"}
    with session_scope(url) as session:  # the other months' rows are all there
        assert session.execute(text("SELECT count(*) FROM balance_snapshots")).scalar() == 12

    again = run(url, "--keep-months", "4", "--yes")
    assert again.exit_code == 0
    assert "nothing to drop" in again.stdout


def _case(url: str, status: str, snapshot_month: int) -> None:
    """A case whose event points at a snapshot of `snapshot_month` (2026)."""
    with session_scope(url) as session:
        snapshot_id = session.execute(
            text("SELECT min(id) FROM balance_snapshots WHERE business_date = :d"),
            {"d": dt.date(2026, snapshot_month, 10)},
        ).scalar_one()
        case = MismatchCase(
            openid="a",
            zone_id="1",
            check="balance",
            status=status,
            midas_value=2,
            ledger_value=1,
            delta=1,
            first_seen_at=NOW,
            last_seen_at=NOW,
        )
        session.add(case)
        session.flush()
        session.add(
            MismatchEvent(
                case_id=case.id,
                at=NOW,
                actor="system",
                to_status=status,
                midas_value=2,
                ledger_value=1,
                snapshot_id=snapshot_id,
            )
        )


def test_a_month_an_open_case_points_at_is_refused_and_nothing_is_dropped(url: str) -> None:
    _case(url, "acknowledged", 9)
    for args in (("--dry-run",), ("--yes",)):
        result = run(url, "--keep-months", "3", *args)
        assert result.exit_code == 2
        assert error_line(result) == (
            "midas-recon: refused: balance_snapshots_2026_09 holds 1 snapshot(s) events of"
            " open cases point at. Resolve those cases, or keep more months; nothing dropped"
        )
        assert "balance_snapshots_2026_08  2026-08  3 snapshots" in result.stdout
        assert partitions(url) == ALL


def test_a_closed_case_does_not_hold_its_month(url: str) -> None:
    _case(url, "resolved", 9)
    result = run(url, "--keep-months", "3", "--yes")
    assert result.exit_code == 0, result.stderr
    assert set(ALL) - set(partitions(url)) == {
        "balance_snapshots_2026_08",
        "balance_snapshots_2026_09",
    }


@pytest.mark.parametrize("keep", ["1", "0", "-3"])
def test_fewer_than_two_months_is_refused(url: str, keep: str) -> None:
    result = run(url, "--keep-months", keep, "--yes")
    assert result.exit_code == 2
    assert "--keep-months must be at least 2" in error_line(result)
    assert partitions(url) == ALL


def test_sqlite_has_no_partitions_to_drop(sqlite_url: str, clock: object) -> None:
    result = run(sqlite_url, "--keep-months", "3", "--yes")
    assert result.exit_code == 2
    assert "on Postgres" in error_line(result)
    assert "nothing was dropped" in error_line(result)


def test_help_gives_the_exit_codes(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "retention", "--help"])
    assert result.exit_code == 0
    assert "Exit codes: 0 dropped" in " ".join(result.stdout.split())


def test_a_batch_reads_its_snapshots_in_its_runs_month_only(url: str) -> None:
    from worker.db.cases import current_ok_snapshots

    day = dt.date(2026, 11, 20)
    values = tuple((name, 1) for name in VALUE_FIELDS)
    with session_scope(url) as session:
        run_id = repo.insert_run(
            session, kind="recheck", business_date=day, trigger="test", api_version="v1", now=NOW
        )
        at = dt.datetime(2026, 11, 20, 3, tzinfo=dt.UTC)
        stored = insert_snapshots(
            session, run_id, day, [SnapshotRow("d", "1", at, "ok", "v1", values=values)]
        )
        ids = [s.id for s in stored]
        assert [s.id for s in current_ok_snapshots(session, ids, day)] == ids
        # Another month's date: the lookup reads that month's partition only, and finds nothing.
        assert current_ok_snapshots(session, ids, dt.date(2026, 12, 1)) == []
        plan = "\n".join(
            session.execute(
                text(
                    "EXPLAIN SELECT id FROM balance_snapshots"
                    " WHERE id = :id AND business_date = :day"
                ),
                {"id": ids[0], "day": day},
            ).scalars()
        )
        assert "balance_snapshots_2026_11" in plan and "balance_snapshots_2026_12" not in plan
