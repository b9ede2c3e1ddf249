"""Ten nights that cannot hold every account: the planner spends each on the riskiest ones and
still reaches every active account within RECON_FULL_COVERAGE_DAYS.

Real Postgres, the real simulator over HTTP, the production planners and fetch path under a
controllable clock (`worker.business_calendar.utcnow`), as in test_week.py. The nights are
planned at a rate that holds 700 accounts between RECON_NIGHTLY_AT 02:30 and the deadline
02:50 (0.64 requests/s over 20 minutes, less the margin and the fast lane); the fetches
themselves run at the simulator's speed, since the test's clock, not the wall clock, says
when the deadline comes. 2,500 accounts to begin with, and every day 40 top-ups booked on
both sides, 20 new logins, and, on days 1 to 5, two gifts Midas makes that the ledger never
books (planted differences, found only by the rotation since nothing moves in the ledger).

Two nights are cut short: night 4 meets its deadline after three batches; night 6 is
abandoned after two batches with a third claimed and not yet stored, and night 7's start
closes it, waits for that batch, then plans.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections.abc import Iterator
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from tests.orchestration.conftest import Clock
from worker.config import load_settings
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.ledger import LedgerRow, import_entries
from worker.db.models import (
    BalanceSnapshot,
    MismatchCase,
    MismatchEvent,
    Run,
    RunDeferral,
    RunItem,
)
from worker.db.session import session_scope
from worker.midas.limiter import make_limiter
from worker.recon import coverage, rechecks, runs
from worker.recon.fetch import RetryPolicy
from worker.reports.render import render
from worker.reports.statement import as_dict, build_statement
from worker.simulator import SimConfig, Simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TZ = ZoneInfo("Asia/Shanghai")
DAY0 = dt.date(2026, 11, 1)
Z = "1"
FIRST_ACCOUNTS = 2500
PAYMENTS, LOGINS, GIFTS = 40, 20, 2
BATCH = 50
DAYS = 7  # RECON_FULL_COVERAGE_DAYS


def local(day: int, hhmm: str) -> dt.datetime:
    moment = dt.datetime.combine(DAY0 + dt.timedelta(days=day), dt.time.fromisoformat(hhmm))
    return moment.replace(tzinfo=TZ).astimezone(dt.UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock.install(monkeypatch, local(0, "00:00"))


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(SimConfig())
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


class Nights:
    def __init__(self, url: str, sim: Simulator, clock: Clock) -> None:
        self.sim, self.clock = sim, clock
        env = {
            "DATABASE_URL": url,
            "MIDAS_API_BASE": sim.base_url,
            "MIDAS_API_VERSION": "v1",
            "MIDAS_APPID": "wxsim0000000000",
            "MIDAS_APP_SECRET": "sim-app-secret",
            "MIDAS_OFFER_ID": "1450000000",
            "MIDAS_APP_KEY": "sim-sandbox-appkey",
            "RECON_TIMEZONE": "Asia/Shanghai",
            "RECON_NIGHTLY_AT": "02:30",
            "RECON_NIGHTLY_DEADLINE": "02:50",
            "RECON_SETTLE_SECONDS": "60",
            "RECON_FULL_COVERAGE_DAYS": str(DAYS),
            "MIDAS_RATE_LIMIT": "0.64",
        }
        self.settings = load_settings(env)  # what the nights are planned with
        # What the fetches run at: the test's clock decides the deadline, not this rate.
        fast = load_settings({**env, "MIDAS_RATE_LIMIT": "2000"})
        self.deps = runs.FetchDeps.from_settings(fast, limiter=make_limiter(fast))
        self.deps.policy = RetryPolicy(base_s=0.001, cap_s=0.002)
        self.deps.settings = self.settings  # a waiting night is planned at the night's rate
        self.db = partial(session_scope, url)
        self.bills = itertools.count(1)
        self.accounts: dict[str, dt.datetime] = {}  # openid -> when it joined
        self.paid: dict[int, set[str]] = {}  # day -> accounts with a top-up that day
        self.gifts: dict[str, dt.datetime] = {}  # planted differences
        self.nightly_runs: dict[int, int] = {}  # day -> run id
        self.most_running = 0

    def join(self, openids: list[str], at: dt.datetime) -> None:
        """New players with history that agrees on both sides; they log in now."""
        self.clock.set(at)
        rows = []
        for who in openids:
            bill = f"B{next(self.bills):07d}"
            self.sim.add_player(who, Z)
            self.sim.save(who, Z, 100, bill)
            rows.append(LedgerRow(bill, who, Z, "save", 100, at))
            self.accounts[who] = at
        with self.db() as session:
            import_entries(session, rows)
            upsert_accounts(session, [AccountRow(w, Z, last_active_at=at) for w in openids])

    def top_ups(self, day: int, who: list[str]) -> None:
        self.clock.set(local(day, "12:00"))
        rows = []
        for w in who:
            bill = f"B{next(self.bills):07d}"
            self.sim.save(w, Z, 60, bill)
            rows.append(LedgerRow(bill, w, Z, "save", 60, self.clock.now))
        with self.db() as session:
            import_entries(session, rows)
            upsert_accounts(session, [AccountRow(w, Z, last_active_at=self.clock.now) for w in who])
        self.paid[day] = set(who)

    def gift(self, day: int, who: list[str]) -> None:
        self.clock.set(local(day, "14:00"))
        for w in who:
            self.sim.present(w, Z, 25, f"G{next(self.bills):07d}")  # the ledger never books it
            self.gifts[w] = self.clock.now

    def watch(self, _progress: Any = None) -> None:
        with self.db() as session:
            running = session.execute(
                select(func.count()).where(Run.kind == "nightly", Run.status == "running")
            ).scalar_one()
        self.most_running = max(self.most_running, running)

    def start(self, day: int) -> runs.StartResult:
        self.clock.set(local(day, "02:30"))
        with self.db() as session:
            started = runs.start_nightly(session, self.settings, trigger="beat")
        assert started.business_date == DAY0 + dt.timedelta(days=day)
        self.nightly_runs[day] = started.run_id
        self.watch()
        return started

    def drive(self, run_id: int, progress: Any = None) -> None:
        runs.drive(self.db, self.deps, run_id, size=BATCH, progress=progress or self.watch)

    def pump(self, run_id: int, room: int) -> runs.PumpResult:
        with self.db() as session:
            return runs.pump(
                session, run_id, room=lambda _k: room, size=BATCH, settings=self.settings
            )

    def confirm(self, day: int) -> None:
        self.clock.set(local(day, "02:59"))
        with self.db() as session:
            batches = rechecks.plan_confirm_pass(session, self.settings, size=BATCH)
        if batches:
            runs.drive(self.db, self.deps, batches[0].run_id, size=BATCH, first=batches)

    def run(self, run_id: int) -> Run:
        with self.db() as session:
            run = session.get(Run, run_id)
            assert run is not None
            session.expunge(run)
            return run


def test_ten_nights_that_do_not_hold_every_account(
    db_url: str, sim: Simulator, clock: Clock
) -> None:
    n = Nights(db_url, sim, clock)
    rng = random.Random(14)
    n.join([f"P{i:05d}" for i in range(FIRST_ACCOUNTS)], local(0, "10:00"))
    joined = itertools.count(FIRST_ACCOUNTS)

    for day in range(1, 11):
        night = day
        if day == 4:
            # The deadline comes after three batches: the clock jumps past 02:50.
            started = n.start(day)
            batches = 0

            def late(_p: Any) -> None:
                nonlocal batches
                batches += 1
                n.watch()
                if batches == 3:
                    clock.set(local(4, "02:50"))

            n.drive(started.run_id, progress=late)
        elif day == 6:
            # Two batches fetched, a third claimed and in flight: then the worker is gone.
            started = n.start(day)
            for _ in range(2):
                (batch,) = n.pump(started.run_id, 1).batches
                runs.run_batch(n.db, n.deps, batch.run_id, batch.account_ids, batch.claim)
            (in_flight,) = n.pump(started.run_id, 1).batches
        elif day == 7:
            # The next night closes night 6 and waits for its batch in flight.
            started = n.start(day)
            six = n.nightly_runs[6]
            assert started.status == "planning" and started.closed == (six,)
            assert started.waiting_for == (six,)
            assert n.run(six).status == "running"
            n.watch()
            clock.set(local(7, "02:31"))
            runs.run_batch(n.db, n.deps, in_flight.run_id, in_flight.account_ids, in_flight.claim)
            assert n.pump(six, 1).wake == [started.run_id]
            assert n.run(six).status == "incomplete"
            n.drive(started.run_id)
        else:
            started = n.start(day)
            n.drive(started.run_id)
        if night != 6:
            assert n.run(n.nightly_runs[night]).status in ("complete", "incomplete")
            n.confirm(day)
        # The day: top-ups, new players, planted differences.
        n.top_ups(day, rng.sample(sorted(n.accounts), PAYMENTS))
        n.join([f"P{next(joined):05d}" for _ in range(LOGINS)], local(day, "13:00"))
        if day <= 5:
            never_paid = sorted(set(n.accounts) - set().union(*n.paid.values()) - set(n.gifts))
            n.gift(day, rng.sample(never_paid, GIFTS))
    clock.set(local(11, "02:30"))
    last = n.start(11)
    n.drive(last.run_id)
    n.confirm(11)

    # -- one night at a time --------------------------------------------------------------
    assert n.most_running == 1

    with n.db() as session:
        ok = session.execute(
            select(BalanceSnapshot.run_id, BalanceSnapshot.openid, BalanceSnapshot.fetched_at)
            .join(Run, Run.id == BalanceSnapshot.run_id)
            .where(Run.kind == "nightly", BalanceSnapshot.status == "ok")
        ).all()
        cases = session.execute(select(MismatchCase.openid, MismatchCase.status)).all()
        confirmations = session.execute(
            select(MismatchCase.openid, func.min(MismatchEvent.at))
            .join(MismatchEvent, MismatchEvent.case_id == MismatchCase.id)
            .where(MismatchEvent.to_status == "confirmed")
            .group_by(MismatchCase.openid)
        ).all()
        deferrals = session.execute(
            select(RunDeferral.run_id, RunDeferral.reason, func.sum(RunDeferral.accounts)).group_by(
                RunDeferral.run_id, RunDeferral.reason
            )
        ).all()
        item_outcomes = session.execute(
            select(RunItem.run_id, RunItem.outcome, func.count()).group_by(
                RunItem.run_id, RunItem.outcome
            )
        ).all()
    seen: dict[int, set[str]] = {}
    observed: dict[str, list[dt.datetime]] = {}
    for run_id, who, at in ok:
        seen.setdefault(run_id, set()).add(who)
        observed.setdefault(who, []).append(at)

    # -- every account that moved is observed the night after it moved ----------------------
    # (by that night's run, or by a batch of the night before that was still in flight then)
    for day, who in n.paid.items():
        paid_at, next_night = local(day, "12:00"), n.run(n.nightly_runs[day + 1])
        assert next_night.finished_at is not None
        late = {w for w in who if w not in seen[next_night.id]}
        for w in late:
            assert any(paid_at < t <= next_night.finished_at for t in observed[w]), (day, w)
        assert len(late) <= BATCH, day

    # -- every active account within RECON_FULL_COVERAGE_DAYS, at every night's close --------
    for day in range(1, 12):
        run = n.run(n.nightly_runs[day])
        assert run.finished_at is not None
        for who, joined_at in n.accounts.items():
            if joined_at >= run.started_at:  # type: ignore[operator]
                continue
            last_ok = max((t for t in observed.get(who, []) if t <= run.finished_at), default=None)
            reference = last_ok or joined_at
            assert run.finished_at - reference <= dt.timedelta(days=DAYS), (day, who)

    # -- planted differences confirmed within that bound ---------------------------------
    assert {who for who, status in cases if status == "confirmed"} == set(n.gifts)
    confirmed = dict(confirmations)
    for who, planted in n.gifts.items():
        assert confirmed[who] - planted <= dt.timedelta(days=DAYS), who
    assert {who for who, *_ in cases} == set(n.gifts)  # and nothing else was ever suspected

    # -- the deferred counts add up ----------------------------------------------------------
    deferred = {(r, reason): int(a) for r, reason, a in deferrals}
    outcomes = {(r, o): int(c) for r, o, c in item_outcomes}
    for day, run_id in n.nightly_runs.items():
        run = n.run(run_id)
        plan = run.coverage["plan"]  # type: ignore[index]
        active = plan["active"]
        window = dt.datetime.fromisoformat(plan["deadline_at"]) - dt.datetime.fromisoformat(
            plan["window_start"]
        )
        expected = coverage.nightly_capacity(n.settings, window.total_seconds())
        assert plan["capacity"] == run.capacity == expected
        assert 600 <= expected <= 700  # 0.64 / 1.05 x 0.95 x (20 min less what has passed)
        assert run.planned == min(active, expected)
        capacity_deferred = deferred.get((run_id, "capacity"), 0)
        assert run.planned + capacity_deferred == active, day
        left = deferred.get((run_id, "deadline"), 0) + deferred.get((run_id, "superseded"), 0)
        assert outcomes.get((run_id, "deferred"), 0) == left, day
        assert run.ok + run.unobservable + run.error + left == run.planned, day
        assert run.deferred == capacity_deferred + left, day
        assert len(seen.get(run_id, ())) == run.ok == active - run.deferred, day
    four, six = n.run(n.nightly_runs[4]), n.run(n.nightly_runs[6])
    assert (four.status, four.ok) == ("incomplete", 3 * BATCH)
    assert deferred[(four.id, "deadline")] == four.planned - 3 * BATCH
    assert (six.status, six.ok) == ("incomplete", 3 * BATCH)
    assert deferred[(six.id, "superseded")] == six.planned - 3 * BATCH
    assert six.coverage["closed_by_run_id"] == n.nightly_runs[7]  # type: ignore[index]

    # -- the coverage each night closed with ------------------------------------------------
    final = n.run(last.run_id)
    assert final.coverage_verdict == coverage.COVERED
    report = final.coverage
    assert report is not None
    assert report["active"] == len(n.accounts)
    assert report["observed_share"]["7d"] == 1.0
    assert report["moved"]["not_observed"] == 0 and report["moved"]["observed"] >= PAYMENTS
    assert report["oldest_age_s"]["max"] <= DAYS * 86400
    assert report["never_observed"] == 0
    # The first nights could not yet have seen everyone: behind, never impossible.
    assert n.run(n.nightly_runs[1]).coverage_verdict == coverage.BEHIND

    # -- and the statement says it, each figure with its window --------------------------
    with n.db() as session:
        st = build_statement(session, DAY0 + dt.timedelta(days=11), calendar=n.settings.calendar)
    assert st.run.coverage == report and st.run.capacity == final.capacity
    text = render(st, "table")
    assert "covered; of" in text and "observed ok in the last 1 / 7 / 30 days" in text
    assert "100.0% / 100.0%" in text  # 7 and 30 days
    assert f"{report['moved']['observed']} observed ok tonight, 0 not" in text
    assert as_dict(st)["run"]["coverage"]["observed_share"]["7d"] == 1.0
    with n.db() as session:
        six = build_statement(session, DAY0 + dt.timedelta(days=6), calendar=n.settings.calendar)
    assert six.run.coverage is not None
    superseded = six.run.coverage["deferred"]["superseded"]
    assert f"superseded {superseded}" in render(six, "table")
