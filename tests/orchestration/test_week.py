"""A week in the life: seven business days in Asia/Shanghai under a controllable clock.

Real Postgres, the real simulator over HTTP, the production fetch/store/compare path
(`worker.recon.runs.drive`, `run_batch`), the production planners (nightly start, payment
recheck, confirm pass, late-ledger rechecks) and the statement. The clock every one of them
reads (`worker.business_calendar.utcnow`) is the test's: each step happens at a chosen local
time. What depends on Celery itself (beat firing in RECON_TIMEZONE, the message keeping its
date) is tested with real processes in test_beat_calendar.py.

The week, RECON_NIGHTLY_AT 23:50, settle window 300 s, tolerated skew 120 s:
- every day at 10:00 a top-up of 60 by R, booked on both sides;
- day 2: M gets a gift from Midas that the ledger never books (a real difference); at 15:00
  L spends 30 at Midas whose ledger row only arrives in a file imported on day 3 at 09:00;
  at 23:49:30 P tops up 300: the game books it, Midas applies it just after the nightly
  fetched P (a payment in flight across the day boundary);
- day 3: the start of the nightly is delivered at 00:10 on day 4, without a date, and still
  makes day 3's run; G's game server, its clock 7 min ahead, books a top-up at "12:07" that
  Midas applies at 12:00 (written directly into the ledger, past the intake's check);
- day 4: no nightly at all; it is backfilled on day 6 at 10:00, after day 5's, and B tops up
  90 on day 6 at 08:00, between day 5's fetch and the backfill's;
- day 5: `present_sum` is removed from RECON_CHECKS;
- day 6: E's fetch fails every attempt: the night is incomplete;
- day 7: an ordinary night.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, text

from tests.orchestration.conftest import Clock
from worker.business_calendar import FutureDate
from worker.config import Settings, load_settings
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.ledger import LedgerRow, import_entries, last_id
from worker.db.models import BalanceSnapshot, MismatchCase, MismatchEvent, Run
from worker.db.session import session_scope
from worker.midas.errors import RetryableError
from worker.midas.limiter import make_limiter
from worker.midas.types import Balance
from worker.recon import rechecks, runs
from worker.recon.fetch import RetryPolicy
from worker.recon.intake import read_ledger_csv
from worker.reports.statement import build_statement
from worker.simulator import SimConfig, Simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TZ = ZoneInfo("Asia/Shanghai")
WEEK = [dt.date(2026, 11, 2) + dt.timedelta(days=i) for i in range(7)]  # Monday to Sunday
D = dict(enumerate(WEEK, start=1))
PLAYERS = ("R", "M", "L", "P", "G", "B", "E", "Q1", "Q2", "Q3")
Z = "1"
CHECKS_WITHOUT_PRESENT = (
    '{"balance": {"midas_field": "balance", "ledger": {"save": 1, "present": 1, "cost": -1, '
    '"cancel": 1}}, "save_sum": {"midas_field": "save_sum", "ledger": {"save": 1}}, '
    '"cost_sum": {"midas_field": "cost_sum", "ledger": {"cost": 1, "cancel": -1}}}'
)


def local(day: int, hhmmss: str) -> dt.datetime:
    return dt.datetime.combine(D[day], dt.time.fromisoformat(hhmmss), tzinfo=TZ).astimezone(dt.UTC)


@dataclass
class Books:
    """Both sides as the test itself keeps them: the model the statements are checked on."""

    midas: list[tuple[str, dt.datetime, str, int]] = field(default_factory=list)
    ledger: list[tuple[str, dt.datetime, str, int]] = field(default_factory=list)

    def balance_at(self, who: str, moment: dt.datetime) -> int:
        sign = {"save": 1, "present": 1, "cost": -1, "cancel": 1}
        return sum(sign[k] * a for w, t, k, a in self.midas if w == who and t <= moment)

    def flows(self, who: str, after: dt.datetime, until: dt.datetime) -> Counter[str]:
        out: Counter[str] = Counter()
        for w, t, kind, amount in self.ledger:
            if w == who and after < t <= until:
                out[kind] += amount
        return out


class FailFor:
    """The Midas client, except that one openid never gets an answer (a -1 every time)."""

    def __init__(self, inner: Any, openid: str) -> None:
        self.inner, self.openid = inner, openid

    def get_balance(
        self, openid: str, zone_id: str = "1", session_key: str | None = None
    ) -> Balance:
        if openid == self.openid:
            raise RetryableError("system error", errcode=-1)
        result: Balance = self.inner.get_balance(openid, zone_id, session_key)
        return result


class Week:
    def __init__(self, url: str, sim: Simulator, clock: Clock) -> None:
        self.url, self.sim, self.clock = url, sim, clock
        self.env = {
            "DATABASE_URL": url,
            "MIDAS_API_BASE": sim.base_url,
            "MIDAS_API_VERSION": "v1",
            "MIDAS_APPID": "wxsim0000000000",
            "MIDAS_APP_SECRET": "sim-app-secret",
            "MIDAS_OFFER_ID": "1450000000",
            "MIDAS_APP_KEY": "sim-sandbox-appkey",
            "MIDAS_RATE_LIMIT": "500",
            "RECON_TIMEZONE": "Asia/Shanghai",
            "RECON_NIGHTLY_AT": "23:50",
            "RECON_SETTLE_SECONDS": "300",
            "RECON_CLOCK_SKEW_SECONDS": "120",
        }
        self.books = Books()
        self.bills = itertools.count(1)
        self.failing: str | None = None
        self.db = partial(session_scope, url)
        self._settings = load_settings(self.env)

    @property
    def settings(self) -> Settings:
        return self._settings

    def set_env(self, **changes: str) -> None:
        self.env.update(changes)
        self._settings = load_settings(self.env)

    def deps(self) -> runs.FetchDeps:
        deps = runs.FetchDeps.from_settings(self.settings, limiter=make_limiter(self.settings))
        deps.policy = RetryPolicy(base_s=0.001, cap_s=0.002)
        if self.failing:
            deps.source = FailFor(deps.source, self.failing)
        return deps

    # -- both sides -------------------------------------------------------------------------

    def midas(self, who: str, kind: str, amount: int, at: dt.datetime) -> str:
        bill = f"W{next(self.bills):06d}"
        {"save": self.sim.save, "present": self.sim.present, "cost": self.sim.pay}[kind](
            who, Z, amount, bill
        )
        self.books.midas.append((who, at, kind, amount))
        return bill

    def ledger(self, who: str, kind: str, amount: int, occurred: dt.datetime, bill: str) -> None:
        """A row the game writes directly into ledger_entries (not through the intake)."""
        with self.db() as session:
            import_entries(session, [LedgerRow(bill, who, Z, kind, amount, occurred)])
        self.books.ledger.append((who, occurred, kind, amount))

    def both(self, who: str, kind: str, amount: int, at: dt.datetime) -> None:
        self.clock.set(at)
        self.ledger(who, kind, amount, at, self.midas(who, kind, amount, at))

    # -- the worker's steps -----------------------------------------------------------------

    def nightly(self, delivered: dt.datetime, business_date: dt.date | None = None) -> Run:
        """A nightly start as beat sends it (with its date) or, without one, as an old message
        would arrive; planned and driven to its end."""
        self.clock.set(delivered)
        with self.db() as session:
            started = runs.start_nightly(
                session, self.settings, business_date=business_date, trigger="beat"
            )
        runs.drive(self.db, self.deps(), started.run_id, size=50)
        return self.run(started.run_id)

    def confirm_pass(self, at: dt.datetime) -> int:
        self.clock.set(at)
        with self.db() as session:
            batches = rechecks.plan_confirm_pass(session, self.settings, size=50)
        if batches:
            runs.drive(self.db, self.deps(), batches[0].run_id, size=50, first=batches)
        return sum(len(b.account_ids) for b in batches)

    def payment_recheck(self, who: str, at: dt.datetime) -> None:
        self.clock.set(at)
        request = rechecks.validate_recheck(who, Z, "payment")
        with self.db() as session:
            batch = rechecks.plan_recheck(session, self.settings, request)
        runs.drive(self.db, self.deps(), batch.run_id, size=50, first=[batch])

    def import_late_file(self, path: Any, at: dt.datetime) -> int:
        """`midas-recon ledger import` in embedded mode: import, then recheck what it staled."""
        self.clock.set(at)
        with self.db() as session:
            before = last_id(session)
            import_entries(session, read_ledger_csv(path, calendar=self.settings.calendar))
        with self.db() as session:
            batches = rechecks.plan_late_ledger_rechecks(
                session, self.settings, after_id=before, size=50
            )
        if batches:
            runs.drive(self.db, self.deps(), batches[0].run_id, size=50, first=batches)
        return sum(len(b.account_ids) for b in batches)

    def run(self, run_id: int) -> Run:
        with self.db() as session:
            run = session.get(Run, run_id)
            assert run is not None
            session.expunge(run)
            return run

    def cases(self) -> dict[tuple[str, str], str]:
        with self.db() as session:
            rows = session.execute(
                select(MismatchCase.openid, MismatchCase.check, MismatchCase.status)
            )
            return {(o, c): s for o, c, s in rows}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock.install(monkeypatch, local(1, "00:00:00"))


@pytest.fixture
def week(db_url: str, clock: Clock) -> Iterator[Week]:
    sim = Simulator(SimConfig())
    sim.start()
    try:
        yield Week(db_url, sim, clock)
    finally:
        sim.stop()


def test_a_week_in_the_life(week: Week, clock: Clock, tmp_path: Any) -> None:
    w = week
    # Before the week: every player has history that agrees on both sides.
    start = local(1, "00:00:00") - dt.timedelta(days=3)
    clock.now = start
    for n, who in enumerate(PLAYERS):
        w.sim.add_player(who, Z, save=0, present=0, cost=0)
        w.both(who, "save", 1000 + 10 * n, start + dt.timedelta(minutes=n))
    with w.db() as session:
        upsert_accounts(session, [AccountRow(p, Z, last_active_at=start) for p in PLAYERS])
    nights: dict[int, Run] = {}

    # Day 1: an ordinary day.
    w.both("R", "save", 60, local(1, "16:00:00"))
    nights[1] = w.nightly(local(1, "23:50:00"), D[1])
    assert w.confirm_pass(local(2, "00:00:00")) == 0

    # Day 2: a real difference, a spend whose ledger row comes late, a payment in flight.
    w.midas("M", "present", 50, local(2, "11:00:00"))  # the ledger never books it
    l_bill = w.midas("L", "cost", 30, local(2, "15:00:00"))  # booked by a file on day 3
    w.both("R", "save", 60, local(2, "16:00:00"))
    clock.set(local(2, "23:49:30"))
    w.ledger("P", "save", 300, local(2, "23:49:30"), "P-inflight")
    nights[2] = w.nightly(local(2, "23:50:00"), D[2])
    w.midas("P", "save", 300, local(2, "23:50:30"))  # Midas applies it only now
    assert w.confirm_pass(local(3, "00:00:00")) == 3  # M, L and P
    cases = w.cases()
    assert cases[("P", "save_sum")] == "cleared" and cases[("M", "present_sum")] == "confirmed"
    assert cases[("L", "cost_sum")] == "confirmed"  # true until the file arrives

    # Day 3: the late file, a game clock ahead, a future date, a late nightly message.
    late = tmp_path / "late.csv"
    late.write_text(
        "bill_no,openid,zone_id,kind,amount,occurred_at\n"
        f"{l_bill},L,1,cost,30,{local(2, '15:00:00').astimezone(TZ).isoformat()}\n"
    )
    w.books.ledger.append(("L", local(2, "15:00:00"), "cost", 30))
    assert w.import_late_file(late, local(3, "09:00:00")) == 1  # L only
    assert w.cases()[("L", "cost_sum")] == "resolved"
    clock.set(local(3, "12:00:00"))
    g_bill = w.midas("G", "save", 680, local(3, "12:00:00"))
    w.ledger("G", "save", 680, local(3, "12:07:00"), g_bill)  # the game's clock: 7 min ahead
    w.payment_recheck("G", local(3, "12:00:05"))
    assert w.cases()[("G", "save_sum")] == "suspected"
    assert w.confirm_pass(local(3, "12:05:10")) == 1  # the row is within the skew: held
    assert w.cases()[("G", "save_sum")] == "suspected"
    assert w.confirm_pass(local(3, "12:10:15")) == 1  # settled: the books agree
    assert w.cases()[("G", "save_sum")] == "cleared"
    w.both("R", "save", 60, local(3, "16:00:00"))
    with pytest.raises(FutureDate), w.db() as session:
        runs.start_nightly(session, w.settings, business_date=D[5], trigger="cli")
    # Day 3's start reaches a worker at 00:10 on day 4, without a date: still day 3's run.
    nights[3] = w.nightly(local(4, "00:10:00"))

    # Day 4: no nightly (backfilled on day 6).
    assert w.confirm_pass(local(4, "00:20:00")) == 0
    w.both("R", "save", 60, local(4, "16:00:00"))

    # Day 5: present_sum leaves RECON_CHECKS.
    w.both("R", "save", 60, local(5, "16:00:00"))
    w.set_env(RECON_CHECKS=CHECKS_WITHOUT_PRESENT)
    nights[5] = w.nightly(local(5, "23:50:00"), D[5])
    assert w.cases()[("M", "present_sum")] == "resolved"
    assert w.confirm_pass(local(5, "23:59:00")) == 0

    # Day 6: a top-up between day 5's fetch and the backfill of day 4; E never answers.
    w.both("B", "save", 90, local(6, "08:00:00"))
    clock.set(local(6, "10:00:00"))
    with w.db() as session:
        backfill = runs.start_nightly(session, w.settings, business_date=D[4], trigger="cli")
    assert backfill.created and backfill.later_runs == (D[5],)
    runs.drive(w.db, w.deps(), backfill.run_id, size=50)
    nights[4] = w.run(backfill.run_id)
    w.both("R", "save", 60, local(6, "16:00:00"))
    w.failing = "E"
    nights[6] = w.nightly(local(6, "23:50:00"), D[6])
    w.failing = None
    assert w.confirm_pass(local(6, "23:59:00")) == 0

    # Day 7: an ordinary day again.
    w.both("R", "save", 60, local(7, "16:00:00"))
    nights[7] = w.nightly(local(7, "23:50:00"), D[7])
    assert w.confirm_pass(local(7, "23:59:00")) == 0
    clock.set(local(7, "23:59:59") + dt.timedelta(hours=1))  # the week is over

    # -- the runs -----------------------------------------------------------------------
    assert {d: nights[d].business_date for d in nights} == {d: D[d] for d in nights}
    assert nights[3].business_date == D[3]  # delivered on day 4, still day 3's
    for d, run in nights.items():
        expected = "incomplete" if d == 6 else "complete"
        assert (run.status, run.planned) == (expected, len(PLAYERS)), d
    assert nights[6].error == 1

    # -- the cases: exactly the planted difference is left confirmed ---------------------
    final = w.cases()
    open_cases = {k: s for k, s in final.items() if s in ("suspected", "confirmed", "acknowledged")}
    assert open_cases == {("M", "balance"): "confirmed"}
    assert final[("M", "present_sum")] == "resolved"  # its check was removed on day 5
    assert final[("P", "save_sum")] == final[("P", "balance")] == "cleared"
    assert final[("G", "save_sum")] == final[("G", "balance")] == "cleared"
    assert final[("L", "cost_sum")] == final[("L", "balance")] == "resolved"  # the late file
    with w.db() as session:
        notes = dict(
            session.execute(
                select(MismatchCase.openid, MismatchEvent.note)
                .join(MismatchEvent, MismatchEvent.case_id == MismatchCase.id)
                .where(MismatchEvent.note.is_not(None), MismatchCase.check == "present_sum")
            ).all()
        )
        assert "no longer in RECON_CHECKS" in notes["M"]
        # The confirm pass fetched each account as often as the settle logic allows: once
        # per due case, G twice (its first re-fetch was held by the skew).
        confirm_fetches = Counter(
            session.execute(
                select(BalanceSnapshot.openid)
                .join(Run, Run.id == BalanceSnapshot.run_id)
                .where(Run.kind == "confirm")
            ).scalars()
        )
    assert confirm_fetches == {"M": 1, "L": 1, "P": 1, "G": 2}

    # -- each day's statement against the test's own books -------------------------------
    residuals = {}
    for day in range(1, 8):
        with w.db() as session:
            st = build_statement(session, D[day], calendar=w.settings.calendar)
        assert st.run.id == nights[day].id and not st.partial
        if day == 1:
            assert st.previous_run is None and st.total.residual is None
            continue
        assert st.previous_run is not None and st.previous_run.id == nights[day - 1].id
        expected = expected_statement(w, nights[day - 1].id, nights[day].id)
        got = {k: getattr(st.total, k) for k in expected}
        assert got == expected, day
        residuals[day] = st.total.residual
        start_day, end_day = w.settings.calendar.day_bounds(D[day])
        day_rows = [(k, a) for _, t, k, a in w.books.ledger if start_day <= t < end_day]
        assert st.total.day_save == sum(a for k, a in day_rows if k == "save"), day
        assert st.total.day_cost == sum(a for k, a in day_rows if k == "cost"), day
    # Day 2: M's gift (+50) and P's top-up in flight (-300); day 3: P settled (+300).
    assert residuals == {2: -250, 3: 300, 4: 0, 5: 0, 6: 0, 7: 0}
    # The views BI tools read give the same residuals, the backfilled pair included.
    with w.db() as session:
        views = dict(
            session.execute(
                text("SELECT business_date, SUM(residual) FROM v_run_movement GROUP BY 1")
            ).all()
        )
    assert {d: views[D[d]] for d in residuals} == residuals


def expected_statement(w: Week, previous_id: int, current_id: int) -> dict[str, int]:
    """The coin statement of two runs, from the test's books and the runs' fetch times."""
    with w.db() as session:
        times: dict[int, dict[str, dt.datetime]] = {}
        for run_id in (previous_id, current_id):
            rows = session.execute(
                select(BalanceSnapshot.openid, BalanceSnapshot.fetched_at).where(
                    BalanceSnapshot.run_id == run_id, BalanceSnapshot.status == "ok"
                )
            )
            times[run_id] = {str(who): at for who, at in rows}
    both = sorted(set(times[previous_id]) & set(times[current_id]))
    opening = closing = 0
    flows = dict.fromkeys(("save", "present", "cost", "cancel"), 0)
    for who in both:
        t0, t1 = times[previous_id][who], times[current_id][who]
        opening += w.books.balance_at(who, t0)
        closing += w.books.balance_at(who, t1)
        # A backfilled previous run fetched later: the window runs backwards, negatively.
        sign, window = (1, (t0, t1)) if t0 <= t1 else (-1, (t1, t0))
        for kind, amount in w.books.flows(who, *window).items():
            flows[kind] += sign * amount
    expected_closing = opening + flows["save"] + flows["present"] - flows["cost"] + flows["cancel"]
    return {
        "compared": len(both),
        "opening_balance": opening,
        "top_ups": flows["save"],
        "gifts": flows["present"],
        "spends": flows["cost"],
        "cancels": flows["cancel"],
        "closing_balance": closing,
        "residual": closing - expected_closing,
    }
