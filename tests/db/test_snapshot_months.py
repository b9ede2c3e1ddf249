"""`snapshot_months` on Postgres: "is there a newer ok snapshot" and the ledger scan's "was this
account compared without its late row" read only the months that can hold one, and still find
a backfill's snapshot in an old month."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.db import ledger as ledger_repo
from worker.db import migrate, partitions
from worker.db import runs as repo
from worker.db.accounts import AccountRow, account_id, upsert_accounts
from worker.db.cases import current_ok_snapshots
from worker.db.session import engine_for, session_scope
from worker.db.snapshots import VALUE_FIELDS, SnapshotRow, insert_snapshots

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 12, 4, 4, 0, tzinfo=dt.UTC)
NIGHT = dt.date(2026, 11, 20)  # the nightly's business date
OLD = dt.date(2025, 3, 10)  # a backfill's, months back
VALUES = tuple((name, 1) for name in VALUE_FIELDS)


@pytest.fixture
def url(scratch_pg_url: str) -> Iterator[str]:
    migrate.upgrade(scratch_pg_url)
    with session_scope(scratch_pg_url) as session:
        partitions.ensure_months(session, [NIGHT, OLD])
    yield scratch_pg_url


def store(session: Session, day: dt.date, at: dt.datetime, openid: str = "a") -> int:
    """An ok snapshot of `openid` fetched at `at`, stored by a run of `day` as a batch does."""
    run_id = repo.insert_run(
        session, kind="recheck", business_date=day, trigger="test", api_version="v1", now=NOW
    )
    row = SnapshotRow(openid, "1", at, "ok", "v1", values=VALUES)
    (stored,) = insert_snapshots(session, run_id, day, [row])
    return stored.id


def late_row(session: Session, openid: str, at: dt.datetime) -> int:
    """A ledger row of `openid` dated `at`, imported now; the ledger's last id before it."""
    before = ledger_repo.last_id(session)
    row = ledger_repo.LedgerRow(f"bill-{openid}-{at:%s}", openid, "1", "save", 100, at)
    assert ledger_repo.import_entries(session, [row]).inserted == 1
    return before


def write_behind_the_repository(session: Session, day: dt.date, at: dt.datetime) -> None:
    """An ok snapshot of account `a` inserted by hand: its month's row is not moved."""
    run_id = session.execute(text("SELECT min(id) FROM runs")).scalar_one()
    session.execute(
        text(
            "INSERT INTO balance_snapshots (run_id, business_date, openid, zone_id,"
            " fetched_at, status, balance, gen_balance, save_amt, save_sum, cost_sum,"
            " present_sum, first_save, api_version) VALUES (:r, :d, 'a', '1', :at, 'ok',"
            " 1, 1, 1, 1, 1, 1, true, 'v1')"
        ),
        {"r": run_id, "d": day, "at": at},
    )


def fetched_until(url: str, month: dt.date) -> dt.datetime:
    """The month's row as another connection sees it."""
    with engine_for(url).connect() as conn:
        query = text("SELECT fetched_until FROM snapshot_months WHERE month = :m")
        return conn.execute(query, {"m": month}).scalar_one()


def test_a_backfill_fetched_later_into_an_old_month_still_supersedes(url: str) -> None:
    night_at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    with session_scope(url) as session:
        nightly = store(session, NIGHT, night_at)
    # Weeks later a backfill of a March 2025 date fetches the same account again.
    with session_scope(url) as session:
        backfill = store(session, OLD, night_at + dt.timedelta(days=10))
    with session_scope(url) as session:
        assert current_ok_snapshots(session, [nightly], NIGHT) == []
        assert [s.id for s in current_ok_snapshots(session, [backfill], OLD)] == [backfill]


def test_a_month_with_nothing_fetched_since_is_not_read(url: str) -> None:
    night_at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    with session_scope(url) as session:
        store(session, OLD, dt.datetime(2025, 3, 11, 3, tzinfo=dt.UTC), openid="b")
        nightly = store(session, NIGHT, night_at)
        # A newer snapshot written behind the repository's back into March 2025 (its month's
        # row says nothing was fetched there after 2025-03-11): the probe does not look.
        write_behind_the_repository(session, OLD, night_at + dt.timedelta(hours=2))
        assert [s.id for s in current_ok_snapshots(session, [nightly], NIGHT)] == [nightly]
        # Noted (as every batch that stores does), the month is read and the snapshot counts.
        partitions.note_fetched(session, OLD, night_at + dt.timedelta(hours=2))
        assert current_ok_snapshots(session, [nightly], NIGHT) == []


def test_the_row_moves_only_when_an_hour_behind_and_before_the_batch_commits(url: str) -> None:
    at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    with session_scope(url) as session:
        store(session, NIGHT, at)
    month = dt.date(2026, 11, 1)
    assert fetched_until(url, month) == at
    with session_scope(url) as session:
        store(session, NIGHT, at + dt.timedelta(minutes=59), openid="b")  # within the slack
        assert fetched_until(url, month) == at
        store(session, NIGHT, at + dt.timedelta(minutes=61), openid="c")
        # Seen by another connection while this batch's transaction is still open.
        assert fetched_until(url, month) == at + dt.timedelta(minutes=61)
        # A batch with older fetches never moves it back.
        partitions.note_fetched(session, NIGHT, at - dt.timedelta(hours=5))
        assert fetched_until(url, month) == at + dt.timedelta(minutes=61)


def test_the_ledger_scan_finds_a_backfill_that_compared_without_a_late_row(url: str) -> None:
    night_at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    with session_scope(url) as session:
        upsert_accounts(session, [AccountRow("a", "1"), AccountRow("b", "1")], now=NOW)
        store(session, NIGHT, night_at, openid="b")
        # A backfill of a March 2025 date fetched `a` after its late row's time.
        store(session, OLD, night_at + dt.timedelta(days=10), openid="a")
    with session_scope(url) as session:
        after = late_row(session, "a", night_at + dt.timedelta(days=1))
        late_row(session, "b", night_at + dt.timedelta(days=1))  # dated after b's only fetch
        assert ledger_repo.accounts_compared_without(session, after) == [
            account_id(session, "a", "1")
        ]


def test_the_ledger_scan_does_not_read_a_month_with_nothing_fetched_since(url: str) -> None:
    night_at = dt.datetime(2026, 11, 21, 3, tzinfo=dt.UTC)
    with session_scope(url) as session:
        upsert_accounts(session, [AccountRow("a", "1")], now=NOW)
        store(session, OLD, dt.datetime(2025, 3, 11, 3, tzinfo=dt.UTC), openid="b")
        store(session, NIGHT, night_at - dt.timedelta(days=1))
        write_behind_the_repository(session, OLD, night_at + dt.timedelta(hours=2))
    with session_scope(url) as session:
        after = late_row(session, "a", night_at)
        assert ledger_repo.accounts_compared_without(session, after) == []
        # Noted, as a batch storing it would have, the month is read and the account found.
        partitions.note_fetched(session, OLD, night_at + dt.timedelta(hours=2))
        assert ledger_repo.accounts_compared_without(session, after) == [
            account_id(session, "a", "1")
        ]
