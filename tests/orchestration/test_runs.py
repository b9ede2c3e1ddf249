"""Run services without Celery: planning, claims, redelivery, finalize (SQLite and Postgres)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text, update

from tests.orchestration.test_fetch import BALANCE, Scripted
from worker.config import load_settings
from worker.db import runs as repo
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.models import Account, BalanceSnapshot, RunItem
from worker.db.session import engine_for, session_scope
from worker.midas.errors import QuotaExhausted, RetryableError
from worker.recon import runs
from worker.recon.fetch import RetryPolicy
from worker.recon.rules import DEFAULT_CHECKS

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


def seed(url: str, n: int, *, idle: int = 0, unknown: int = 0) -> list[str]:
    """n active accounts, `idle` seen 45 days ago, `unknown` without any recorded activity."""
    rows = [
        AccountRow(f"o{i:04d}", "1", last_active_at=NOW - dt.timedelta(hours=1)) for i in range(n)
    ]
    rows += [
        AccountRow(f"idle{i}", "1", last_active_at=NOW - dt.timedelta(days=45)) for i in range(idle)
    ]
    rows += [AccountRow(f"new{i}", "1") for i in range(unknown)]
    with session_scope(url) as session:
        upsert_accounts(session, rows, now=NOW)
    return [r.openid for r in rows]


def deps(script: dict[str, list[object]]) -> runs.FetchDeps:
    return runs.FetchDeps(
        source=Scripted(script),
        api_version="v1",
        checks=DEFAULT_CHECKS,
        settle_seconds=300,
        skew=dt.timedelta(seconds=120),
        threads=4,
        deadline_s=30,
        policy=RetryPolicy(base_s=0.001, cap_s=0.002),
    )


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "db_url"
    return str(request.getfixturevalue(name))


def test_one_nightly_run_per_date_planned_from_the_active_accounts(url: str) -> None:
    seed(url, 30, idle=5, unknown=3)
    settings = load_settings({"DATABASE_URL": url, "RECON_ACTIVE_DAYS": "30"})
    day = dt.date(2026, 11, 24)
    with session_scope(url) as session:
        first = runs.start_nightly(session, settings, business_date=day, now=NOW)
    with session_scope(url) as session:
        second = runs.start_nightly(session, settings, business_date=day, trigger="cli", now=NOW)
    assert first.created and not second.created and first.run_id == second.run_id
    # The idle ones are out; accounts without recorded activity count from their creation.
    assert first.planned == second.planned == 33 and first.status == "running"
    # Without a date, the date of the latest scheduled start (02:30 in Shanghai): 23:30 UTC
    # is 07:30 on the 25th there, after that day's 02:30.
    late = dt.datetime(2026, 11, 24, 23, 30, tzinfo=dt.UTC)
    assert settings.calendar.nightly_date_for(late) == dt.date(2026, 11, 25)


def test_a_redelivered_or_overtaken_batch_changes_nothing(url: str) -> None:
    openids = seed(url, 10)
    settings = load_settings({"DATABASE_URL": url})
    db = partial(session_scope, url)
    source = deps({o: [BALANCE] for o in openids})
    with db() as session:
        started = runs.start_nightly(session, settings, now=NOW)
        pumped = runs.pump(session, started.run_id, room=lambda _k: 5, size=4, now=NOW)
    first, second, third = pumped.batches
    assert [len(b.account_ids) for b in pumped.batches] == [4, 4, 2]
    assert len({a for b in pumped.batches for a in b.account_ids}) == 10

    done = runs.run_batch(db, source, first.run_id, first.account_ids, first.claim)
    assert done.done == 4
    again = runs.run_batch(db, source, first.run_id, first.account_ids, first.claim)
    assert again.done == 0 and again.skipped == 4  # a redelivery: nothing fetched or stored

    # The second batch's claim is taken back (its worker presumed dead) and handed out anew;
    # the old message then finds nothing, the new one does the work.
    later = NOW + dt.timedelta(seconds=runs.CLAIM_GRACE_S + 1)
    with db() as session:
        retaken = runs.pump(
            session,
            started.run_id,
            room=lambda _k: 1,
            size=10,
            is_alive=lambda claim: claim != second.claim,
            now=later,
        )
    assert retaken.taken_back == 4 and retaken.batches[0].account_ids == second.account_ids
    stale = runs.run_batch(db, source, second.run_id, second.account_ids, second.claim)
    assert stale.done == 0
    new = retaken.batches[0]
    assert runs.run_batch(db, source, new.run_id, new.account_ids, new.claim).done == 4
    assert runs.run_batch(db, source, third.run_id, third.account_ids, third.claim).done == 2

    with db() as session:
        finished = runs.pump(session, started.run_id, room=lambda _k: 1, size=10)
        again_finished = runs.finalize(session, started.run_id)
        snaps = session.scalar(select(func.count()).select_from(BalanceSnapshot))
    assert finished.status == "complete" and again_finished is not None
    assert again_finished.status == "complete" and again_finished.ok == 10
    assert snaps == 10
    assert sum(source.source.calls.values()) == 10  # type: ignore[attr-defined]


def test_errors_make_a_run_incomplete_and_a_stopper_fails_it(url: str) -> None:
    openids = seed(url, 6)
    settings = load_settings({"DATABASE_URL": url})
    db = partial(session_scope, url)
    script: dict[str, list[object]] = {o: [BALANCE] for o in openids}
    script[openids[0]] = [RetryableError("busy", errcode=-1)]
    with db() as session:
        started = runs.start_nightly(session, settings, now=NOW)
        (batch,) = runs.pump(session, started.run_id, room=lambda _k: 1, size=10).batches
    runs.run_batch(db, deps(script), batch.run_id, batch.account_ids, batch.claim)
    with db() as session:
        run = runs.finalize(session, started.run_id)
    assert run is not None and run.status == "incomplete"
    assert (run.planned, run.ok, run.error) == (6, 5, 1)

    day = dt.date(2026, 1, 1)
    stopper = {o: [QuotaExhausted("day quota used up", errcode=45009)] for o in openids}
    with db() as session:
        started = runs.start_nightly(session, settings, business_date=day, now=NOW)
        (batch,) = runs.pump(session, started.run_id, room=lambda _k: 1, size=10).batches
    result = runs.run_batch(db, deps(stopper), batch.run_id, batch.account_ids, batch.claim)
    assert result.stopped is not None and "45009" in result.stopped
    with db() as session:
        failed = repo.get_run(session, started.run_id)
        assert failed is not None and failed.status == "failed"
        assert "45009" in (failed.failure_reason or "")
        # Nothing was stored for the stopped accounts; all go back to the plan.
        assert repo.item_counts(session, started.run_id).pending == 6
        # One night at a time: while another nightly is open the failed one stays failed
        # and says which one it waits for.
        other = runs.start_nightly(
            session, settings, business_date=day + dt.timedelta(days=1), now=NOW
        )
        assert other.status == "running"
        held = runs.start_nightly(session, settings, business_date=day, resume_failed=True, now=NOW)
        assert held.status == "failed" and held.waiting_for == (other.run_id,)
    with db() as session:
        (batch,) = runs.pump(session, other.run_id, room=lambda _k: 1, size=10).batches
    runs.run_batch(db, deps({o: [BALANCE] for o in openids}), batch.run_id, batch.account_ids,
                   batch.claim)  # fmt: skip
    with db() as session:
        assert runs.pump(session, other.run_id, room=lambda _k: 1, size=10).status == "complete"
        resumed = runs.start_nightly(
            session, settings, business_date=day, resume_failed=True, now=NOW
        )
    assert resumed.resumed_from and "45009" in resumed.resumed_from
    with db() as session:
        (batch,) = runs.pump(session, started.run_id, room=lambda _k: 1, size=10).batches
    runs.run_batch(db, deps({o: [BALANCE] for o in openids}), batch.run_id, batch.account_ids,
                   batch.claim)  # fmt: skip
    with db() as session:
        run = runs.finalize(session, started.run_id)
    assert run is not None and run.status == "complete" and run.failure_reason is None


def test_an_account_whose_batches_keep_dying_is_given_up(url: str) -> None:
    openids = seed(url, 2)
    settings = load_settings({"DATABASE_URL": url})
    db = partial(session_scope, url)
    with db() as session:
        started = runs.start_nightly(session, settings, now=NOW)
        (batch,) = runs.pump(session, started.run_id, room=lambda _k: 1, size=10).batches
        poison = session.scalar(select(Account.id).where(Account.openid == openids[0]))
        session.execute(
            update(RunItem)
            .where(RunItem.account_id == poison)
            .values(attempts=runs.MAX_BATCH_DEATHS)
        )
    source = deps({o: [BALANCE] for o in openids})
    runs.run_batch(db, source, batch.run_id, batch.account_ids, batch.claim)
    with db() as session:
        snaps = {s.openid: s for s in session.scalars(select(BalanceSnapshot)).all()}
    assert snaps[openids[0]].status == "error" and "given up" in (snaps[openids[0]].errmsg or "")
    assert snaps[openids[1]].status == "ok"
    assert source.source.calls == {openids[1]: 1}  # type: ignore[attr-defined]


def test_concurrent_claimers_never_share_an_item(db_url: str) -> None:
    seed(db_url, 50)
    settings = load_settings({"DATABASE_URL": db_url})
    with session_scope(db_url) as session:
        started = runs.start_nightly(session, settings, now=NOW)
    with session_scope(db_url) as one, session_scope(db_url) as two:
        a = repo.claim_pending(one, started.run_id, limit=30, claim=NOW)
        # `one` still holds its row locks: `two` skips them instead of waiting.
        two.execute(text("SET LOCAL lock_timeout = '2s'"))
        b = repo.claim_pending(two, started.run_id, limit=30, claim=NOW)
    assert len(a) == 30 and len(b) == 20 and not set(a) & set(b)


def in_flight(url: str, run_id: int) -> list[dt.datetime]:
    """The run's claims the pump would judge, by the query it judges them with."""
    with session_scope(url) as session:
        return sorted(repo.claims_before(session, run_id, NOW + dt.timedelta(days=1)))


