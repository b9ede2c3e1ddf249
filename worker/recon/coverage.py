"""A night that fits: what a nightly can fetch before its deadline, which accounts it spends
that on, and the coverage it closes with.

Midas' rate is the worker's physical limit. At planning a nightly computes its capacity
(the limiter's schedule, MIDAS_RATE_LIMIT / (1 + MIDAS_RATE_MARGIN_S), less the share left to
rechecks and confirms, RECON_FAST_LANE_SHARE, over the window to RECON_NIGHTLY_DEADLINE) and
plans the riskiest accounts first:

0. moved: ledger rows since the account was last observed ok (never observed: since it last
   answered; never answered: since it was created or the previous nightly began, the earlier);
1. open case: a suspected, confirmed or acknowledged difference;
2. unseen: never answered, or unobservable when last asked and logged in since;
3. rotation: the rest, the one answered longest ago first.

What does not fit is counted as deferred (`run_deferrals`, reason `capacity`); tomorrow's
plan ranks the same way, so an account deferred tonight has aged a day and comes sooner. The
rotation alone reaches every active account within RECON_FULL_COVERAGE_DAYS when the night
holds at least active / days accounts; the plan says when it does not.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.config import Settings
from worker.db import coverage as repo
from worker.metrics import (
    COVERAGE_MOVED,
    COVERAGE_OBSERVED_SHARE,
    COVERAGE_OLDEST_AGE,
    NIGHTLY_CAPACITY,
    NIGHTLY_DEFERRED,
)
from worker.vocabulary import SnapshotStatus

log = logging.getLogger(__name__)

TIERS = {repo.MOVED: "moved", repo.OPEN_CASE: "open_case", repo.UNSEEN: "unseen"}
TIERS[repo.ROTATION] = "rotation"
# The "observed in the last N days" windows every coverage report gives.
WINDOWS_DAYS = (1, 7, 30)
# A run's coverage verdicts.
COVERED, BEHIND, IMPOSSIBLE = "covered", "behind", "impossible"


def nightly_capacity(settings: Settings, window_s: float) -> int:
    """Accounts a nightly can fetch in `window_s` seconds at the rate it may use."""
    scheduled = settings.MIDAS_RATE_LIMIT / (1 + settings.MIDAS_RATE_MARGIN_S)
    return max(0, math.floor(scheduled * (1 - settings.RECON_FAST_LANE_SHARE) * window_s))


@dataclass(frozen=True, slots=True)
class NightPlan:
    capacity: int
    deadline_at: dt.datetime
    active: int
    planned: int
    deferred: int
    feasible: bool  # the night holds active / RECON_FULL_COVERAGE_DAYS accounts or more
    note: str | None


def plan_night(
    session: Session, settings: Settings, run_id: int, day: dt.date, now: dt.datetime
) -> NightPlan:
    """Plan a nightly by risk within its capacity; count what does not fit."""
    start, deadline = settings.calendar.night_window(day, now)
    capacity = nightly_capacity(settings, clock.age_s(start, deadline))
    active_since = clock.days_before(now, settings.RECON_ACTIVE_DAYS)
    tiers = repo.plan_by_risk(
        session,
        run_id,
        active_since=active_since,
        capacity=capacity,
        previous_night=repo.previous_night_start(session, run_id),
    )
    repo.set_night(session, run_id, capacity=capacity, deadline_at=deadline)
    deferred = repo.add_deferrals(
        session, run_id, "capacity", {t: a - p for t, (a, p) in tiers.items()}
    )
    active = sum(a for a, _ in tiers.values())
    planned = sum(p for _, p in tiers.values())
    days = settings.RECON_FULL_COVERAGE_DAYS
    need = math.ceil(active / days)
    feasible = capacity >= need
    note = None
    if not feasible:
        every = math.ceil(active / capacity) if capacity else None
        note = (
            f"the night holds {capacity} of {active} active accounts: "
            + (f"each is observed at best every {every} days" if every else "none can be")
            + f", not every {days} (RECON_FULL_COVERAGE_DAYS); a faster MIDAS_RATE_LIMIT or a "
            "longer night (RECON_NIGHTLY_AT to RECON_NIGHTLY_DEADLINE) is needed"
        )
        log.warning("coverage_impossible", extra={"run_id": run_id, "note": note})
    plan = {
        "capacity": capacity,
        # The rate the plan leaves to rechecks and confirm passes (their fast lane).
        "fast_lane_share": settings.RECON_FAST_LANE_SHARE,
        "window_start": start.isoformat(),
        "deadline_at": deadline.isoformat(),
        "active_since": active_since.isoformat(),
        "full_coverage_days": days,
        "active": active,
        "planned": planned,
        "needed_per_night": need,
        "feasible": feasible,
        "tiers": {TIERS[t]: {"active": a, "planned": p} for t, (a, p) in sorted(tiers.items())},
    }
    repo.set_coverage(session, run_id, verdict=None, coverage={"plan": plan, "note": note})
    NIGHTLY_CAPACITY.set(capacity)
    NIGHTLY_DEFERRED.labels("capacity").inc(deferred)
    log.info(
        "night_planned",
        extra={
            "run_id": run_id,
            "capacity": capacity,
            "active": active,
            "planned": planned,
            "deferred": deferred,
        },
    )
    return NightPlan(capacity, deadline, active, planned, deferred, feasible, note)


def close_coverage(
    session: Session, run_id: int, coverage: dict[str, Any] | None, now: dt.datetime
) -> str:
    """Measure the coverage a nightly closes with, store it with its verdict, return it.

    Shares and ages are over the accounts active as the run planned them (its `active_since`)
    and count only `ok` observations; the verdict asks whether every active account was
    answered (ok or unobservable: an expired session cannot be observed by asking more often)
    within RECON_FULL_COVERAGE_DAYS, and every account that moved was observed ok tonight.
    """
    coverage = dict(coverage or {})
    plan = coverage.get("plan") or {}
    days = int(plan.get("full_coverage_days", 7))
    active_since = (
        dt.datetime.fromisoformat(plan["active_since"])
        if "active_since" in plan
        else clock.days_before(now, 30)
    )
    windows = {float(d): clock.days_before(now, d) for d in (*WINDOWS_DAYS, days)}
    obs = repo.active_observations(
        session,
        active_since=active_since,
        since=windows,
        answered_since=clock.days_before(now, days),
    )
    outcomes = repo.tier_outcomes(session, run_id)
    moved_items = sum(n for (tier, _), n in outcomes.items() if tier == repo.MOVED)
    moved_ok = outcomes.get((repo.MOVED, SnapshotStatus.OK), 0)
    # Items deferred at the deadline are among the items already: only `capacity` adds.
    moved = moved_items + sum(
        n
        for reason, tier, n in repo.deferrals(session, run_id)
        if tier == repo.MOVED and reason == "capacity"
    )
    share = {
        f"{d}d": (obs.observed_since[float(d)] / obs.active if obs.active else None)
        for d in WINDOWS_DAYS
    }
    ages = {
        name: (None if at is None else round(clock.age_s(at, now)))
        for name, at in obs.oldest.items()
    }
    overdue = obs.active - obs.answered
    deferred: dict[str, int] = {}
    for reason, _, n in repo.deferrals(session, run_id):
        deferred[reason] = deferred.get(reason, 0) + n
    coverage.update(
        {
            "at": now.isoformat(),
            "active": obs.active,
            "never_observed": obs.never,
            "observed_share": share,
            # Seconds since the last ok observation, over active accounts; None where the
            # account at that rank was never observed ok.
            "oldest_age_s": ages,
            "moved": {"accounts": moved, "observed": moved_ok, "not_observed": moved - moved_ok},
            "not_answered_within_days": {"days": days, "accounts": overdue},
            "deferred": deferred,  # by reason: capacity, deadline, superseded
        }
    )
    if moved == moved_ok and overdue == 0:
        verdict = COVERED
    elif plan and not plan.get("feasible", True):
        verdict = IMPOSSIBLE
    else:
        verdict = BEHIND
    repo.set_coverage(session, run_id, verdict=verdict, coverage=coverage)
    for d in WINDOWS_DAYS:
        value = share[f"{d}d"]
        COVERAGE_OBSERVED_SHARE.labels(f"{d}d").set(value if value is not None else 0.0)
    for name, age in ages.items():
        COVERAGE_OLDEST_AGE.labels(name).set(age if age is not None else math.inf)
    COVERAGE_MOVED.labels("yes").set(moved_ok)
    COVERAGE_MOVED.labels("no").set(moved - moved_ok)
    log.info(
        "coverage_closed",
        extra={"run_id": run_id, "verdict": verdict, "active": obs.active, "overdue": overdue},
    )
    return verdict
