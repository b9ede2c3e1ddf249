"""The queries behind the operators' console and its command-line twins (`mismatches` with
filters, `account`): case search with paging, one account's history, the cases of a run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from worker.db.models import (
    Account,
    BalanceSnapshot,
    LedgerEntry,
    MismatchCase,
    MismatchEvent,
    Run,
)
from worker.vocabulary import RunKind, RunStatus

_R = TypeVar("_R")

CASE_SORTS = ("delta", "age")


@dataclass(frozen=True, slots=True)
class CaseQuery:
    """Which cases, in which order, which page. None means "any"."""

    statuses: Sequence[str] | None = None
    check: str | None = None
    zone_id: str | None = None
    openid: str | None = None
    opened_from: dt.datetime | None = None  # first_seen_at >= this
    opened_before: dt.datetime | None = None  # first_seen_at < this
    min_abs_delta: int | None = None
    sort: str = "delta"  # largest |delta| first, or oldest first ("age")
    limit: int | None = None
    offset: int = 0


def search_cases(session: Session, q: CaseQuery) -> list[MismatchCase]:
    c = MismatchCase
    order: tuple[Any, ...]
    if q.sort == "delta":
        order = (func.abs(c.delta).desc(), c.id)
    elif q.sort == "age":
        order = (c.first_seen_at, c.id)
    else:
        raise ValueError(f"unknown sort {q.sort!r} (one of {', '.join(CASE_SORTS)})")
    stmt = _where(select(c), q).order_by(*order).offset(q.offset)
    if q.limit is not None:
        stmt = stmt.limit(q.limit)
    return list(session.scalars(stmt))


def count_cases(session: Session, q: CaseQuery) -> int:
    return int(session.execute(_where(select(func.count(MismatchCase.id)), q)).scalar_one())


def _where(stmt: Select[_R], q: CaseQuery) -> Select[_R]:
    c = MismatchCase
    if q.statuses is not None:
        stmt = stmt.where(c.status.in_(list(q.statuses)))
    if q.check is not None:
        stmt = stmt.where(c.check == q.check)
    if q.zone_id is not None:
        stmt = stmt.where(c.zone_id == q.zone_id)
    if q.openid is not None:
        stmt = stmt.where(c.openid == q.openid)
    if q.opened_from is not None:
        stmt = stmt.where(c.first_seen_at >= q.opened_from)
    if q.opened_before is not None:
        stmt = stmt.where(c.first_seen_at < q.opened_before)
    if q.min_abs_delta is not None:
        stmt = stmt.where(func.abs(c.delta) >= q.min_abs_delta)
    return stmt


def events_of_cases(session: Session, case_ids: Sequence[int]) -> dict[int, list[MismatchEvent]]:
    """Each case's events in the order they were written; every id is a key."""
    out: dict[int, list[MismatchEvent]] = {i: [] for i in case_ids}
    if not case_ids:
        return out
    e = MismatchEvent
    for event in session.scalars(select(e).where(e.case_id.in_(list(case_ids))).order_by(e.id)):
        out[event.case_id].append(event)
    return out


def get_case(session: Session, case_id: int) -> MismatchCase | None:
    return session.get(MismatchCase, case_id)


def get_account(session: Session, openid: str, zone_id: str) -> Account | None:
    stmt = select(Account).where(Account.openid == openid, Account.zone_id == zone_id)
    return session.scalars(stmt).one_or_none()


def account_snapshots(
    session: Session, openid: str, zone_id: str, *, limit: int
) -> list[BalanceSnapshot]:
    """The account's newest `limit` snapshots, oldest first (the time index, read backwards)."""
    s = BalanceSnapshot
    stmt = (
        select(s)
        .where(s.openid == openid, s.zone_id == zone_id)
        .order_by(s.fetched_at.desc(), s.id.desc())
        .limit(limit)
    )
    return list(reversed(session.scalars(stmt).all()))


def ledger_sums_before(
    session: Session, openid: str, zone_id: str, before: dt.datetime
) -> dict[str, int]:
    """Σ amount per kind of the account's entries with occurred_at < before (0 for none)."""
    entry = LedgerEntry
    stmt = (
        select(entry.kind, func.sum(entry.amount))
        .where(entry.openid == openid, entry.zone_id == zone_id, entry.occurred_at < before)
        .group_by(entry.kind)
    )
    return {str(kind): int(total) for kind, total in session.execute(stmt)}


def ledger_entries_since(
    session: Session, openid: str, zone_id: str, since: dt.datetime | None
) -> list[LedgerEntry]:
    """The account's entries with occurred_at >= since (all when None), in time order."""
    entry = LedgerEntry
    stmt = select(entry).where(entry.openid == openid, entry.zone_id == zone_id)
    if since is not None:
        stmt = stmt.where(entry.occurred_at >= since)
    return list(session.scalars(stmt.order_by(entry.occurred_at, entry.id)))


def account_cases(session: Session, openid: str, zone_id: str) -> list[MismatchCase]:
    """Every case of the account, newest first."""
    c = MismatchCase
    stmt = select(c).where(c.openid == openid, c.zone_id == zone_id).order_by(c.id.desc())
    return list(session.scalars(stmt))


def cases_opened_by(session: Session, run_id: int, *, limit: int) -> list[MismatchCase]:
    c = MismatchCase
    stmt = select(c).where(c.opened_run_id == run_id).order_by(c.id).limit(limit)
    return list(session.scalars(stmt))


def last_finished_nightly(session: Session, status: str = RunStatus.COMPLETE) -> Run | None:
    stmt = (
        select(Run)
        .where(Run.kind == RunKind.NIGHTLY, Run.status == status)
        .order_by(Run.business_date.desc())
        .limit(1)
    )
    return session.scalars(stmt).one_or_none()


def snapshot_of_run(session: Session, run_id: int) -> BalanceSnapshot | None:
    """The first snapshot a run stored (a recheck run stores exactly one)."""
    s = BalanceSnapshot
    return session.scalars(select(s).where(s.run_id == run_id).order_by(s.id).limit(1)).first()
