"""The SQL of a night that fits: ranking active accounts by risk, planning the first N,
counting what was deferred, keeping each account's last observation, measuring coverage.

The planner reads `accounts` (its `last_*_at` columns) plus one index probe per account into
the ledger and the open cases: never `balance_snapshots`, whose size grows with every night.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    SmallInteger,
    Table,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from worker.db.models import Account, LedgerEntry, MismatchCase, Run, RunDeferral, RunItem
from worker.vocabulary import (
    OPEN_CASE_STATUSES,
    ItemOutcome,
    ItemState,
    RunKind,
    RunStatus,
    SnapshotStatus,
)

_accounts = cast(Table, Account.__table__)
_items = cast(Table, RunItem.__table__)
_runs = cast(Table, Run.__table__)
_ledger = cast(Table, LedgerEntry.__table__)
_cases = cast(Table, MismatchCase.__table__)
_deferrals = cast(Table, RunDeferral.__table__)

# The tiers of risk, most urgent first (worker.recon.coverage names them).
MOVED, OPEN_CASE, UNSEEN, ROTATION = 0, 1, 2, 3


def _active(active_since: dt.datetime) -> ColumnElement[bool]:
    # As plan_active_accounts always said: an account without recorded activity counts as
    # seen when it was created (imported or first paid).
    return func.coalesce(_accounts.c.last_active_at, _accounts.c.created_at) >= active_since


def tier_of(previous_night: dt.datetime | None) -> ColumnElement[int]:
    """An account's tier, from its own row and an index probe into the ledger and the cases.

    Movement is ledger rows since the account was last observed ok (or, never observed ok,
    since it last answered). For an account never answered: rows since it was created or
    since the previous nightly began, whichever is earlier. Not its whole history, which
    every newly imported account has and which would put all of them first; but a mover
    that a full night deferred stays a mover the night after.
    """
    a = _accounts.c
    never_since: ColumnElement[dt.datetime] = a.created_at
    if previous_night is not None:
        night = literal(previous_night, a.created_at.type)
        never_since = case((a.created_at < night, a.created_at), else_=night)
    since = func.coalesce(a.last_ok_at, a.last_answer_at, never_since)
    moved = exists().where(
        _ledger.c.openid == a.openid,
        _ledger.c.zone_id == a.zone_id,
        _ledger.c.occurred_at > since,
    )
    open_case = exists().where(
        _cases.c.openid == a.openid,
        _cases.c.zone_id == a.zone_id,
        _cases.c.status.in_(OPEN_CASE_STATUSES),
    )
    unseen = or_(
        a.last_answer_at.is_(None),
        # Unobservable when last asked, and a login brought a new session key since.
        and_(
            a.last_unobservable_at.is_not(None),
            a.last_unobservable_at >= func.coalesce(a.last_ok_at, a.last_unobservable_at),
            a.session_key_updated_at > a.last_unobservable_at,
        ),
    )
    return case((moved, MOVED), (open_case, OPEN_CASE), (unseen, UNSEEN), else_=ROTATION).cast(
        SmallInteger
    )


def plan_by_risk(
    session: Session,
    run_id: int,
    *,
    active_since: dt.datetime,
    capacity: int,
    previous_night: dt.datetime | None,
) -> dict[int, tuple[int, int]]:
    """Items for the `capacity` riskiest active accounts; {tier: (active, planned)}.

    Within a tier, the account answered longest ago (never first) goes first, so the rotation
    reaches every account in turn.
    """
    tier = tier_of(previous_night).label("tier")
    ranked = (
        select(_accounts.c.id.label("account_id"), tier, _accounts.c.last_answer_at)
        .where(_active(active_since))
        .subquery()
    )
    chosen = (
        select(literal(run_id, _items.c.run_id.type), ranked.c.account_id, ranked.c.tier)
        .order_by(ranked.c.tier, ranked.c.last_answer_at.nulls_first(), ranked.c.account_id)
        .limit(max(0, capacity))
    )
    session.execute(_items.insert().from_select(["run_id", "account_id", "tier"], chosen))
    active: dict[int, int] = {
        int(t): int(n)
        for t, n in session.execute(select(ranked.c.tier, func.count()).group_by(ranked.c.tier))
    }
    planned = {
        int(t): int(n)
        for t, n in session.execute(
            select(_items.c.tier, func.count())
            .where(_items.c.run_id == run_id)
            .group_by(_items.c.tier)
        )
    }
    return {t: (n, planned.get(t, 0)) for t, n in active.items()}


def previous_night_start(session: Session, run_id: int) -> dt.datetime | None:
    """When the latest other nightly began fetching."""
    return session.execute(
        select(func.max(_runs.c.started_at)).where(
            _runs.c.kind == RunKind.NIGHTLY, _runs.c.id != run_id
        )
    ).scalar_one_or_none()


def set_night(session: Session, run_id: int, *, capacity: int, deadline_at: dt.datetime) -> None:
    session.execute(
        update(_runs).where(_runs.c.id == run_id).values(capacity=capacity, deadline_at=deadline_at)
    )


def set_deadline(session: Session, run_id: int, at: dt.datetime) -> None:
    """A new deadline (a failed night resumed gets a new night)."""
    session.execute(update(_runs).where(_runs.c.id == run_id).values(deadline_at=at))


def cut_deadline(session: Session, run_id: int, at: dt.datetime) -> None:
    """The run stops claiming from `at` (the next night began): no later than its own."""
    session.execute(
        update(_runs)
        .where(_runs.c.id == run_id)
        .values(
            deadline_at=case(
                (
                    and_(_runs.c.deadline_at.is_not(None), _runs.c.deadline_at < at),
                    _runs.c.deadline_at,
                ),
                else_=at,
            )
        )
    )


def add_deferrals(session: Session, run_id: int, reason: str, by_tier: dict[int, int]) -> int:
    """Count deferred accounts of a run by tier (added to any count already there)."""
    total = 0
    for tier, n in sorted(by_tier.items()):
        if n <= 0:
            continue
        total += n
        existing = session.execute(
            select(_deferrals.c.accounts).where(
                _deferrals.c.run_id == run_id,
                _deferrals.c.reason == reason,
                _deferrals.c.tier == tier,
            )
        ).scalar_one_or_none()
        if existing is None:
            session.execute(
                _deferrals.insert().values(run_id=run_id, reason=reason, tier=tier, accounts=n)
            )
        else:
            session.execute(
                update(_deferrals)
                .where(
                    _deferrals.c.run_id == run_id,
                    _deferrals.c.reason == reason,
                    _deferrals.c.tier == tier,
                )
                .values(accounts=existing + n)
            )
    if total:
        session.execute(
            update(_runs).where(_runs.c.id == run_id).values(deferred=_runs.c.deferred + total)
        )
    return total


def defer_pending(session: Session, run_id: int) -> dict[int, int]:
    """Pending items of a run end `done` with outcome `deferred`; {tier: count}."""
    counts: dict[int, int] = {}
    for tier, n in session.execute(
        select(_items.c.tier, func.count())
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.PENDING)
        .group_by(_items.c.tier)
    ):
        key = ROTATION if tier is None else int(tier)
        counts[key] = counts.get(key, 0) + int(n)
    if counts:
        session.execute(
            update(_items)
            .where(_items.c.run_id == run_id, _items.c.state == ItemState.PENDING)
            .values(state=ItemState.DONE, outcome=ItemOutcome.DEFERRED)
        )
    return counts


def has_claimed_items(session: Session, run_id: int) -> bool:
    claimed = (
        select(_items.c.account_id)
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.CLAIMED)
        .exists()
    )
    return bool(session.execute(select(claimed)).scalar())


def deferrals(session: Session, run_id: int) -> list[tuple[str, int, int]]:
    """(reason, tier, accounts) of a run."""
    rows = session.execute(
        select(_deferrals.c.reason, _deferrals.c.tier, _deferrals.c.accounts)
        .where(_deferrals.c.run_id == run_id)
        .order_by(_deferrals.c.reason, _deferrals.c.tier)
    )
    return [(str(r), int(t), int(n)) for r, t, n in rows]


def other_open_nightlies(session: Session, run_id: int) -> list[tuple[int, str]]:
    """(id, status) of nightly runs other than `run_id` that are planning or running."""
    rows = session.execute(
        select(_runs.c.id, _runs.c.status)
        .where(
            _runs.c.kind == RunKind.NIGHTLY,
            _runs.c.status.in_((RunStatus.PLANNING, RunStatus.RUNNING)),
            _runs.c.id != run_id,
        )
        .order_by(_runs.c.id)
    )
    return [(int(i), str(s)) for i, s in rows]


# -- each account's last observation ------------------------------------------------------------


def record_answers(session: Session, answers: Iterable[tuple[int, str, dt.datetime]]) -> None:
    """Keep accounts' last observation from newly stored snapshots: (account_id, status,
    fetched_at). One UPDATE per status, at the batch's earliest fetch time: a few seconds
    early at worst, which can only make the planner see movement that it has seen already."""
    by_status: dict[str, tuple[list[int], dt.datetime]] = {}
    for account_id, status, fetched_at in answers:
        if status not in (SnapshotStatus.OK, SnapshotStatus.UNOBSERVABLE):
            continue  # an error observed nothing: the account stays as urgent as it was
        ids, earliest = by_status.get(status, ([], fetched_at))
        ids.append(account_id)
        by_status[status] = (ids, min(earliest, fetched_at))
    for status, (ids, at) in by_status.items():
        column = (
            _accounts.c.last_ok_at
            if status == SnapshotStatus.OK
            else _accounts.c.last_unobservable_at
        )
        session.execute(
            update(_accounts)
            .where(_accounts.c.id.in_(ids))
            .values(
                {
                    column.name: _later(column, at),
                    "last_answer_at": _later(_accounts.c.last_answer_at, at),
                }
            )
        )


def _later(column: Any, at: dt.datetime) -> Any:
    return case((or_(column.is_(None), column < at), literal(at, column.type)), else_=column)


# -- coverage -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActiveObservations:
    active: int
    never: int  # active accounts never observed ok
    observed_since: dict[float, int]  # window start (days back) -> accounts observed ok since
    answered: int  # active accounts answered (ok or unobservable) since `answered_since`
    oldest: dict[str, dt.datetime | None]  # p50/p99/max -> last_ok_at at that rank (None: never)


def active_observations(
    session: Session,
    *,
    active_since: dt.datetime,
    since: dict[float, dt.datetime],
    answered_since: dt.datetime,
) -> ActiveObservations:
    """Observation of the active accounts: how many were observed ok since each instant, and
    the last ok observation at the p50/p99/max ranks of age (oldest first)."""
    where = _active(active_since)
    last_ok = _accounts.c.last_ok_at
    counts = (
        [func.count()]
        + [func.count(case((last_ok >= at, 1))) for at in since.values()]
        + [
            func.count(case((_accounts.c.last_answer_at >= answered_since, 1))),
            func.count(case((last_ok.is_(None), 1))),
        ]
    )
    row = session.execute(select(*counts).where(where)).one()
    active, answered, never = int(row[0]), int(row[-2]), int(row[-1])
    observed = {days: int(n) for days, n in zip(since, row[1:-2], strict=True)}
    oldest: dict[str, dt.datetime | None] = {}
    for name, share in (("max", 0.0), ("p99", 0.01), ("p50", 0.5)):
        if active == 0:
            oldest[name] = None
            continue
        # The account at this rank of age: the oldest first, the never observed before all.
        rank = min(active - 1, int(share * active))
        oldest[name] = session.execute(
            select(last_ok).where(where).order_by(last_ok.nulls_first()).offset(rank).limit(1)
        ).scalar_one_or_none()
    return ActiveObservations(active, never, observed, answered, oldest)


def tier_outcomes(session: Session, run_id: int) -> dict[tuple[int, str], int]:
    """{(tier, outcome): items} of a nightly run's done items."""
    rows = session.execute(
        select(_items.c.tier, _items.c.outcome, func.count())
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.DONE)
        .group_by(_items.c.tier, _items.c.outcome)
    )
    return {(int(t if t is not None else ROTATION), str(o)): int(n) for t, o, n in rows}


def set_coverage(
    session: Session, run_id: int, *, verdict: str | None, coverage: dict[str, Any]
) -> None:
    session.execute(
        update(_runs)
        .where(_runs.c.id == run_id)
        .values(coverage_verdict=verdict, coverage=coverage)
    )
