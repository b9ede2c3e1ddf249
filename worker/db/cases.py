"""Mismatch cases and their events: every query the lifecycle (worker/recon/cases.py) needs.

Cases are locked (`FOR UPDATE`, in id order) before they move, so a nightly batch, a recheck
and an operator acting on the same case take turns instead of overwriting each other. SQLite
has no row locks; its single writer serialises the same work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterable, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Table, and_, exists, func, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from worker.db import partitions
from worker.db.models import Account, BalanceSnapshot, MismatchCase, MismatchEvent
from worker.db.session import dialect_insert
from worker.vocabulary import OPEN_CASE_STATUSES, CaseStatus, SnapshotStatus

_T = TypeVar("_T")

CHUNK = 2000  # keys per statement, far below either database's bind-parameter limit

_cases = cast(Table, MismatchCase.__table__)


def _open_index_predicate() -> ColumnElement[bool]:
    # ON CONFLICT must name the partial index by its own predicate, as literal SQL (Postgres
    # cannot prove a bound parameter implies it). Taken from the model, so it cannot drift.
    index = next(ix for ix in _cases.indexes if ix.name == "uq_mismatch_cases_open")
    return cast(ColumnElement[bool], index.dialect_options["postgresql"]["where"])


_OPEN_PREDICATE = _open_index_predicate()


def _snapshots_by_id(
    snapshot_ids: Sequence[int], business_date: dt.date | None
) -> ColumnElement[bool]:
    """`id IN (…)`, in the month of `business_date` when given. On Postgres the key is
    (id, business_date): by `id` alone the planner knows no unique key and expects many rows
    per id in every month (it chose to scan the fresh month whole, 22 ms for 20 ids of
    60,000, where the key reads them in 0.15 ms)."""
    found = BalanceSnapshot.id.in_(snapshot_ids)
    if business_date is None:
        return found
    return and_(found, BalanceSnapshot.business_date == business_date)


def current_ok_snapshots(
    session: Session, snapshot_ids: Sequence[int], business_date: dt.date | None = None
) -> list[BalanceSnapshot]:
    """The `ok` snapshots among `snapshot_ids` that are their account's newest `ok` snapshot.

    An older snapshot (a redelivered task, a nightly fetch overtaken by a recheck) would move
    cases backwards; the newest one speaks for the account.

    The "is there a newer one" probe uses the (openid, zone_id, fetched_at) index. On
    Postgres it reads only the months that may hold a snapshot fetched after the batch's
    (`snapshot_months`): a backfill of an old date fetches into that date's month after newer
    dates were fetched, so the run's month alone would not do, and every month kept would
    cost one index descent per snapshot (docs/benchmarks.md §3b). The months are read in a
    statement of their own: a batch storing a newer snapshot of one of these accounts
    meanwhile cannot commit before this transaction does (the account locks taken first,
    `lock_accounts_of_snapshots`), so both statements miss it alike.
    """
    newer = aliased(BalanceSnapshot)
    s = BalanceSnapshot
    out: list[BalanceSnapshot] = []
    for chunk in _chunks(list(dict.fromkeys(snapshot_ids))):
        found = _snapshots_by_id(chunk, business_date)
        superseded = exists().where(
            newer.openid == s.openid,
            newer.zone_id == s.zone_id,
            # A term of its own, so that each descent starts at the snapshot's time instead
            # of reading the account's every snapshot in the month to test the OR.
            newer.fetched_at >= s.fetched_at,
            or_(newer.fetched_at > s.fetched_at, newer.id > s.id),
            newer.status == SnapshotStatus.OK,
            *partitions.in_months_fetched_since(
                session,
                newer.business_date,
                select(func.min(s.fetched_at)).where(found).scalar_subquery(),
            ),
        )
        query = select(s).where(found, s.status == SnapshotStatus.OK, ~superseded)
        out.extend(session.scalars(query))
    out.sort(key=lambda snap: snap.id)
    return out


def lock_accounts_of_snapshots(
    session: Session, snapshot_ids: Sequence[int], business_date: dt.date | None = None
) -> None:
    """Lock the rows of the snapshots' accounts (in id order) for this transaction.

    Taken before a batch decides which of its snapshots is the newest: a batch and a recheck
    of the same account then take turns, and the second sees the first one's snapshot as
    committed, instead of both judging "newest" before either committed and the older
    snapshot moving cases after the newer one did. SQLite has one writer: a no-op there.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    a, s = Account, BalanceSnapshot
    for chunk in _chunks(list(snapshot_ids)):
        session.execute(
            select(a.id)
            .join(s, and_(s.openid == a.openid, s.zone_id == a.zone_id))
            .where(_snapshots_by_id(chunk, business_date))
            .order_by(a.id)
            .with_for_update(of=a)
        ).all()


