"""Runs and run items: every SQL statement that plans, claims and closes a run.

A run's plan lives here, not in the broker. Items move pending -> claimed -> done. A claim is
identified by its `claimed_at` value (microseconds, one per batch): the batch message carries
it, and a batch only works on items still held by that claim. A message whose claim was taken
back (its batch presumed dead) and handed to another batch therefore finds nothing to do.

No step of a batch and no routine check of the pump reads claimed items through the
(run_id, state) index: each state change leaves a dead entry in that index until a vacuum
removes it, and a scan of the `claimed` range late in a big night would step over one for
every item done so far (docs/benchmarks.md §3; autovacuum may be off or behind). A batch
finds its items by primary key; the pump finds the claims in flight in `run_claims`, one row
per batch. Only the claim (the pending range) and taking a dead claim back use that index.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Select,
    Table,
    case,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from worker.db import partitions
from worker.db.models import Account, Run, RunClaim, RunItem
from worker.db.session import dialect_insert
from worker.vocabulary import ItemOutcome, ItemState, RunKind, RunStatus

_runs = cast(Table, Run.__table__)
_items = cast(Table, RunItem.__table__)
_claims = cast(Table, RunClaim.__table__)
_accounts = cast(Table, Account.__table__)


@dataclass(frozen=True, slots=True)
class ItemToFetch:
    """A claimed item with what the fetch needs; the session key is still encrypted."""

    account_id: int
    openid: str
    zone_id: str
    attempts: int
    session_key_enc: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ItemCounts:
    pending: int = 0
    claimed: int = 0
    ok: int = 0
    unobservable: int = 0
    error: int = 0
    deferred: int = 0  # planned, left at the deadline or when the next night closed the run

    @property
    def done(self) -> int:
        return self.ok + self.unobservable + self.error + self.deferred

    @property
    def planned(self) -> int:
        return self.pending + self.claimed + self.done

    @property
    def open(self) -> int:
        return self.pending + self.claimed


# -- creating runs ------------------------------------------------------------------------------


def insert_nightly_run(
    session: Session, business_date: dt.date, *, trigger: str, api_version: str, now: dt.datetime
) -> int | None:
    """The nightly run of `business_date`, or None when it already exists (a no-op).

    ON CONFLICT on the partial unique index: two beats, or beat and an operator, racing for
    the same date end with one run, and the loser does not fail.
    """
    _ensure_partition(session, business_date)
    stmt = (
        dialect_insert(session, _runs)
        .values(
            business_date=business_date,
            kind=RunKind.NIGHTLY,
            trigger=trigger,
            status=RunStatus.PLANNING,
            api_version=api_version,
            created_at=now,
        )
        .on_conflict_do_nothing(
            # The partial index's own predicate, as SQL text: Postgres infers the index from it.
            index_elements=[_runs.c.business_date],
            index_where=text("kind = 'nightly'"),
        )
        .returning(_runs.c.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def insert_run(
    session: Session,
    *,
    kind: str,
    business_date: dt.date,
    trigger: str,
    api_version: str,
    now: dt.datetime,
) -> int:
    """A recheck or confirm run (any number per date), running from the start."""
    _ensure_partition(session, business_date)
    stmt = (
        _runs.insert()
        .values(
            business_date=business_date,
            kind=kind,
            trigger=trigger,
            status=RunStatus.RUNNING,
            api_version=api_version,
            created_at=now,
            started_at=now,
        )
        .returning(_runs.c.id)
    )
    return int(session.execute(stmt).scalar_one())


def _ensure_partition(session: Session, business_date: dt.date) -> None:
    """The month partition the run's snapshots go to (an old date's, for a backfill)."""
    if partitions.partitioned(session):
        partitions.ensure_months(session, [business_date])


def nightly_dates_after(session: Session, business_date: dt.date) -> list[dt.date]:
    """Business dates later than `business_date` that have a nightly run."""
    query = (
        select(_runs.c.business_date)
        .where(_runs.c.kind == RunKind.NIGHTLY, _runs.c.business_date > business_date)
        .order_by(_runs.c.business_date)
    )
    return list(session.execute(query).scalars())


def nightly_run_id(session: Session, business_date: dt.date) -> int | None:
    return session.execute(
        select(_runs.c.id).where(
            _runs.c.kind == RunKind.NIGHTLY, _runs.c.business_date == business_date
        )
    ).scalar_one_or_none()


def plan_accounts(session: Session, run_id: int, account_ids: Sequence[int]) -> int:
    if not account_ids:
        return 0
    session.execute(_items.insert(), [{"run_id": run_id, "account_id": a} for a in account_ids])
    return len(account_ids)


def mark_running(session: Session, run_id: int, *, planned: int, now: dt.datetime) -> None:
    session.execute(
        update(_runs)
        .where(_runs.c.id == run_id)
        .values(
            status=RunStatus.RUNNING,
            planned=planned,
            started_at=func.coalesce(_runs.c.started_at, now),
        )
    )


def resume_failed(session: Session, run_id: int) -> str | None:
    """Put a failed run back to running; returns the reason it had failed with."""
    row = session.execute(
        select(_runs.c.status, _runs.c.failure_reason).where(_runs.c.id == run_id).with_for_update()
    ).one()
    if row.status != RunStatus.FAILED:
        return None
    session.execute(
        update(_runs)
        .where(_runs.c.id == run_id)
        .values(status=RunStatus.RUNNING, failure_reason=None, finished_at=None)
    )
    return str(row.failure_reason or "")


# -- reading runs -------------------------------------------------------------------------------


def get_run(session: Session, run_id: int, *, lock: bool = False) -> Run | None:
    """The run, optionally row-locked (finalize, fail) so status changes serialise."""
    # populate_existing: statuses change under Core UPDATEs; never trust the identity map.
    stmt = select(Run).where(Run.id == run_id).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalar_one_or_none()


def unfinished_runs(session: Session) -> list[tuple[int, str]]:
    """(id, kind) of runs still running, or waiting to plan: what the sweep pumps."""
    rows = session.execute(
        select(_runs.c.id, _runs.c.kind)
        .where(_runs.c.status.in_((RunStatus.PLANNING, RunStatus.RUNNING)))
        .order_by(_runs.c.id)
    )
    return [(int(i), str(k)) for i, k in rows]


def recent_runs(session: Session, *, limit: int, kind: str | None) -> list[Run]:
    stmt = select(Run).order_by(Run.id.desc()).limit(limit)
    if kind is not None:
        stmt = stmt.where(Run.kind == kind)
    return list(session.execute(stmt).scalars())


def item_counts(session: Session, run_id: int) -> ItemCounts:
    """Items by state and outcome, from the (run_id, state) index."""
    rows = session.execute(
        select(_items.c.state, _items.c.outcome, func.count())
        .where(_items.c.run_id == run_id)
        .group_by(_items.c.state, _items.c.outcome)
    )
    counts: dict[str, int] = {}
    for state, outcome, n in rows:
        key = str(outcome) if state == ItemState.DONE else str(state)
        counts[key] = counts.get(key, 0) + int(n)
    return ItemCounts(
        pending=counts.get(ItemState.PENDING, 0),
        claimed=counts.get(ItemState.CLAIMED, 0),
        ok=counts.get(ItemOutcome.OK, 0),
        unobservable=counts.get(ItemOutcome.UNOBSERVABLE, 0),
        error=counts.get(ItemOutcome.ERROR, 0),
        deferred=counts.get(ItemOutcome.DEFERRED, 0),
    )


def has_open_items(session: Session, run_id: int) -> bool:
    """Whether any item is pending (the first pending entry of the state index will do) or
    may be claimed (a claim in flight)."""
    pending = (
        select(_items.c.account_id)
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.PENDING)
        .exists()
    )
    in_flight = select(_claims.c.run_id).where(_claims.c.run_id == run_id).exists()
    return bool(session.execute(select(pending | in_flight)).scalar())


# -- claims -------------------------------------------------------------------------------------


def claim_pending(session: Session, run_id: int, *, limit: int, claim: dt.datetime) -> list[int]:
    """Claim up to `limit` pending items, the riskiest tier first (a nightly cut short by its
    deadline has spent itself on them); concurrent claimers skip each other's rows."""
    chosen = (
        select(_items.c.account_id)
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.PENDING)
        .order_by(_items.c.tier)  # the (run_id, state, tier) index: no sort
        .limit(limit)
        .with_for_update(skip_locked=True)  # Postgres; SQLite has one writer anyway
    )
    stmt = (
        update(_items)
        .where(_items.c.run_id == run_id, _items.c.account_id.in_(chosen.scalar_subquery()))
        .values(state=ItemState.CLAIMED, claimed_at=claim)
        .returning(_items.c.account_id)
    )
    ids = sorted(int(a) for a in session.execute(stmt).scalars())
    if ids:
        # Registered in flight in the same transaction (idempotent: a row says "may hold").
        session.execute(
            dialect_insert(session, _claims)
            .values(run_id=run_id, claimed_at=claim, account_id=ids[0])
            .on_conflict_do_nothing()
        )
    return ids


