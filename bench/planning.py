"""Benchmark 8, planning: a nightly's plan over 1M and 5M accounts, and a modelled week of a
3,000,000-account game at R = 50 (issue 14).

plan: N active accounts in a steady state, seeded in SQL: each last observed ok 0 to 6 days
ago, one in 100 with a ledger row since (moved), one in 1,000 with an open case, one in 200
never answered; two older ledger rows each. Timed: the production `start_nightly` at the
night's fire time (rank every active account, insert the items that fit the capacity, count
the rest), at the default rate (50/s) and window (02:30 to 08:00).

week: the same planner each night over a game just imported (never observed, its history
older than the import, so no movement until the first day); the fetches are
modelled (a real week of fetches cannot run here): every planned account is observed ok at
the night's start, and the run is closed by the production `finalize`, which measures the
coverage. Each day one account in 100 moves (a ledger row at noon). Figures per night: the
capacity, what was planned and deferred, the verdict, the 1/7/30-day shares and the ages.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import database, say, vacuum_analyze, write_result

NAME = "planning"
GOAL_S = 120.0  # planning 5,000,000 accounts
DAY0 = dt.date(2026, 11, 1)

SEED_ACCOUNTS = """
INSERT INTO accounts (openid, zone_id, last_active_at, created_at, updated_at,
                      last_ok_at, last_answer_at)
SELECT 'b' || lpad(a::text, 8, '0'), '1', :now - INTERVAL '1 day', created, created,
       seen, seen
FROM generate_series(1, :n) a,
     LATERAL (SELECT CASE WHEN :steady AND a % 200 <> 0
                          THEN :now - (a % 7) * INTERVAL '1 day' - INTERVAL '1 hour' END) t(seen),
     -- steady: accounts of long standing; a new game: imported now, with their history
     LATERAL (SELECT CASE WHEN :steady THEN :now - INTERVAL '40 days' ELSE :now END) c(created)
"""
SEED_LEDGER = """
INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)
SELECT 'L' || a || '_' || r, 'b' || lpad(a::text, 8, '0'), '1', 'save', 100,
       :now - INTERVAL '8 days' - r * INTERVAL '1 hour'
FROM generate_series(1, :n) a CROSS JOIN generate_series(1, 2) r
"""
SEED_CASES = """
INSERT INTO mismatch_cases (openid, zone_id, "check", status, midas_value, ledger_value, delta,
                            first_seen_at, last_seen_at)