def test_a_claim_is_in_flight_until_its_batch_stored_or_it_was_taken_back(url: str) -> None:
    openids = seed(url, 10)
    settings = load_settings({"DATABASE_URL": url})
    db = partial(session_scope, url)
    source = deps({o: [BALANCE] for o in openids})
    with db() as session:
        run_id = runs.start_nightly(session, settings, now=NOW).run_id
        pumped = runs.pump(session, run_id, room=lambda _k: 3, size=4, now=NOW)
    first, second, third = pumped.batches
    assert in_flight(url, run_id) == [first.claim, second.claim, third.claim]

    runs.run_batch(db, source, run_id, first.account_ids, first.claim)
    runs.run_batch(db, source, run_id, first.account_ids, first.claim)  # a redelivered copy
    assert in_flight(url, run_id) == [second.claim, third.claim]

    # The pump judges the claims it finds there: a dead one goes back to the plan.
    later = NOW + dt.timedelta(seconds=runs.CLAIM_GRACE_S + 1)
    with db() as session:
        retaken = runs.pump(
            session, run_id, room=lambda _k: 1, size=4,
            is_alive=lambda claim: claim != second.claim, now=later,
        )  # fmt: skip
    (new,) = retaken.batches
    assert retaken.taken_back == 4 and in_flight(url, run_id) == [third.claim, new.claim]
    assert runs.run_batch(db, source, run_id, second.account_ids, second.claim).done == 0

    # Whatever its liveness, a claim older than the stale limit goes back (the last resort).
    stale = new.claim + dt.timedelta(seconds=runs.STALE_CLAIM_S + 1)
    with db() as session:
        assert runs.pump(session, run_id, room=lambda _k: 0, size=4, now=stale).taken_back == 6
    assert in_flight(url, run_id) == []
    with db() as session:
        last = runs.pump(session, run_id, room=lambda _k: 1, size=10, now=stale).batches
    assert runs.run_batch(db, source, run_id, last[0].account_ids, last[0].claim).done == 6
    assert in_flight(url, run_id) == []
    with db() as session:
        assert runs.pump(session, run_id, room=lambda _k: 1, size=10).status == "complete"