def _held(claim: dt.datetime | None = None) -> ColumnElement[bool]:
    """Items still claimed (by `claim`, if given), tested on rows found by primary key.

    `state || ''` keeps Postgres off the (run_id, state) index, which it would otherwise
    prefer (it expects few claimed items), and whose `claimed` range holds a dead entry for
    every item claimed before in the run until a vacuum removes it.
    """
    # Left as written and measured (bench/scale.py), literal and all: this text is the trick.
    held = _items.c.state.concat("") == "claimed"
    return held if claim is None else held & (_items.c.claimed_at == claim)


def start_items(
    session: Session, run_id: int, account_ids: Sequence[int], *, claim: dt.datetime
) -> list[ItemToFetch]:
    """The items of a batch message still held by its claim, with what the fetch needs.

    Each start counts an attempt (a release undoes it), so `attempts` ends up counting the
    batches that died on an item. The claim does not change: a copy of the message that is
    delivered again after its worker died finds the items and carries on.
    """
    held = (
        update(_items)
        .where(_items.c.run_id == run_id, _items.c.account_id.in_(list(account_ids)), _held(claim))
        .values(attempts=_items.c.attempts + 1)
        .returning(_items.c.account_id, _items.c.attempts)
    )
    attempts = {int(a): int(n) for a, n in session.execute(held)}
    if not attempts:
        return []
    rows = session.execute(
        select(_accounts.c.id, _accounts.c.openid, _accounts.c.zone_id, _accounts.c.session_key_enc)
        .where(_accounts.c.id.in_(list(attempts)))
        .order_by(_accounts.c.id)
    )
    return [
        ItemToFetch(
            account_id=int(r.id),
            openid=r.openid,
            zone_id=r.zone_id,
            attempts=attempts[int(r.id)],
            session_key_enc=r.session_key_enc,
        )
        for r in rows
    ]