SELECT 'b' || lpad(a::text, 8, '0'), '1', 'balance', 'confirmed', 10, 0, 10, :now, :now
FROM generate_series(1000, :n, 1000) a
"""
# A day's movement: one account in 100, a different hundredth each day.
MOVE = """
INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)
SELECT 'M' || :day || '_' || a, 'b' || lpad(a::text, 8, '0'), '1', 'save', 60, :at
FROM generate_series(1, :n) a WHERE a % 100 = :day % 100
"""
# The modelled fetch: every planned item observed ok at `at`.
OBSERVE = """
UPDATE accounts SET last_ok_at = :at, last_answer_at = :at
FROM run_items i WHERE i.run_id = :run AND i.account_id = accounts.id
"""
DONE = "UPDATE run_items SET state = 'done', outcome = 'ok' WHERE run_id = :run"


def _settings(url: str, rate: float) -> Any:
    from worker.config import load_settings

    return load_settings({"DATABASE_URL": url, "MIDAS_RATE_LIMIT": str(rate)})


def _seed(url: str, n: int, *, steady: bool, now: dt.datetime) -> float:
    started = time.monotonic()
    engine = create_engine(url)
    with engine.begin() as conn:
        args = {"n": n, "now": now, "steady": steady}
        conn.execute(text(SEED_ACCOUNTS), args)
        conn.execute(text(SEED_LEDGER), args)
        conn.execute(text(SEED_CASES), args)
        if steady:
            conn.execute(text(MOVE), {"n": n, "day": 0, "at": now - dt.timedelta(minutes=30)})
    engine.dispose()
    vacuum_analyze(url)
    return round(time.monotonic() - started, 1)


def plan(sizes: list[int], *, rate: float = 50.0) -> dict[str, Any]:
    """Seconds to plan a night over each size of steady-state game."""
    from worker.db.session import session_scope
    from worker.recon.runs import start_nightly

    figures: dict[str, Any] = {}
    for n in sizes:
        with database() as url:
            s = _settings(url, rate)
            now = s.calendar.nightly_fire_at(DAY0)
            seeded = _seed(url, n, steady=True, now=now)
            started = time.perf_counter()
            with session_scope(url) as session:
                result = start_nightly(session, s, business_date=DAY0, now=now)
            took = round(time.perf_counter() - started, 2)
            with session_scope(url) as session:
                run = session.execute(
                    text("SELECT capacity, planned, deferred, coverage FROM runs WHERE id = :r"),
                    {"r": result.run_id},
                ).one()
        figures[str(n)] = {
            "accounts": n,
            "seed_s": seeded,
            "plan_s": took,
            "capacity": run.capacity,
            "planned": run.planned,
            "deferred": run.deferred,
            "tiers": run.coverage["plan"]["tiers"],
        }
        say(NAME, f"plan {n} accounts: {took} s, planned {run.planned}, deferred {run.deferred}")
    return figures


def week(n: int, *, rate: float = 50.0, nights: int = 8) -> dict[str, Any]:
    """A game of n accounts, never observed at first, over `nights` nights at rate R."""
    from worker.db.session import session_scope
    from worker.recon.runs import finalize, start_nightly

    out: list[dict[str, Any]] = []
    with database() as url:
        s = _settings(url, rate)
        seeded = _seed(url, n, steady=False, now=s.calendar.nightly_fire_at(DAY0))
        engine = create_engine(url)
        for d in range(nights):
            day = DAY0 + dt.timedelta(days=d)
            at = s.calendar.nightly_fire_at(day)
            started = time.perf_counter()
            with session_scope(url) as session:
                result = start_nightly(session, s, business_date=day, now=at)
            took = round(time.perf_counter() - started, 1)
            with engine.begin() as conn:
                conn.execute(text(OBSERVE), {"run": result.run_id, "at": at})
                conn.execute(text(DONE), {"run": result.run_id})
            with session_scope(url) as session:
                run = finalize(session, result.run_id, now=s.calendar.nightly_deadline(day))
                assert run is not None and run.coverage is not None
                c = run.coverage
                night = {
                    "business_date": day.isoformat(),
                    "plan_s": took,
                    "capacity": run.capacity,
                    "planned": run.planned,
                    "deferred": run.deferred,
                    "verdict": run.coverage_verdict,
                    "observed_share": c["observed_share"],
                    "oldest_age_h": {
                        k: None if v is None else round(v / 3600, 1)
                        for k, v in c["oldest_age_s"].items()
                    },
                    "moved": c["moved"],
                    "never_observed": c["never_observed"],
                }
            out.append(night)
            say(NAME, f"week {n}: night {d + 1}: {night}")
            noon = s.calendar.local(day, dt.time(12))
            with engine.begin() as conn:
                conn.execute(text(MOVE), {"n": n, "day": d + 1, "at": noon})
        engine.dispose()
    return {"accounts": n, "rate": rate, "seed_s": seeded, "nights": out}


def main(
    sizes: list[int],
    week_accounts: int,
    *,
    rate: float = 50.0,
    nights: int = 8,
    out: Path | None = None,
) -> dict[str, Any]:
    figures: dict[str, Any] = {"goal_s": GOAL_S, "plan": plan(sizes, rate=rate)}
    if week_accounts:
        figures["week"] = week(week_accounts, rate=rate, nights=nights)
    write_result(NAME, figures, out=out)
    return figures
