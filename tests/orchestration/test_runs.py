"""Run services without Celery: planning, claims, redelivery, finalize (SQLite and Postgres)."""

from __future__ import annotations

import datetime as dt
from functools import partial

import pytest
from sqlalchemy import func, select, text, update

from tests.orchestration.test_fetch import BALANCE, Scripted
from worker.config import load_settings
from worker.db import runs as repo
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.models import Account, BalanceSnapshot, RunItem
from worker.db.session import session_scope
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