def claims_before(session: Session, run_id: int, before: dt.datetime) -> list[dt.datetime]:
    """The distinct claims in flight in a run made before `before` (a handful: one per batch)."""
    rows = session.execute(
        select(_claims.c.claimed_at)
        .where(_claims.c.run_id == run_id, _claims.c.claimed_at < before)
        .distinct()
    )
    return list(rows.scalars())


def take_back_claims(session: Session, run_id: int, claims: Sequence[dt.datetime]) -> int:
    """These claims' items back to pending (their batches are dead), and the claims closed.

    Rare (a batch died), so this one may read the `claimed` range of the state index.
    """
    if not claims:
        return 0
    result = session.execute(
        update(_items)
        .where(
            _items.c.run_id == run_id,
            _items.c.state == ItemState.CLAIMED,
            _items.c.claimed_at.in_(list(claims)),
        )
        .values(state=ItemState.PENDING, claimed_at=None)
    )
    session.execute(
        delete(_claims).where(_claims.c.run_id == run_id, _claims.c.claimed_at.in_(list(claims)))
    )
    return _rowcount(result)


def close_claim(
    session: Session, run_id: int, account_ids: Sequence[int], *, claim: dt.datetime
) -> None:
    """A batch's claim holds nothing any more: its items are stored, released or taken back."""
    if account_ids:
        session.execute(
            delete(_claims).where(
                _claims.c.run_id == run_id,
                _claims.c.claimed_at == claim,
                _claims.c.account_id == min(account_ids),
            )
        )


