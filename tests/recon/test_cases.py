"""The mismatch lifecycle on a real Postgres, transition by transition, history asserted."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from tests.recon.conftest import SETTLE, T0, Books
from worker.db.cases import insert_open_case
from worker.db.models import MismatchCase, MismatchEvent
from worker.db.session import engine_for
from worker.metrics import CASE_TRANSITIONS
from worker.recon.cases import (
    CaseError,
    CaseNotFound,
    ReconcileResult,
    TransitionRefused,
    acknowledge,
    reconcile_snapshots,
    resolve,
)
from worker.recon.rules import DEFAULT_CHECKS, Check

pytestmark = pytest.mark.integration

NOW = T0 + dt.timedelta(seconds=2)  # when the worker handles the batch
DUE = T0 + dt.timedelta(seconds=SETTLE)
MIN = dt.timedelta(minutes=1)


def reconcile(
    session: Session, *snapshots: Any, now: dt.datetime = NOW, **kw: Any
) -> ReconcileResult:
    return reconcile_snapshots(
        session,
        [s.id for s in snapshots],
        checks=kw.pop("checks", DEFAULT_CHECKS),
        settle_seconds=SETTLE,
        now=now,
        **kw,
    )


def cases(session: Session) -> list[MismatchCase]:
    return list(session.scalars(select(MismatchCase).order_by(MismatchCase.id)))


def history(session: Session, case: MismatchCase) -> list[tuple[Any, ...]]:
    rows = session.scalars(
        select(MismatchEvent).where(MismatchEvent.case_id == case.id).order_by(MismatchEvent.id)
    )
    return [
        (e.from_status, e.to_status, e.actor, e.midas_value, e.ledger_value, e.snapshot_id, e.note)
        for e in rows
    ]


def counts(result: ReconcileResult) -> tuple[int, int, int, int]:
    return result.opened, result.confirmed, result.cleared, result.resolved


@pytest.fixture
def differing(books: Books) -> tuple[Books, MismatchCase, Any]:
    """Account o1 with 600 coins topped up; Midas shows 10 more: one suspected balance case."""
    books.ledger("o1", "save", 600, T0 - MIN)
    snap = books.snapshot("o1", T0, off={"balance": 10})
    result = reconcile(books.session, snap)
    assert counts(result) == (1, 0, 0, 0)
    [case] = cases(books.session)
    return books, case, snap


def test_agreeing_books_open_nothing(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    books.ledger("o1", "cost", 200, T0 - MIN)
    books.ledger("o1", "cancel", 50, T0 - MIN)
    books.ledger("o1", "present", 9, T0 - MIN)
    snaps = [books.snapshot("o1", T0), books.snapshot("o2", T0)]  # o2: no ledger, all zero
    result = reconcile(books.session, *snaps)
    assert counts(result) == (0, 0, 0, 0)
    assert result.confirm_due == []
    assert cases(books.session) == []


def test_a_difference_opens_a_suspected_case(differing: tuple[Books, MismatchCase, Any]) -> None:
    books, case, snap = differing
    assert (case.openid, case.zone_id, case.check, case.status) == (
        "o1",
        "1",
        "balance",
        "suspected",
    )
    assert (case.midas_value, case.ledger_value, case.delta) == (610, 600, 10)
    assert case.first_seen_at == case.last_seen_at == T0
    assert case.confirm_due_at == DUE
    assert case.opened_run_id == snap.run_id
    assert history(books.session, case) == [(None, "suspected", "system", 610, 600, snap.id, None)]
    event_row = books.session.scalars(select(MismatchEvent)).one()
    assert (event_row.at, event_row.run_id) == (NOW, snap.run_id)


def test_the_result_asks_for_one_refetch_per_account_after_the_settle_window(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    books.ledger("o2", "save", 100, T0 - MIN)
    a = books.snapshot("o1", T0, off={"balance": 5, "save_sum": 5})  # two checks differ
    b = books.snapshot("o2", T0 + MIN, off={"present_sum": -1})
    c = books.snapshot("o3", T0)  # agrees: no re-fetch
    result = reconcile(books.session, a, b, c)
    assert result.opened == 3
    assert result.confirm_due == [("o1", "1", DUE), ("o2", "1", DUE + MIN)]


def test_still_differing_after_the_settle_window_confirms(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, first = differing
    refetch = books.snapshot("o1", DUE, off={"balance": 10})  # exactly at the due time
    result = reconcile(books.session, refetch, now=DUE + MIN)
    assert counts(result) == (0, 1, 0, 0)
    assert result.confirm_due == []
    assert case.status == "confirmed"
    assert (case.midas_value, case.ledger_value, case.delta, case.last_seen_at) == (
        610,
        600,
        10,
        DUE,
    )
    assert case.first_seen_at == T0
    assert history(books.session, case) == [
        (None, "suspected", "system", 610, 600, first.id, None),
        ("suspected", "confirmed", "system", 610, 600, refetch.id, None),
    ]


def test_a_difference_with_a_new_cause_is_not_confirmed_but_settles_again(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    """+10 in flight settles, a new -30 in flight appears: that is not the +10 confirmed."""
    books, case, _ = differing
    refetch = books.snapshot("o1", DUE, off={"balance": -30})
    result = reconcile(books.session, refetch, now=DUE + MIN)
    assert counts(result) == (0, 0, 0, 0) and result.restarted == 1
    assert case.status == "suspected" and case.delta == -30
    assert case.confirm_due_at == DUE + dt.timedelta(seconds=SETTLE)  # the window restarts
    assert result.confirm_due == [("o1", "1", DUE + dt.timedelta(seconds=SETTLE))]
    *_, restart = history(books.session, case)
    assert restart[:5] == ("suspected", "suspected", "system", 570, 600)
    assert "changed to -30" in restart[6]
    # The same -30 after the new window: confirmed.
    later = books.snapshot("o1", DUE + dt.timedelta(seconds=SETTLE), off={"balance": -30})
    result = reconcile(books.session, later, now=later.fetched_at)
    assert result.confirmed == 1 and case.status == "confirmed"


def test_ledger_rows_within_the_clock_skew_hold_the_confirmation(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    """A top-up the game dated 90 s after the re-fetch (its clock runs ahead): Midas has it,
    the ledger window does not; with a 120 s skew tolerated that is in flight, not proof."""
    books, case, _ = differing
    skew = dt.timedelta(seconds=120)
    books.ledger("o1", "save", 50, DUE + dt.timedelta(seconds=90))
    refetch = books.snapshot("o1", DUE, off={"balance": 10})
    result = reconcile(books.session, refetch, now=DUE, skew=skew)
    assert result.confirmed == 0 and result.restarted == 1 and case.status == "suspected"
    assert "clock skew" in history(books.session, case)[-1][6]
    # Settled: the next re-fetch sees the row inside its window and the books agree.
    settled = books.snapshot("o1", DUE + dt.timedelta(seconds=SETTLE), off={"balance": 10})
    result = reconcile(books.session, settled, now=settled.fetched_at, skew=skew)
    assert result.confirmed == 1  # the old +10 is still there, now with nothing in flight


def test_differing_inside_the_settle_window_only_updates_last_seen(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    early = books.snapshot("o1", DUE - dt.timedelta(seconds=1), off={"balance": 10})
    result = reconcile(books.session, early)
    assert counts(result) == (0, 0, 0, 0)
    assert case.status == "suspected"
    assert (case.midas_value, case.delta, case.last_seen_at) == (610, 10, early.fetched_at)
    assert case.confirm_due_at == DUE  # the window is not restarted
    assert result.confirm_due == [("o1", "1", DUE)]  # the confirming re-fetch is still owed
    assert len(history(books.session, case)) == 1


def test_agreeing_refetch_clears_at_any_time(differing: tuple[Books, MismatchCase, Any]) -> None:
    books, case, _ = differing
    # The payment that was in flight lands in the ledger; Midas already had it.
    books.ledger("o1", "save", 10, T0 + dt.timedelta(seconds=5))
    agreeing = books.snapshot("o1", T0 + MIN)  # before the due time
    result = reconcile(books.session, agreeing)
    assert counts(result) == (0, 0, 1, 0)
    assert case.status == "cleared"
    assert history(books.session, case)[-1] == (
        "suspected",
        "cleared",
        "system",
        610,
        610,
        agreeing.id,
        None,
    )
    # The case row keeps the difference it was opened for; the event has the agreeing numbers.
    assert (case.midas_value, case.ledger_value) == (610, 600)


def test_a_closed_case_is_final_and_a_new_difference_opens_a_new_case(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    reconcile(books.session, books.snapshot("o1", T0 + MIN, off={}))  # clears
    assert case.status == "cleared"
    later = books.snapshot("o1", T0 + 10 * MIN, off={"balance": -3})
    result = reconcile(books.session, later)
    assert result.opened == 1
    old, new = cases(books.session)
    assert (old.id, old.status) == (case.id, "cleared")
    assert (new.status, new.delta, new.first_seen_at) == ("suspected", -3, later.fetched_at)


def test_confirmed_case_is_resolved_by_a_later_agreeing_snapshot(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    reconcile(books.session, books.snapshot("o1", DUE, off={"balance": 10}), now=DUE)
    assert case.status == "confirmed"
    books.ledger("o1", "present", 10, DUE + MIN)  # the game books the missing gift
    fixed = books.snapshot("o1", DUE + 2 * MIN)
    result = reconcile(books.session, fixed, now=DUE + 3 * MIN)
    assert counts(result) == (0, 0, 0, 1)
    assert case.status == "resolved"
    assert [h[:3] for h in history(books.session, case)] == [
        (None, "suspected", "system"),
        ("suspected", "confirmed", "system"),
        ("confirmed", "resolved", "system"),
    ]
    assert history(books.session, case)[-1][3:6] == (610, 610, fixed.id)


def test_operator_acknowledges_then_an_agreeing_snapshot_resolves(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    confirming = books.snapshot("o1", DUE, off={"balance": 10})
    reconcile(books.session, confirming, now=DUE)
    acknowledge(books.session, case.id, "  ticket FIN-12  ", "alice", now=DUE + MIN)
    assert case.status == "acknowledged"
    # Still differing: an acknowledged case stays as it is, values refreshed.
    still = books.snapshot("o1", DUE + 2 * MIN, off={"balance": 9})
    assert counts(reconcile(books.session, still)) == (0, 0, 0, 0)
    assert (case.status, case.delta, case.last_seen_at) == ("acknowledged", 9, still.fetched_at)
    fixed = books.snapshot("o1", DUE + 3 * MIN)
    assert counts(reconcile(books.session, fixed)) == (0, 0, 0, 1)
    assert history(books.session, case)[1:] == [
        ("suspected", "confirmed", "system", 610, 600, confirming.id, None),
        ("confirmed", "acknowledged", "operator:alice", 610, 600, None, "ticket FIN-12"),
        ("acknowledged", "resolved", "system", 600, 600, fixed.id, None),
    ]


def test_operator_can_acknowledge_a_suspected_case(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    acknowledge(books.session, case.id, "known: refund pending", "bob")
    assert case.status == "acknowledged"
    ev = books.session.scalars(select(MismatchEvent).order_by(MismatchEvent.id.desc())).first()
    assert ev is not None
    assert ev.at.tzinfo is not None and ev.run_id is None


def test_operator_resolves_an_open_case_with_a_note(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    resolve(books.session, case.id, "corrected by hand", "operator:carol", now=NOW + MIN)
    assert case.status == "resolved"
    assert history(books.session, case)[-1] == (
        "suspected",
        "resolved",
        "operator:carol",
        610,
        600,
        None,
        "corrected by hand",
    )
    # Resolved is final: a later agreeing or differing snapshot does not touch it.
    reconcile(books.session, books.snapshot("o1", DUE + MIN))
    assert len(history(books.session, case)) == 2


@pytest.mark.parametrize(
    ("action", "note", "actor", "error", "message"),
    [
        (acknowledge, "", "alice", CaseError, "a note is required"),
        (resolve, "   \n", "alice", CaseError, "a note is required"),
        (resolve, "x" * 2001, "alice", CaseError, "longer than 2000"),
        (acknowledge, "n", "", CaseError, "actor"),
        (acknowledge, "n", "two words", CaseError, "actor"),
        (acknowledge, "n", "a" * 56, CaseError, "actor"),
    ],
)
def test_operator_input_is_refused_and_nothing_changes(
    differing: tuple[Books, MismatchCase, Any],
    action: Any,
    note: str,
    actor: str,
    error: type[Exception],
    message: str,
) -> None:
    books, case, _ = differing
    with pytest.raises(error, match=message):
        action(books.session, case.id, note, actor)
    assert case.status == "suspected"
    assert len(history(books.session, case)) == 1


def test_acting_on_a_closed_or_unknown_case_is_a_clear_error(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    with pytest.raises(CaseNotFound, match="no mismatch case 999"):
        resolve(books.session, 999, "n", "alice")
    acknowledge(books.session, case.id, "seen", "alice")
    with pytest.raises(TransitionRefused, match="is acknowledged"):
        acknowledge(books.session, case.id, "again", "alice")
    resolve(books.session, case.id, "done", "alice")
    with pytest.raises(TransitionRefused, match=f"case {case.id} is already resolved"):
        resolve(books.session, case.id, "again", "alice")
    with pytest.raises(TransitionRefused, match="is resolved"):
        acknowledge(books.session, case.id, "again", "alice")
    assert [h[1] for h in history(books.session, case)] == ["suspected", "acknowledged", "resolved"]


def test_unobservable_and_error_snapshots_never_move_a_case(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, _ = differing
    blind = [
        books.snapshot("o1", DUE + MIN, status="unobservable"),
        books.snapshot("o1", DUE + 2 * MIN, status="error"),
        books.snapshot("o9", DUE, status="error"),  # no case, no ledger: opens nothing either
    ]
    result = reconcile(books.session, *blind, now=DUE + 3 * MIN)
    assert counts(result) == (0, 0, 0, 0)
    assert result.skipped == 3
    assert (case.status, case.last_seen_at) == ("suspected", T0)
    assert len(cases(books.session)) == 1
    assert len(history(books.session, case)) == 1
    # ...and they do not hide the account's observable past: the next ok snapshot counts.
    confirming = books.snapshot("o1", DUE + 4 * MIN, off={"balance": 10})
    assert reconcile(books.session, confirming).confirmed == 1


def test_a_stale_snapshot_does_not_move_a_case_backwards(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, first = differing
    newer = books.snapshot("o1", DUE, off={"balance": 10})
    reconcile(books.session, newer, now=DUE)
    assert case.status == "confirmed"
    # A snapshot fetched before the newest one arrives late (a redelivered task, a slow
    # worker): even though it agrees, it must not resolve what a newer fetch confirmed.
    late = books.snapshot("o1", DUE - MIN)
    result = reconcile(books.session, late, first, now=DUE + MIN)
    assert counts(result) == (0, 0, 0, 0)
    assert result.skipped == 2
    assert (case.status, case.last_seen_at) == ("confirmed", DUE)
    assert len(history(books.session, case)) == 2


def test_a_redelivered_snapshot_does_not_reopen_a_cleared_case(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, case, first = differing
    reconcile(books.session, books.snapshot("o1", T0 + MIN, off={}))
    assert case.status == "cleared"
    assert counts(reconcile(books.session, first)) == (0, 0, 0, 0)
    assert len(cases(books.session)) == 1


def test_reconciling_the_same_batch_twice_changes_nothing(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    snap = books.snapshot("o1", T0, off={"balance": 1, "cost_sum": 2})
    assert reconcile(books.session, snap).opened == 2
    again = reconcile(books.session, snap, snap)
    assert counts(again) == (0, 0, 0, 0)
    assert books.session.scalar(select(func.count()).select_from(MismatchEvent)) == 2


def test_ledger_entries_after_the_fetch_are_not_compared(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    books.ledger("o1", "cost", 100, T0 + dt.timedelta(milliseconds=1))  # in flight
    snap = books.snapshot("o1", T0)
    assert counts(reconcile(books.session, snap)) == (0, 0, 0, 0)


def test_two_checks_with_one_name_are_refused(books: Books) -> None:
    snap = books.snapshot("o1", T0)
    twins = (Check("x", "balance", {"save": 1}), Check("x", "save_sum", {"save": 1}))
    with pytest.raises(ValueError, match="share a name"):
        reconcile(books.session, snap, checks=twins)


def test_configured_checks_decide_what_is_compared(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    snap = books.snapshot("o1", T0, off={"balance": 4, "gen_balance": 1})
    only_gen = (Check("gifts", "gen_balance", {"present": 1}),)
    result = reconcile(books.session, snap, checks=only_gen)
    assert result.opened == 1
    assert [(c.check, c.delta) for c in cases(books.session)] == [("gifts", 1)]


def test_a_cancel_row_missing_from_midas_opens_cost_sum_and_balance(books: Books) -> None:
    books.ledger("o1", "save", 600, T0 - MIN)
    books.ledger("o1", "cost", 100, T0 - MIN)
    snap = books.snapshot("o1", T0)
    books.ledger("o1", "cancel", 100, T0 - MIN)  # booked by the game, unknown to Midas
    books.session.flush()
    assert reconcile(books.session, snap).opened == 2
    assert {(c.check, c.delta) for c in cases(books.session)} == {
        ("cost_sum", 100),
        ("balance", -100),
    }


def test_transitions_are_counted_in_the_metrics(
    differing: tuple[Books, MismatchCase, Any],
) -> None:
    books, _, _ = differing
    before = CASE_TRANSITIONS.labels(to_status="confirmed")._value.get()
    reconcile(books.session, books.snapshot("o1", DUE, off={"balance": 10}), now=DUE)
    assert CASE_TRANSITIONS.labels(to_status="confirmed")._value.get() == before + 1


def test_a_batch_costs_the_same_few_queries_however_many_accounts(books: Books) -> None:
    def statements_for(n: int, prefix: str) -> int:
        for i in range(n):
            books.ledger(f"{prefix}{i}", "save", 10, T0 - MIN)
        snaps = [books.snapshot(f"{prefix}{i}", T0) for i in range(n)]
        seen: list[str] = []

        def count(*args: Any) -> None:
            seen.append(args[2])

        engine = books.session.get_bind()
        event.listen(engine, "before_cursor_execute", count)
        try:
            reconcile(books.session, *snaps)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return len(seen)

    small, large = statements_for(3, "a"), statements_for(60, "b")
    # account locks, the months that can hold newer snapshots, current snapshots, ledger
    # totals, open cases (locked)
    assert small == large == 5


def test_two_workers_opening_the_same_case_do_not_crash(db_url: str) -> None:
    """The second worker waits for the first one's transaction (the account's lock), then
    advances the case the first one opened."""
    engine = engine_for(db_url)
    with Session(engine) as setup:
        ledger = Books(setup)
        ledger.ledger("o1", "save", 600, T0 - MIN)
        setup.commit()
    a, b = Session(engine), Session(engine)
    books_a, books_b = Books(a), Books(b)
    books_a.rows = books_b.rows = ledger.rows  # both workers see the committed ledger
    outcome: dict[str, Any] = {}
    try:
        # Each worker stores its snapshot and reconciles it in one transaction, as a fetch
        # batch does; neither sees the other's snapshot or case until it commits.
        snap_a = books_a.snapshot("o1", T0, off={"balance": 10})
        assert reconcile(a, snap_a).opened == 1
        snap_b = books_b.snapshot("o1", T0 + MIN, off={"balance": 10})
        b_pid = b.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def worker_b() -> None:
            try:
                outcome["result"] = reconcile(b, snap_b, now=NOW + MIN)
                b.commit()
            except Exception as exc:  # handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=worker_b)
        thread.start()
        _wait_until_blocked(engine, b_pid)
        a.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        a.close()
        b.close()
    assert "error" not in outcome, outcome.get("error")
    assert counts(outcome["result"]) == (0, 0, 0, 0)  # B found A's case and advanced it
    assert outcome["result"].confirm_due == [("o1", "1", DUE)]
    with Session(engine) as check:
        [case] = cases(check)
        assert (case.status, case.last_seen_at, case.delta) == ("suspected", T0 + MIN, 10)
        assert [h[:2] for h in history(check, case)] == [(None, "suspected")]


def _wait_until_blocked(engine: Any, pid: int, timeout: float = 10.0) -> None:
    """Until backend `pid` waits on a lock (its INSERT behind the other worker's case)."""
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            ).scalar_one_or_none()
            if waiting == "Lock":
                return
            time.sleep(0.02)
    raise AssertionError("the second worker never waited on the first one's case")


