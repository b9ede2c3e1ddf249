"""Cases across clocks and time: the race with a recheck, parked cases, removed checks, SQLite
timestamps written by the game."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tests.recon.conftest import SETTLE, T0, Books
from worker.db import confirm as confirm_repo
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.ledger_totals import AccountAt, ledger_sums
from worker.db.models import MismatchCase, MismatchEvent
from worker.db.session import engine_for
from worker.recon.cases import close_cases_of_removed_checks, park_unobserved, reconcile_snapshots
from worker.recon.rules import DEFAULT_CHECKS

pytestmark = pytest.mark.integration

MIN = dt.timedelta(minutes=1)
DUE = T0 + dt.timedelta(seconds=SETTLE)


def reconcile(session: Session, *snaps: Any, now: dt.datetime) -> Any:
    return reconcile_snapshots(
        session, [s.id for s in snaps], checks=DEFAULT_CHECKS, settle_seconds=SETTLE, now=now
    )


def _wait_until_blocked(engine: Any, pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar_one_or_none()
            if waiting == "Lock":
                return
            time.sleep(0.05)
    raise AssertionError(f"backend {pid} never waited on a lock")


def test_an_older_snapshot_waits_for_a_newer_one_and_then_moves_nothing(db_url: str) -> None:
    """A nightly batch (older fetch, differing) racing a recheck (newer fetch, agreeing):
    the batch must not open a case from its older snapshot once the recheck has spoken."""
    engine = engine_for(db_url)
    with Session(engine) as setup:
        upsert_accounts(setup, [AccountRow("o1", "1")], now=T0)
        Books(setup).ledger("o1", "save", 600, T0 - MIN)
        setup.commit()
    nightly, recheck = Session(engine), Session(engine)
    outcome: dict[str, Any] = {}
    try:
        older = Books(nightly)
        older.rows = {("o1", "1"): [("save", 600, T0 - MIN)]}
        stale = older.snapshot("o1", T0, off={"balance": 50}, run=older.run("nightly"))
        newer = Books(recheck)
        newer.rows = older.rows
        fresh = newer.snapshot("o1", T0 + MIN)  # agrees
        assert reconcile(recheck, fresh, now=T0 + MIN).opened == 0  # holds the account's lock
        pid = nightly.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def batch() -> None:
            try:
                outcome["result"] = reconcile(nightly, stale, now=T0 + MIN)
                nightly.commit()
            except Exception as exc:  # handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=batch)
        thread.start()
        _wait_until_blocked(engine, pid)  # the batch waits for the recheck's transaction
        recheck.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        nightly.close()
        recheck.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].opened == 0 and outcome["result"].skipped == 1
    with Session(engine) as check:
        assert check.scalars(select(MismatchCase)).all() == []


def test_an_unobservable_confirming_fetch_parks_the_case_until_the_next_login(
    pg_session: Session,
) -> None:
    books = Books(pg_session)
    upsert_accounts(pg_session, [AccountRow("o1", "1")], now=T0)
    books.ledger("o1", "save", 600, T0 - MIN)
    assert reconcile(pg_session, books.snapshot("o1", T0, off={"balance": 10}), now=T0).opened
    due = confirm_repo.due_confirm_accounts(
        pg_session, now=DUE, retry_after=DUE - dt.timedelta(seconds=600), limit=10
    )
    assert len(due) == 1
    # The confirming re-fetch finds the session expired.
    books.snapshot("o1", DUE, status="unobservable")
    assert park_unobserved(pg_session, [("o1", "1", "errcode 90016")], now=DUE) == 1
    [case] = pg_session.scalars(select(MismatchCase)).all()
    assert case.status == "suspected" and case.parked_at == DUE
    assert "waiting for the player's next login" in (case.parked_reason or "")
    later = DUE + dt.timedelta(hours=3)  # long past the usual retry
    args = {"retry_after": later - dt.timedelta(seconds=600), "limit": 10}
    assert confirm_repo.due_confirm_accounts(pg_session, now=later, **args) == []
    assert confirm_repo.last_confirm_due(pg_session, until=later) is None
    # The player logs in again: a new session key, and the case is due again.
    upsert_accounts(
        pg_session,
        [AccountRow("o1", "1", session_key_enc="gAAAA-sealed", session_key_at=later)],
        now=later,
    )
    assert confirm_repo.due_confirm_accounts(pg_session, now=later, **args) == due
    # Parking again after a login that did not help records no second event.
    assert park_unobserved(pg_session, [("o1", "1", "errcode 90016")], now=later) == 0
    notes = pg_session.scalars(select(MismatchEvent.note).where(MismatchEvent.note.is_not(None)))
    assert len(notes.all()) == 1
    # An ok answer un-parks it and decides it.
    assert reconcile(pg_session, books.snapshot("o1", later, off={"balance": 10}), now=later)
    assert case.status == "confirmed" and case.parked_at is None


def test_cases_of_a_removed_check_are_closed_with_a_note(pg_session: Session) -> None:
    books = Books(pg_session)
    books.ledger("o1", "save", 600, T0 - MIN)
    snap = books.snapshot("o1", T0, off={"present_sum": 5, "balance": 5})
    assert reconcile(pg_session, snap, now=T0).opened == 2
    remaining = [c for c in DEFAULT_CHECKS if c.name != "present_sum"]
    assert close_cases_of_removed_checks(pg_session, remaining, now=T0 + MIN) == 1
    statuses = dict(pg_session.execute(select(MismatchCase.check, MismatchCase.status)).all())
    assert statuses == {"present_sum": "resolved", "balance": "suspected"}
    note = pg_session.scalars(
        select(MismatchEvent.note).where(MismatchEvent.to_status == "resolved")
    ).one()
    assert "'present_sum' is no longer in RECON_CHECKS" in (note or "")
    assert close_cases_of_removed_checks(pg_session, remaining, now=T0 + MIN) == 0


def test_sqlite_compares_iso_timestamps_the_game_wrote_as_instants(sqlite_url: str) -> None:
    """A row written directly as '…T10:00:00+08:00' was compared as text and went missing
    from the sums of the same day."""
    engine = engine_for(sqlite_url)
    with engine.begin() as conn:
        for bill, stamp in (("B1", "2026-11-24T10:00:00+08:00"), ("B2", "2026-11-24T02:30:00Z")):
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, "
                    "occurred_at) VALUES (:b, 'o1', '1', 'save', 100, :t)"
                ),
                {"b": bill, "t": stamp},
            )
        stored = conn.execute(text("SELECT occurred_at FROM ledger_entries ORDER BY id")).scalars()
        assert list(stored) == ["2026-11-24 02:00:00.000000", "2026-11-24 02:30:00.000000"]
    with Session(engine) as session:
        at = dt.datetime(2026, 11, 24, 2, 15, tzinfo=dt.UTC)
        later = dt.datetime(2026, 11, 24, 23, 0, tzinfo=dt.UTC)
        sums = ledger_sums(session, [AccountAt("o1", "1", at), AccountAt("o1", "1", later)])
        assert sums[AccountAt("o1", "1", at)]["save"] == 100
        assert sums[AccountAt("o1", "1", later)]["save"] == 200