def lock_suspected_of(
    session: Session, accounts: Collection[tuple[str, str]]
) -> list[MismatchCase]:
    """The suspected cases of these accounts, locked in id order."""
    return [c for c in lock_open_cases(session, accounts) if c.status == CaseStatus.SUSPECTED]


def lock_open_cases_of_other_checks(
    session: Session, checks: Collection[str]
) -> list[MismatchCase]:
    """Open cases whose check is not among `checks` (removed from RECON_CHECKS), locked."""
    c = MismatchCase
    query = (
        select(c)
        .where(c.status.in_(OPEN_CASE_STATUSES), c.check.not_in(list(checks)))
        .order_by(c.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(query))


def lock_open_cases(session: Session, accounts: Collection[tuple[str, str]]) -> list[MismatchCase]:
    """Every open case of these (openid, zone_id) accounts, locked, in one query per chunk."""
    out: list[MismatchCase] = []
    c = MismatchCase
    for chunk in _chunks(sorted(accounts)):
        query = (
            select(c)
            .where(c.status.in_(OPEN_CASE_STATUSES), tuple_(c.openid, c.zone_id).in_(chunk))
            .order_by(c.id)  # one lock order for every worker: no deadlock between batches
            .with_for_update()
            # A case already in this session must show the row as locked, not as cached.
            .execution_options(populate_existing=True)
        )
        out.extend(session.scalars(query))
    return out


def lock_open_case(session: Session, openid: str, zone_id: str, check: str) -> MismatchCase | None:
    """The open case of one (openid, zone_id, check), locked; None when there is none."""
    c = MismatchCase
    query = (
        select(c)
        .where(c.openid == openid, c.zone_id == zone_id, c.check == check)
        .where(c.status.in_(OPEN_CASE_STATUSES))
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


def lock_case(session: Session, case_id: int) -> MismatchCase | None:
    query = (
        select(MismatchCase)
        .where(MismatchCase.id == case_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.scalars(query).one_or_none()


def insert_open_case(session: Session, **values: Any) -> MismatchCase | None:
    """Insert a new open case; None when another transaction holds that open case already.

    Two workers may open the same (openid, zone_id, check) at once. The partial unique index
    makes the second INSERT wait for the first to commit, then do nothing, instead of raising
    and failing the whole batch; the caller re-reads the winner's case.
    """
    stmt = (
        dialect_insert(session, _cases)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=["openid", "zone_id", "check"], index_where=_OPEN_PREDICATE
        )
        .returning(_cases.c.id)
    )
    new_id = session.execute(stmt).scalar_one_or_none()
    if new_id is None:
        return None
    return session.get(MismatchCase, new_id)


def add_event(session: Session, **values: Any) -> MismatchEvent:
    event = MismatchEvent(**values)
    session.add(event)
    return event


def list_cases(session: Session, statuses: Iterable[str] | None = None) -> list[MismatchCase]:
    """Cases in these statuses (all when None), largest difference first, then oldest."""
    query = select(MismatchCase).order_by(func.abs(MismatchCase.delta).desc(), MismatchCase.id)
    if statuses is not None:
        query = query.where(MismatchCase.status.in_(list(statuses)))
    return list(session.scalars(query))


def get_case(session: Session, case_id: int) -> MismatchCase | None:
    return session.get(MismatchCase, case_id)


def case_events(session: Session, case_id: int) -> list[MismatchEvent]:
    """A case's history in the order it was written (the case's row lock orders writers;
    `at` comes from each writer's clock and the caller's `now`)."""
    query = select(MismatchEvent).where(MismatchEvent.case_id == case_id).order_by(MismatchEvent.id)
    return list(session.scalars(query))


def _chunks(items: Sequence[_T]) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