def test_two_claims_made_in_the_same_microsecond_are_two_batches_in_flight(url: str) -> None:
    # A frozen clock, or two pumps at once: the claims are equal, the batches are not.
    openids = seed(url, 6)
    settings = load_settings({"DATABASE_URL": url})
    db = partial(session_scope, url)
    with db() as session:
        run_id = runs.start_nightly(session, settings, now=NOW).run_id
        (one,) = runs.pump(session, run_id, room=lambda _k: 1, size=3, now=NOW).batches
        (two,) = runs.pump(session, run_id, room=lambda _k: 1, size=3, now=NOW).batches
    assert one.claim == two.claim and not set(one.account_ids) & set(two.account_ids)
    runs.run_batch(db, deps({o: [BALANCE] for o in openids}), run_id, one.account_ids, one.claim)
    # The other batch's claim is still in flight, so the pump can still find it dead.
    assert in_flight(url, run_id) == [two.claim]
    later = NOW + dt.timedelta(seconds=runs.CLAIM_GRACE_S + 1)
    with db() as session:
        dead = runs.pump(session, run_id, room=lambda _k: 0, size=3, is_alive=lambda _c: False,
                         now=later)  # fmt: skip
    assert dead.taken_back == 3 and in_flight(url, run_id) == []


def test_a_batch_and_the_pump_never_read_the_claimed_items_through_the_state_index(
    db_url: str,
) -> None:
    # Each state change leaves a dead entry in the (run_id, state) index until a vacuum: a
    # batch or pump that read the `claimed` range late in a big night would step over one
    # per item done so far (docs/benchmarks.md §3). Their statements, explained as Postgres
    # plans them once the night is planned (and analyzed): none may use that index.
    with session_scope(db_url) as session:
        session.execute(
            text(
                "INSERT INTO accounts (openid, zone_id, last_active_at)"
                " SELECT 'o' || i, '1', :at FROM generate_series(1, 20000) i"
            ),
            {"at": NOW - dt.timedelta(hours=1)},
        )
    settings = load_settings({"DATABASE_URL": db_url})
    db = partial(session_scope, db_url)
    with db() as session:
        run_id = runs.start_nightly(session, settings, now=NOW).run_id
        batches = runs.pump(session, run_id, room=lambda _k: 3, size=200, now=NOW).batches
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, *_args: Any) -> None:
        if "run_items" in statement or "run_claims" in statement:
            statements.append((statement, params))

    # Every engine: the session factory may hold one that engine_for() has since replaced.
    event.listen(Engine, "before_cursor_execute", record)
    try:
        source = deps(defaultdict(lambda: [BALANCE]))
        runs.run_batch(db, source, run_id, batches[0].account_ids, batches[0].claim)
        with db() as session:
            repo.start_items(session, run_id, batches[1].account_ids, claim=batches[1].claim)
            repo.release(session, run_id, batches[1].account_ids)
            runs.pump(
                session, run_id, room=lambda _k: 0, size=200, is_alive=lambda _c: True,
                now=NOW + dt.timedelta(seconds=runs.CLAIM_GRACE_S + 1),
            )  # fmt: skip
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    explained = []
    with engine_for(db_url).connect() as conn:
        for statement, params in statements:
            plan = conn.exec_driver_sql("EXPLAIN " + statement, params).scalars().all()
            explained.append("\n".join([statement, *plan]))
    assert len(explained) >= 7  # start, lock, done, close; start, release; the pump's claims
    # Only a scan for pending items may use it (a claim, or whether any is left).
    assert not [e for e in explained if "ix_run_items_run_state" in e and "claimed" in e]
