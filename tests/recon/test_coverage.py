"""The night's capacity and its order of risk, on Postgres and SQLite."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from worker.config import load_settings
from worker.db import runs as run_repo
from worker.db.models import Account, LedgerEntry, MismatchCase, Run, RunDeferral, RunItem
from worker.db.session import session_scope
from worker.recon import coverage

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 11, 10, 18, 30, tzinfo=dt.UTC)  # 02:30 in Asia/Shanghai
DAY = dt.date(2026, 11, 11)
H = dt.timedelta(hours=1)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    name = "sqlite_url" if request.param == "sqlite" else "db_url"
    return str(request.getfixturevalue(name))


def settings(url: str, rate: str) -> object:
    return load_settings(
        {
            "DATABASE_URL": url,
            "MIDAS_RATE_LIMIT": rate,
            "RECON_NIGHTLY_AT": "02:30",
            "RECON_NIGHTLY_DEADLINE": "02:40",  # 600 s
        }
    )


def test_capacity_is_the_limiters_schedule_less_the_fast_lane_over_the_window() -> None:
    s = load_settings({"MIDAS_RATE_LIMIT": "50"})
    # 50 / 1.05 (MIDAS_RATE_MARGIN_S) x 0.95 (RECON_FAST_LANE_SHARE) x 5.5 h
    assert coverage.nightly_capacity(s, 5.5 * 3600) == 895_714
    assert coverage.nightly_capacity(s, 0) == 0
    late = s.calendar.night_window(DAY, NOW + 10 * H)  # after the deadline: a whole night
    assert late[1] - late[0] == dt.timedelta(hours=5, minutes=30)


def test_the_riskiest_accounts_first_and_the_rest_counted(url: str) -> None:
    week_ago = NOW - 24 * 7 * H
    accounts = {
        # rotation, answered long ago / recently
        "old": dict(last_ok_at=week_ago, last_answer_at=week_ago),
        "recent": dict(last_ok_at=NOW - 24 * H, last_answer_at=NOW - 24 * H),
        # moved: a ledger row after its last ok observation
        "moved": dict(last_ok_at=NOW - 24 * H, last_answer_at=NOW - 24 * H),
        # an open case
        "case": dict(last_ok_at=NOW - 24 * H, last_answer_at=NOW - 24 * H),
        # never answered; and unobservable then logged in again
        "unseen": {},
        "renewed": dict(
            last_answer_at=NOW - 48 * H,
            last_unobservable_at=NOW - 48 * H,
            session_key_updated_at=NOW - 2 * H,
        ),
        # unobservable and no login since: rotation, not unseen
        "expired": dict(
            last_answer_at=NOW - 30 * H,
            last_unobservable_at=NOW - 30 * H,
            session_key_updated_at=NOW - 100 * H,
        ),
        # idle for longer than RECON_ACTIVE_DAYS: not planned, not deferred
        "idle": dict(last_ok_at=week_ago),
    }
    with session_scope(url) as session:
        for name, values in accounts.items():
            active = NOW - (40 * 24 * H if name == "idle" else H)
            session.add(Account(openid=name, zone_id="1", last_active_at=active, **values))
        session.add(
            LedgerEntry(
                bill_no="b1",
                openid="moved",
                zone_id="1",
                kind="save",
                amount=5,
                occurred_at=NOW - 3 * H,
            )
        )
        session.add(
            LedgerEntry(  # before its last observation: not movement
                bill_no="b2",
                openid="recent",
                zone_id="1",
                kind="save",
                amount=5,
                occurred_at=NOW - 30 * H,
            )
        )
        session.add(
            MismatchCase(
                openid="case",
                zone_id="1",
                check="balance",
                status="confirmed",
                midas_value=1,
                ledger_value=0,
                delta=1,
                first_seen_at=NOW - 24 * H,
                last_seen_at=NOW - 24 * H,
            )
        )
    s = settings(url, "0.0070")  # 0.007 / 1.05 x 0.95 x 600 s = 3.8: three accounts a night
    with session_scope(url) as session:
        run_id = run_repo.insert_nightly_run(session, DAY, trigger="cli", api_version="v1", now=NOW)
        assert run_id is not None
        plan = coverage.plan_night(session, s, run_id, DAY, NOW)  # type: ignore[arg-type]
    assert (plan.capacity, plan.active, plan.planned, plan.deferred) == (3, 7, 3, 4)
    assert plan.feasible  # seven accounts need one a night to be seen every 7 days
    with session_scope(url) as session:
        planned = dict(
            session.execute(
                select(Account.openid, RunItem.tier)
                .join(RunItem, RunItem.account_id == Account.id)
                .where(RunItem.run_id == run_id)
            ).all()
        )
        deferred = dict(
            session.execute(
                select(RunDeferral.tier, RunDeferral.accounts).where(
                    RunDeferral.run_id == run_id, RunDeferral.reason == "capacity"
                )
            ).all()
        )
        # Claims hand the riskiest out first.
        claimed = run_repo.claim_pending(session, run_id, limit=1, claim=NOW)
        first = session.get(Account, claimed[0])
        assert first is not None and first.openid == "moved"
    assert planned == {"moved": 0, "case": 1, "unseen": 2}
    # Left: renewed (unseen), then old, expired, recent by the time they last answered.
    assert deferred == {2: 1, 3: 3}

    # A bigger night takes them all, the rotation oldest first.
    s = settings(url, "0.0200")  # 11 a night
    with session_scope(url) as session:
        run_id = run_repo.insert_nightly_run(
            session, DAY + dt.timedelta(days=1), trigger="cli", api_version="v1", now=NOW
        )
        assert run_id is not None
        plan = coverage.plan_night(session, s, run_id, DAY, NOW)  # type: ignore[arg-type]
        order = [
            session.get(Account, a).openid  # type: ignore[union-attr]
            for a in run_repo.claim_pending(session, run_id, limit=10, claim=NOW)
        ]
    assert plan.feasible and plan.deferred == 0
    assert sorted(order) == sorted(set(accounts) - {"idle"})
    with session_scope(url) as session:
        tiers = dict(
            session.execute(
                select(Account.openid, RunItem.tier)
                .join(RunItem, RunItem.account_id == Account.id)
                .where(RunItem.run_id == run_id)
            ).all()
        )
    assert tiers == {
        "moved": 0,
        "case": 1,
        "unseen": 2,
        "renewed": 2,
        "old": 3,
        "expired": 3,
        "recent": 3,
    }


def test_a_night_that_cannot_cover_says_so(url: str) -> None:
    with session_scope(url) as session:
        for i in range(30):
            session.add(Account(openid=f"a{i}", zone_id="1", last_active_at=NOW - H))
    s = settings(url, "0.0070")  # three a night: 30 accounts need 5 a night for 7 days
    with session_scope(url) as session:
        run_id = run_repo.insert_nightly_run(session, DAY, trigger="cli", api_version="v1", now=NOW)
        assert run_id is not None
        coverage.plan_night(session, s, run_id, DAY, NOW)  # type: ignore[arg-type]
        run = session.get(Run, run_id)
        assert run is not None
        verdict = coverage.close_coverage(session, run_id, run.coverage, NOW + H)
    assert verdict == coverage.IMPOSSIBLE
    with session_scope(url) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.coverage is not None
        assert run.coverage["never_observed"] == 30
        assert run.coverage["observed_share"] == {"1d": 0.0, "7d": 0.0, "30d": 0.0}
        assert run.coverage["oldest_age_s"] == {"max": None, "p99": None, "p50": None}
        assert "each is observed at best every 10 days" in run.coverage["note"]
        assert run.deferred == 27


def test_a_mover_never_answered_stays_a_mover_after_a_night_that_deferred_it(url: str) -> None:
    old = NOW - 10 * 24 * H
    with session_scope(url) as session:
        # Imported ten days ago with history from before: not movement.
        session.add(Account(openid="imported", zone_id="1", last_active_at=NOW - H, created_at=old))
        # Paid two days ago, before last night began, and never asked since (deferred).
        session.add(Account(openid="deferred", zone_id="1", last_active_at=NOW - H, created_at=old))
        # Created by its first payment, whose ledger row is a moment older than the account.
        session.add(
            Account(openid="first", zone_id="1", last_active_at=NOW - H, created_at=NOW - H)
        )
        for n, (who, at) in enumerate(
            [("imported", old - H), ("deferred", NOW - 48 * H), ("first", NOW - H - H / 60)]
        ):
            session.add(
                LedgerEntry(
                    bill_no=f"m{n}", openid=who, zone_id="1", kind="save", amount=5, occurred_at=at
                )
            )
        last_night = run_repo.insert_nightly_run(
            session, DAY - dt.timedelta(days=1), trigger="beat", api_version="v1", now=NOW - 24 * H
        )
        assert last_night is not None
        run_repo.mark_running(session, last_night, planned=0, now=NOW - 24 * H)
        run_id = run_repo.insert_nightly_run(
            session, DAY, trigger="beat", api_version="v1", now=NOW
        )
        assert run_id is not None
        coverage.plan_night(session, settings(url, "0.0200"), run_id, DAY, NOW)  # type: ignore[arg-type]
        tiers = dict(
            session.execute(
                select(Account.openid, RunItem.tier)
                .join(RunItem, RunItem.account_id == Account.id)
                .where(RunItem.run_id == run_id)
            ).all()
        )
    assert tiers == {"deferred": 0, "first": 0, "imported": 2}
