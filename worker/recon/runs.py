"""Runs: plan, claim, fetch a batch, finalize (PRODUCT.md §6), with or without Celery.

A run's plan is its items in Postgres (pending -> claimed -> done). The pump claims a few
batches at a time, so the broker only ever holds batches of ids; a batch fetches its items
outside any transaction, then stores their snapshots and marks them done in one
transaction. What makes a crash or a redelivery harmless:

- a batch only works on items still held by the claim its message carries (worker.db.runs);
  a message delivered again after its worker died carries the same claim and carries on;
- a claim whose batch is dead goes back to pending: the caller of `pump` says which claims
  are alive (the Celery tasks keep a Redis key per claim, refreshed while the batch runs);
  a claim older than STALE_CLAIM_S goes back in any case;
- items are done only in the transaction that stored their snapshot, and the snapshot's
  unique key (run, account) refuses a second one: a batch that lost its claim meanwhile
  stores nothing.

`run_embedded` drives the same functions in one process, for the embedded mode (no Redis).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.config import Settings
from worker.db import coverage as cov_repo
from worker.db import night_figures
from worker.db import runs as repo
from worker.db.crypto import SessionKeyCipher, UndecryptableSessionKey
from worker.db.models import Run
from worker.db.session import session_scope
from worker.db.snapshots import VALUE_FIELDS, SnapshotRow, StoredSnapshot, insert_snapshots
from worker.metrics import NIGHTLY_DEFERRED, RUN_ITEMS_DONE, SNAPSHOTS
from worker.midas.errors import RunStopper
from worker.recon import coverage
from worker.recon.batches import Batch
from worker.recon.cases import (
    close_cases_of_removed_checks,
    park_unobserved,
    reconcile_snapshots,
)
from worker.recon.fetch import (
    BalanceSource,
    FetchOutcome,
    FetchPool,
    FetchReport,
    FetchTarget,
    RetryPolicy,
    describe,
    fetch_all,
)
from worker.recon.rules import Check, checks_from_settings
from worker.vocabulary import RunKind, RunStatus, SnapshotStatus

if TYPE_CHECKING:
    import redis as redis_lib

    from worker.midas.limiter import Limiter

log = logging.getLogger(__name__)

Db = Callable[[], AbstractContextManager[Session]]

# The last resort for claims whose liveness nobody can tell: a batch is killed at its hard
# time limit (worker.celery_app.FETCH_HARD_LIMIT_S, 330 s), and a batch message waits in the
# short nightly queue far less than the rest.
STALE_CLAIM_S = 900
# A claim younger than this is never judged dead: its planner may not have published its
# liveness yet (it does so after the commit).
CLAIM_GRACE_S = 10
# Embedded mode cannot see other processes' batches: a claim it did not make is dead once
# any batch would have reached its deadline and stored its results.
EMBEDDED_STALE_S = 300
# An account whose batch died this many times (a poison answer that kills the process?) is
# stored as `error` instead of being handed to the next worker to kill.
MAX_BATCH_DEATHS = 5
# Seconds of the fleet's rate one batch holds: short batches free a process often, which is
# when a waiting recheck gets it, and a killed batch loses little.
BATCH_SECONDS = 2.0
MIN_BATCH, MAX_BATCH = 20, 200
# Little's law: in-flight ≈ rate x latency. Midas answers in ~0.1-0.3 s; planning for 0.5 s
# keeps the limiter's schedule full through slow spells without thousands of idle threads.
ASSUMED_LATENCY_S = 0.5
# Part of a fetch batch's soft time limit (300 s) kept for the work after its deadline: a
# 45011 pause (up to a minute), the attempts in flight, and storing the results.
_AFTER_DEADLINE_S = 60 + 15


def batch_size(settings: Settings) -> int:
    return max(MIN_BATCH, min(MAX_BATCH, round(settings.MIDAS_RATE_LIMIT * BATCH_SECONDS)))


def fetch_threads(settings: Settings) -> int:
    """Threads of one process's fetch pool (see ASSUMED_LATENCY_S).

    At most half the fleet's in-flight cap: the limiter's slots of a process that is killed
    stay taken until their lease runs out (a minute), and the other processes must be able
    to carry on meanwhile.
    """
    wanted = math.ceil(settings.MIDAS_RATE_LIMIT * ASSUMED_LATENCY_S)
    return max(1, min(settings.MIDAS_MAX_IN_FLIGHT // 2, wanted))


def batch_deadline_s(settings: Settings, soft_limit_s: float = 300) -> float:
    """Seconds a batch may start fetches for; the rest is given back to the plan."""
    return max(30.0, soft_limit_s - _AFTER_DEADLINE_S - 2 * settings.MIDAS_TIMEOUT_S)


# -- starting a nightly run -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartResult:
    run_id: int
    business_date: dt.date
    created: bool  # False: the date's run existed (joined)
    status: str  # "planning": it waits for the night before it to finish its batches
    planned: int
    resumed_from: str | None = None  # a failed run put back to running: its old reason
    # A backfill: the nightly runs of later dates that exist already (their statements will
    # compare against this run's balances, fetched after theirs, with a signed window).
    later_runs: tuple[dt.date, ...] = ()
    closed: tuple[int, ...] = ()  # unfinished nightlies this start closed (one night at a time)
    waiting_for: tuple[int, ...] = ()  # closed ones still finishing their batches in flight


def start_nightly(
    session: Session,
    settings: Settings,
    *,
    business_date: dt.date | None = None,
    trigger: str = "beat",
    resume_failed: bool = False,
    now: dt.datetime | None = None,
) -> StartResult:
    """Create and plan the nightly run of a date, or join the one that exists.

    The date is the one the start stands for (a beat message carries it; without one, the
    date of the latest scheduled start, business_calendar.nightly_date_for). A date that has
    not begun is refused (FutureDate): it would observe nothing of that day, and the real
    night would join it. `resume_failed` (an operator, not beat) puts a failed run back to
    running: its pending items continue, nothing done is fetched again.

    One night at a time: an unfinished nightly is closed first (its pending items deferred;
    tonight's plan ranks them as it ranks everyone, and they have aged a day). While its
    batches in flight finish, the new run waits in `planning`; the pump plans it after.
    """
    now = now or clock.utcnow()
    calendar = settings.calendar
    day = business_date or calendar.nightly_date_for(now)
    calendar.require_begun(day, now)
    close_cases_of_removed_checks(session, checks_from_settings(settings), now=now)
    run_id = repo.insert_nightly_run(
        session, day, trigger=trigger, api_version=settings.MIDAS_API_VERSION, now=now
    )
    if run_id is not None:
        closed, waiting = take_the_night(session, settings, run_id, day, now)
        run = _require(session, run_id)
        later = later_nightly_dates(session, day)
        if later:
            log.warning(
                "run_backfill",
                extra={"run_id": run_id, "business_date": day.isoformat(), "later": len(later)},
            )
        return StartResult(
            run_id,
            day,
            True,
            run.status,
            run.planned,
            later_runs=later,
            closed=tuple(closed),
            waiting_for=tuple(waiting),
        )
    existing = repo.nightly_run_id(session, day)
    assert existing is not None  # the conflict says it exists, and runs are never deleted
    resumed = None
    busy: list[int] = []
    if resume_failed:
        # One night at a time: a failed night resumes only when no other is open (an
        # operator's resume must not close tonight's run); it says which one to wait for.
        repo.serialize_nightly_planning(session)
        busy = [i for i, _ in cov_repo.other_open_nightlies(session, existing)]
        resumed = None if busy else repo.resume_failed(session, existing)
        if resumed is not None:
            repo.release_all_claims(session, existing)
            # Its old deadline has passed: it gets a night from now, as a late start does.
            _, deadline = calendar.night_window(day, now)
            cov_repo.set_deadline(session, existing, deadline)
            log.info("run_resumed", extra={"run_id": existing, "previous_reason": resumed})
    run = _require(session, existing)
    counts = repo.item_counts(session, existing)
    blocked = tuple(busy) if run.status == RunStatus.FAILED else ()
    return StartResult(
        existing, day, False, run.status, counts.planned, resumed, waiting_for=blocked
    )


def take_the_night(
    session: Session, settings: Settings, run_id: int, day: dt.date, now: dt.datetime
) -> tuple[list[int], list[int]]:
    """Close the other unfinished nightlies, then plan `run_id` if none is still fetching.

    Returns (closed, still finishing). A closed run stops claiming now, its pending items
    are deferred (`superseded`), and it finalizes as soon as its claimed items are stored.
    """
    repo.serialize_nightly_planning(session)
    closed: list[int] = []
    for other, status in cov_repo.other_open_nightlies(session, run_id):
        if status == RunStatus.PLANNING:
            # Another night waiting to plan: this later start takes its place.
            repo.close_run(
                session,
                other,
                status=RunStatus.INCOMPLETE,
                counts=repo.ItemCounts(),
                now=now,
                reason=f"superseded by nightly run #{run_id} before it could plan",
            )
            closed.append(other)
            continue
        cov_repo.cut_deadline(session, other, now)
        deferred = cov_repo.defer_pending(session, other)
        cov_repo.add_deferrals(session, other, "superseded", deferred)
        NIGHTLY_DEFERRED.labels("superseded").inc(sum(deferred.values()))
        _note_closed_by(session, other, run_id)
        log.warning(
            "run_superseded",
            extra={"run_id": other, "by_run_id": run_id, "deferred": sum(deferred.values())},
        )
        finalize(session, other, now=now)
        closed.append(other)
    waiting = [
        i for i, s in cov_repo.other_open_nightlies(session, run_id) if s == RunStatus.RUNNING
    ]
    if waiting:
        log.info("run_waiting", extra={"run_id": run_id, "waiting_for": waiting})
        return closed, waiting
    plan = coverage.plan_night(session, settings, run_id, day, now)
    repo.refresh_item_statistics(session)
    repo.mark_running(session, run_id, planned=plan.planned, now=now)
    log.info(
        "run_planned", extra={"run_id": run_id, "planned": plan.planned, "kind": RunKind.NIGHTLY}
    )
    if plan.planned == 0:
        finalize(session, run_id, now=now)
    return closed, []


def _note_closed_by(session: Session, run_id: int, by_run_id: int) -> None:
    run = _require(session, run_id)
    noted = dict(run.coverage or {})
    noted["closed_by_run_id"] = by_run_id
    cov_repo.set_coverage(session, run_id, verdict=run.coverage_verdict, coverage=noted)


def later_nightly_dates(session: Session, day: dt.date) -> tuple[dt.date, ...]:
    """Dates after `day` that have a nightly run: a run of `day` made now is a backfill."""
    return tuple(repo.nightly_dates_after(session, day))


# -- the pump ---------------------------------------------------------------------------------


@dataclass
class PumpResult:
    run_id: int
    kind: str
    status: str  # the run's status after this pump
    batches: list[Batch] = field(default_factory=list)
    has_open: bool = True  # pending or claimed items left after this pump
    taken_back: int = 0
    waiting_for: list[int] = field(default_factory=list)  # a waiting nightly: the runs before it
    wake: list[int] = field(default_factory=list)  # nightlies that may plan now this one closed


def pump(
    session: Session,
    run_id: int,
    *,
    room: Callable[[str], int],
    size: int,
    is_alive: Callable[[dt.datetime], bool] | None = None,
    stale_after_s: float = STALE_CLAIM_S,
    now: dt.datetime | None = None,
    settings: Settings | None = None,
) -> PumpResult:
    """Take back dead claims, claim up to `room(kind)` batches, finalize when all is done.

    `is_alive(claim)` tells whether a claim's batch is queued or running; without it only
    claims older than `stale_after_s` are taken back. A nightly waiting for the one before
    it is planned here once that one is closed (`settings` tell its night). From a
    nightly's deadline on nothing new is claimed: the pending items are deferred, the
    batches in flight finish, and the run closes with its coverage verdict.
    """
    now = now or clock.utcnow()
    run = repo.get_run(session, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    result = PumpResult(run_id, run.kind, run.status)
    if run.status == RunStatus.PLANNING and run.kind == RunKind.NIGHTLY and settings is not None:
        _, result.waiting_for = take_the_night(session, settings, run_id, run.business_date, now)
        run = _require(session, run_id)
        result.status = run.status
    if run.status != RunStatus.RUNNING:
        return result
    result.taken_back = taken = take_back_dead_claims(
        session, run_id, is_alive=is_alive, stale_after_s=stale_after_s, now=now
    )
    if taken:
        log.warning("dead_claims_taken_back", extra={"run_id": run_id, "items": taken})
    past_deadline = run.deadline_at is not None and now >= run.deadline_at
    if past_deadline:
        deferred = cov_repo.defer_pending(session, run_id)
        if deferred:
            cov_repo.add_deferrals(session, run_id, "deadline", deferred)
            NIGHTLY_DEFERRED.labels("deadline").inc(sum(deferred.values()))
            log.warning(
                "run_deadline", extra={"run_id": run_id, "deferred": sum(deferred.values())}
            )
    for i in range(0 if past_deadline else max(0, room(run.kind))):
        # One claim per batch (microseconds apart): each batch's liveness is its own.
        claim = now + dt.timedelta(microseconds=i)
        ids = repo.claim_pending(session, run_id, limit=size, claim=claim)
        if not ids:
            break
        result.batches.append(Batch(run_id, ids, claim))
    # Whether anything is left, not how much: a count reads every item of the run, and a
    # pump follows every batch, which made a night quadratic in its size (bench/scale.py).
    result.has_open = bool(result.batches) or repo.has_open_items(session, run_id)
    if not result.has_open:
        closed = finalize(session, run_id, now=now)
        result.status = closed.status if closed else result.status
        if run.kind == RunKind.NIGHTLY and result.status != RunStatus.RUNNING:
            result.wake = [
                i
                for i, s in cov_repo.other_open_nightlies(session, run_id)
                if s == RunStatus.PLANNING
            ]
    return result


def take_back_dead_claims(
    session: Session,
    run_id: int,
    *,
    is_alive: Callable[[dt.datetime], bool] | None,
    stale_after_s: float,
    now: dt.datetime,
) -> int:
    """Items of dead claims back to pending: claims older than `stale_after_s` whatever their
    liveness (the last resort), and settled claims that `is_alive` says are dead."""
    stale = now - dt.timedelta(seconds=stale_after_s)
    settled = now - dt.timedelta(seconds=CLAIM_GRACE_S)
    judged = stale if is_alive is None else max(stale, settled)
    dead = [
        claim
        for claim in repo.claims_before(session, run_id, judged)
        if claim < stale or (is_alive is not None and claim < settled and not is_alive(claim))
    ]
    return repo.take_back_claims(session, run_id, dead)


def finalize(session: Session, run_id: int, *, now: dt.datetime | None = None) -> Run | None:
    """Close a running run whose items are all done: complete, or incomplete if any errored
    or was deferred at the deadline; a nightly closes with its coverage verdict.

    Idempotent and safe beside the last batches: the run row is locked, and a batch still
    writing holds its items claimed until it commits, so they count as open until then.
    """
    now = now or clock.utcnow()
    run = repo.get_run(session, run_id, lock=True)
    if run is None or run.status != RunStatus.RUNNING:
        return run
    counts = repo.item_counts(session, run_id)
    if counts.open:
        return run
    status = (
        RunStatus.COMPLETE if counts.error == 0 and counts.deferred == 0 else RunStatus.INCOMPLETE
    )
    repo.close_run(session, run_id, status=status, counts=counts, now=now)
    if run.kind == RunKind.NIGHTLY:
        coverage.close_coverage(session, run_id, run.coverage, now)
    session.refresh(run)
    # The statement's figures of the night, fixed from now on (and the next date's, which
    # compare with these): written in the close's transaction, so a closed run has them.
    night_figures.store_after_close(session, run, now=now)
    log.info(
        "run_finished",
        extra={
            "run_id": run_id,
            "kind": run.kind,
            "status": status,
            "planned": counts.planned,
            "ok": counts.ok,
            "unobservable": counts.unobservable,
            "error": counts.error,
            "deferred": run.deferred,
            "coverage": run.coverage_verdict,
            "mismatches_opened": run.mismatches_opened,
        },
    )
    return run


def fail_run(session: Session, run_id: int, reason: str, *, now: dt.datetime | None = None) -> None:
    """Stop a run as failed (every further call would fail too); its plan stays for a resume."""
    run = repo.get_run(session, run_id, lock=True)
    if run is None or run.status != RunStatus.RUNNING:
        return
    counts = repo.item_counts(session, run_id)
    now = now or clock.utcnow()
    repo.close_run(session, run_id, status=RunStatus.FAILED, counts=counts, now=now, reason=reason)
    # The next date's stored movement compared with this run while it ran: store it again.
    night_figures.store_after_close(session, _require(session, run_id), now=now)
    log.error("run_failed", extra={"run_id": run_id, "reason": reason})


# -- one batch ----------------------------------------------------------------------------------


@dataclass
class FetchDeps:
    """What a batch needs besides the database; built once per process."""

    source: BalanceSource
    api_version: str
    checks: Sequence[Check]
    settle_seconds: int
    skew: dt.timedelta  # the tolerated clock skew (business_calendar)
    threads: int
    deadline_s: float
    cipher: SessionKeyCipher | None = None  # set when session keys are sent (v2, mp_sig)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    # What a waiting nightly is planned with when this process's pump starts it (drive).
    settings: Settings | None = None
    # `threads` fetch threads that serve every batch of this process (made on first use).
    pool: FetchPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pool = FetchPool(self.threads)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, limiter: Limiter, redis: redis_lib.Redis | None = None
    ) -> FetchDeps:
        """ConfigError (one line) when a setting the fetch needs is missing."""
        from worker.midas.client import MidasClient
        from worker.midas.token import make_token_provider

        tokens = make_token_provider(settings, redis=redis)
        needs_keys = settings.MIDAS_API_VERSION == "v2" or settings.MIDAS_SEND_MP_SIG
        return cls(
            source=MidasClient.from_settings(settings, limiter=limiter, tokens=tokens),
            api_version=settings.MIDAS_API_VERSION,
            checks=checks_from_settings(settings),
            settle_seconds=settings.RECON_SETTLE_SECONDS,
            skew=settings.calendar.skew,
            threads=fetch_threads(settings),
            deadline_s=batch_deadline_s(settings),
            cipher=SessionKeyCipher.from_settings(settings) if needs_keys else None,
            settings=settings,
        )


@dataclass
class BatchResult:
    run_id: int
    kind: str | None = None  # None: the run is gone or not running; nothing was done
    done: int = 0
    released: int = 0
    skipped: int = 0  # ids of the message this batch no longer held (done, or re-claimed)
    stopped: str | None = None  # the run failed on this batch: why
    confirm_due: dt.datetime | None = None  # the latest confirming re-fetch this batch needs


def run_batch(
    db: Db, deps: FetchDeps, run_id: int, account_ids: Sequence[int], claim: dt.datetime
) -> BatchResult:
    """Fetch and store one batch: start it, fetch (no transaction open), store, reconcile.

    Two short transactions, so no database lock is held while waiting for Midas.
    """
    with db() as session:
        started = _start_batch(session, run_id, account_ids, claim)
    if started is None:
        return BatchResult(run_id, skipped=len(account_ids))
    result = BatchResult(run_id, started.kind, skipped=len(account_ids) - len(started.items))
    if not started.items:
        return result

    fetch_started = time.monotonic()
    report = _fetch_batch(deps, started.items)
    fetched = time.monotonic()
    with db() as session:
        stored = _store_answers(session, deps, run_id, started, report.outcomes, claim)
        result.released = _release_unfetched(
            session, run_id, report.unfetched, stored.held, account_ids, claim
        )
        result.confirm_due = _reconcile_fresh(
            session, deps, run_id, started.business_date, stored.snapshots
        )
        _park_fresh_unobserved(session, stored)
        if report.stopper is not None:
            result.stopped = _stop_run(session, run_id, report.stopper)
    _count_stored(started.kind, stored)
    result.done = len(stored.mine)
    log.info(
        "batch_stored",
        extra={
            "run_id": run_id,
            "done": result.done,
            "released": result.released,
            "fetch_s": round(fetched - fetch_started, 3),
            "store_s": round(time.monotonic() - fetched, 3),
        },
    )
    return result


@dataclass(frozen=True, slots=True)
class _Started:
    """A batch whose run is running: its items, claimed by this message (maybe none)."""

    kind: str
    business_date: dt.date
    items: Sequence[repo.ItemToFetch]


@dataclass(frozen=True, slots=True)
class _Stored:
    """What the store step wrote: the answers of the items this batch still held."""

    held: Container[int]  # account ids still claimed by this batch
    mine: list[FetchOutcome]  # the outcomes of those accounts
    snapshots: list[StoredSnapshot]  # the snapshot stored (or already there) for each
    by_account: dict[tuple[str, str], StoredSnapshot]  # the same, by (openid, zone_id)

    def is_new(self, outcome: FetchOutcome) -> bool:
        """Its snapshot was inserted now (not by an earlier delivery of the batch)."""
        return self.by_account[outcome.target.openid, outcome.target.zone_id].new


def _start_batch(
    session: Session, run_id: int, account_ids: Sequence[int], claim: dt.datetime
) -> _Started | None:
    """Start the items this message still holds; None when the run is gone or not running."""
    run = repo.get_run(session, run_id)
    if run is None or run.status != RunStatus.RUNNING:
        return None
    items = repo.start_items(session, run_id, account_ids, claim=claim)
    if not items:  # a copy of a batch that stored, or whose claim was taken back
        repo.close_claim(session, run_id, account_ids, claim=claim)
    return _Started(run.kind, run.business_date, items)


def _fetch_batch(deps: FetchDeps, items: Sequence[repo.ItemToFetch]) -> FetchReport:
    """Ask Midas about the items (no transaction open); the given-up ones are errors unasked."""
    # `attempts` counts this start too: the batches before it that died are one fewer.
    given_up = [i for i in items if i.attempts - 1 >= MAX_BATCH_DEATHS]
    targets = [_target(deps, i) for i in items if i.attempts - 1 < MAX_BATCH_DEATHS]
    report = fetch_all(
        deps.source,
        targets,
        pool=deps.pool,
        deadline=time.monotonic() + deps.deadline_s,
        policy=deps.policy,
    )
    given_up_outcomes = [
        FetchOutcome(
            FetchTarget(i.account_id, i.openid, i.zone_id),
            SnapshotStatus.ERROR,
            clock.utcnow(),
            errmsg=f"given up: {i.attempts - 1} batches died while fetching this account",
        )
        for i in given_up
    ]
    return replace(report, outcomes=report.outcomes + given_up_outcomes)


def _store_answers(
    session: Session,
    deps: FetchDeps,
    run_id: int,
    started: _Started,
    outcomes: Sequence[FetchOutcome],
    claim: dt.datetime,
) -> _Stored:
    """Store the snapshots of the items still held, mark them done, note the answers."""
    held = repo.lock_held(session, run_id, [i.account_id for i in started.items], claim=claim)
    mine = [o for o in outcomes if o.target.account_id in held]
    snapshots = insert_snapshots(
        session, run_id, started.business_date, [_snapshot_row(o, deps.api_version) for o in mine]
    )
    stored = _Stored(held, mine, snapshots, {(s.openid, s.zone_id): s for s in snapshots})
    repo.mark_done(
        session,
        run_id,
        {
            o.target.account_id: stored.by_account[o.target.openid, o.target.zone_id].status
            for o in mine
        },
    )
    cov_repo.record_answers(
        session, ((o.target.account_id, o.status, o.fetched_at) for o in mine if stored.is_new(o))
    )
    return stored


def _release_unfetched(
    session: Session,
    run_id: int,
    unfetched: Sequence[FetchTarget],
    held: Container[int],
    account_ids: Sequence[int],
    claim: dt.datetime,
) -> int:
    """Give the held accounts not tried back to the plan and close the claim; how many."""
    back = [t.account_id for t in unfetched if t.account_id in held]
    repo.release(session, run_id, back)
    repo.close_claim(session, run_id, account_ids, claim=claim)  # it holds nothing now
    return len(back)


def _reconcile_fresh(
    session: Session,
    deps: FetchDeps,
    run_id: int,
    business_date: dt.date,
    snapshots: Sequence[StoredSnapshot],
) -> dt.datetime | None:
    """Compare the new `ok` snapshots with the ledger; the latest confirming re-fetch due."""
    fresh_ok = [s.id for s in snapshots if s.new and s.status == SnapshotStatus.OK]
    if not fresh_ok:
        return None
    reconciled = reconcile_snapshots(
        session,
        fresh_ok,
        checks=deps.checks,
        settle_seconds=deps.settle_seconds,
        skew=deps.skew,
        now=clock.utcnow(),
        business_date=business_date,
    )
    repo.add_mismatches_opened(session, run_id, reconciled.opened)
    if not reconciled.confirm_due:
        return None
    return max(due for *_, due in reconciled.confirm_due)


def _park_fresh_unobserved(session: Session, stored: _Stored) -> None:
    """Park the accounts newly found unobservable (no live session) for a later recheck."""
    unobserved = [
        (o.target.openid, o.target.zone_id, f"errcode {o.errcode or 'none'}")
        for o in stored.mine
        if o.status == SnapshotStatus.UNOBSERVABLE and stored.is_new(o)
    ]
    if unobserved:
        park_unobserved(session, unobserved, now=clock.utcnow())


def _stop_run(session: Session, run_id: int, stopper: RunStopper) -> str:
    """Fail the run: every further call would fail too. Returns why."""
    reason = describe(stopper)
    if stopper.errcode is not None and str(stopper.errcode) not in reason:
        reason = f"errcode {stopper.errcode}: {reason}"
    fail_run(session, run_id, reason)
    return reason


def _count_stored(kind: str, stored: _Stored) -> None:
    for s in stored.snapshots:
        if s.new:
            SNAPSHOTS.labels(s.status).inc()
    RUN_ITEMS_DONE.labels(kind).inc(len(stored.mine))


def _target(deps: FetchDeps, item: repo.ItemToFetch) -> FetchTarget:
    key = None
    if deps.cipher is not None and item.session_key_enc:
        try:
            key = deps.cipher.decrypt(item.session_key_enc)
        except UndecryptableSessionKey as exc:
            # An `error`, never "no session key": a wrong or rotated-out key must not pass
            # for a clean run full of unobservable accounts.
            log.warning("session_key_undecryptable", extra={"account_id": item.account_id})
            return FetchTarget(item.account_id, item.openid, item.zone_id, key_error=str(exc))
    return FetchTarget(item.account_id, item.openid, item.zone_id, key)


def _snapshot_row(outcome: FetchOutcome, api_version: str) -> SnapshotRow:
    values: tuple[tuple[str, int | bool], ...] = ()
    if outcome.balance is not None:
        values = tuple((name, getattr(outcome.balance, name)) for name in VALUE_FIELDS)
        api_version = outcome.balance.api_version
    return SnapshotRow(
        openid=outcome.target.openid,
        zone_id=outcome.target.zone_id,
        fetched_at=outcome.fetched_at,
        status=outcome.status,
        api_version=api_version,
        errcode=outcome.errcode,
        errmsg=outcome.errmsg,
        values=values,
    )


# -- progress -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunProgress:
    run_id: int
    status: str
    planned: int
    done: int
    ok: int
    unobservable: int
    error: int


def read_progress(session: Session, run_id: int) -> RunProgress:
    run = _require(session, run_id)
    counts = repo.item_counts(session, run_id)
    return RunProgress(
        run_id,
        run.status,
        counts.planned,
        counts.done,
        counts.ok,
        counts.unobservable,
        counts.error,
    )


# -- embedded mode ------------------------------------------------------------------------------


def run_embedded(
    settings: Settings,
    business_date: dt.date | None = None,
    trigger: str = "cli",
    progress: Callable[[RunProgress], None] | None = None,
    *,
    confirm_wait_s: float | None = None,
) -> Run:
    """The nightly run of a date in this process (no Redis): plan or join, fetch, finalize,
    then the confirm pass for the differences it found.

    No beat runs beside the embedded mode, so this waits for the settle window of the cases
    the run opened (`confirm_wait_s`, default RECON_SETTLE_SECONDS + 10) and re-fetches them.
    """
    from worker.midas.limiter import make_limiter
    from worker.recon import rechecks

    db: Db = partial(session_scope, settings.DATABASE_URL)
    limiter = make_limiter(settings)
    deps = FetchDeps.from_settings(settings, limiter=limiter)
    with db() as session:
        started = start_nightly(
            session, settings, business_date=business_date, trigger=trigger, resume_failed=True
        )
    run_id = started.run_id
    drive(db, deps, run_id, size=batch_size(settings), progress=progress)

    wait_s = settings.RECON_SETTLE_SECONDS + 10 if confirm_wait_s is None else confirm_wait_s
    until = clock.utcnow() + dt.timedelta(seconds=wait_s)
    while True:
        with db() as session:
            due = rechecks.last_confirm_due(session, until=until)
        if due is None:
            break
        time.sleep(max(0.0, (due - clock.utcnow()).total_seconds()) + 0.01)
        with db() as session:
            batches = rechecks.plan_confirm_pass(session, settings, size=batch_size(settings))
        if not batches:  # due accounts are in another process's confirm run
            break
        drive(db, deps, batches[0].run_id, size=batch_size(settings), first=batches)

    with db() as session:
        return _require(session, run_id)


def drive(
    db: Db,
    deps: FetchDeps,
    run_id: int,
    *,
    size: int,
    first: Sequence[Batch] = (),
    progress: Callable[[RunProgress], None] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Pump and fetch one run in this process until it is finished (or failed)."""
    pending = list(first)
    while True:
        for batch in pending:
            run_batch(db, deps, batch.run_id, batch.account_ids, batch.claim)
            if progress is not None:
                with db() as session:
                    progress(read_progress(session, run_id))
        with db() as session:
            pumped = pump(
                session,
                run_id,
                room=lambda _kind: 1,
                size=size,
                stale_after_s=EMBEDDED_STALE_S,
                settings=deps.settings,
            )
        if pumped.status == RunStatus.PLANNING and pumped.waiting_for:
            # Waiting for the night before: nobody else pumps it in this mode (its claims
            # are a crashed attempt's, taken back once stale, and then it closes).
            for earlier in pumped.waiting_for:
                with db() as session:
                    pump(
                        session,
                        earlier,
                        room=lambda _kind: 0,
                        size=size,
                        stale_after_s=EMBEDDED_STALE_S,
                    )
            time.sleep(poll_s)
            continue
        if pumped.status != RunStatus.RUNNING:
            if progress is not None:
                with db() as session:
                    progress(read_progress(session, run_id))
            return
        pending = pumped.batches
        if not pending:
            # Claims held by someone else (another process, or a crashed earlier attempt
            # whose claims become stale): wait for them rather than fetch twice.
            time.sleep(poll_s)


def _require(session: Session, run_id: int) -> Run:
    run = repo.get_run(session, run_id)
    if run is None:
        raise LookupError(f"no run {run_id}")
    return run