def lock_held(
    session: Session, run_id: int, account_ids: Sequence[int], *, claim: dt.datetime
) -> set[int]:
    """Row-lock the items this batch still holds; a stale sweep cannot take them meanwhile."""
    rows = session.execute(
        select(_items.c.account_id)
        .where(_items.c.run_id == run_id, _items.c.account_id.in_(list(account_ids)), _held(claim))
        .with_for_update()
    )
    return {int(a) for a in rows.scalars()}


def mark_done(session: Session, run_id: int, outcomes: dict[int, str]) -> None:
    """Held (claimed) items done with their snapshot's status; call after the snapshots are
    inserted, in the transaction that locked them (`lock_held`)."""
    if not outcomes:
        return
    by_outcome: dict[str, list[int]] = {}
    for account_id, outcome in outcomes.items():
        by_outcome.setdefault(outcome, []).append(account_id)
    for outcome, ids in by_outcome.items():
        session.execute(
            update(_items)
            .where(_items.c.run_id == run_id, _items.c.account_id.in_(ids), _held())
            .values(state=ItemState.DONE, outcome=outcome)
        )


def release(session: Session, run_id: int, account_ids: Sequence[int]) -> None:
    """Give held items back to the plan unfetched (deadline, run stopped)."""
    if not account_ids:
        return
    session.execute(
        update(_items)
        .where(_items.c.run_id == run_id, _items.c.account_id.in_(list(account_ids)), _held())
        .values(
            state=ItemState.PENDING,
            claimed_at=None,
            attempts=case((_items.c.attempts > 0, _items.c.attempts - 1), else_=0),
        )
    )


def release_all_claims(session: Session, run_id: int) -> int:
    """Every claim of a run back to pending (resuming a failed run: its batches are gone)."""
    result = session.execute(
        update(_items)
        .where(_items.c.run_id == run_id, _items.c.state == ItemState.CLAIMED)
        .values(state=ItemState.PENDING, claimed_at=None)
    )
    session.execute(delete(_claims).where(_claims.c.run_id == run_id))
    return _rowcount(result)


def refresh_item_statistics(session: Session) -> None:
    """ANALYZE run_items once a night is planned into it (Postgres).

    Without statistics Postgres guesses that a run holds a handful of items and finds a
    batch's few by reading all of the run's (bench/scale.py). Autovacuum would analyze the
    table in time where it is on; planning is when the table grows most, once a night.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE run_items"))


def add_mismatches_opened(session: Session, run_id: int, opened: int) -> None:
    """Count cases a batch opened, in the batch's transaction (rare: only when some did)."""
    if opened:
        session.execute(
            update(_runs)
            .where(_runs.c.id == run_id)
            .values(mismatches_opened=_runs.c.mismatches_opened + opened)
        )


def close_run(
    session: Session,
    run_id: int,
    *,
    status: str,
    counts: ItemCounts,
    now: dt.datetime,
    reason: str | None = None,
) -> None:
    values: dict[str, Any] = {
        "status": status,
        "planned": counts.planned,
        "ok": counts.ok,
        "unobservable": counts.unobservable,
        "error": counts.error,
        "finished_at": now,
    }
    if reason is not None:
        values["failure_reason"] = reason
    session.execute(update(_runs).where(_runs.c.id == run_id).values(**values))


def accounts_in_flight(*, kind: str) -> Select[tuple[int]]:
    """Account ids with an unfinished item in a running run of `kind` (a sub-select)."""
    return (
        select(_items.c.account_id)
        .join(_runs, _runs.c.id == _items.c.run_id)
        .where(
            _runs.c.kind == kind,
            _runs.c.status == RunStatus.RUNNING,
            or_(_items.c.state == ItemState.PENDING, _items.c.state == ItemState.CLAIMED),
        )
    )


# -- one night at a time ---------------------------------------------------------------------


def serialize_nightly_planning(session: Session) -> None:
    """One night at a time: the start of a nightly and the closing of the one before it run
    one at a time (Postgres; SQLite has one writer anyway). Ends with the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('midas_recon.nightly'))"))


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount or 0)