def test_the_lifecycle_on_sqlite(sqlite_url: str) -> None:
    """The embedded default: open, confirm, acknowledge, resolve on SQLite."""
    with Session(engine_for(sqlite_url)) as session:
        books = Books(session)
        books.ledger("o1", "save", 600, T0 - MIN)
        first = books.snapshot("o1", T0, off={"balance": 10})
        assert reconcile(session, first).opened == 1
        [case] = cases(session)
        # A second open case for the same check is the partial index's conflict: no row, no error.
        duplicate = {
            c: getattr(case, c)
            for c in ("openid", "zone_id", "check", "midas_value", "ledger_value", "delta")
        }
        stamps = {"first_seen_at": T0, "last_seen_at": T0}
        assert insert_open_case(session, status="confirmed", **duplicate, **stamps) is None
        confirming = books.snapshot("o1", DUE, off={"balance": 10})
        assert reconcile(session, confirming, now=DUE).confirmed == 1
        acknowledge(session, case.id, "looking", "alice")
        assert reconcile(session, books.snapshot("o1", DUE + MIN)).resolved == 1
        session.commit()
        assert [h[:3] for h in history(session, case)] == [
            (None, "suspected", "system"),
            ("suspected", "confirmed", "system"),
            ("confirmed", "acknowledged", "operator:alice"),
            ("acknowledged", "resolved", "system"),
        ]
        assert case.first_seen_at == T0 and case.first_seen_at.tzinfo is not None
