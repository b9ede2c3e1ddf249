"""The confirm pass's queries: which suspected cases are due for their confirming re-fetch
(worker.recon.rechecks plans the pass; worker.recon.cases decides what a re-fetch means)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, func, or_, select, text
from sqlalchemy.orm import Session

from worker.db.models import Account, BalanceSnapshot, MismatchCase
from worker.db.runs import accounts_in_flight
from worker.vocabulary import CaseStatus, RunKind

_accounts = cast(Table, Account.__table__)
_cases = cast(Table, MismatchCase.__table__)
_snapshots = cast(Table, BalanceSnapshot.__table__)


def serialize_confirm_planning(session: Session) -> None:
    """Two confirm passes must not plan the same accounts: one plans at a time (Postgres;
    SQLite has one writer anyway). The lock ends with the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('midas_recon.confirm_pass'))"))


def due_confirm_accounts(
    session: Session, *, now: dt.datetime, retry_after: dt.datetime, limit: int
) -> list[int]:
    """Accounts with a suspected case due for its confirming re-fetch.

    Left out: accounts already in a running confirm run, those fetched at/after the due
    time more recently than `retry_after` (that answer was an error, or it would have
    confirmed or cleared the case): they are tried again later, not every pass; and parked
    cases (unobservable at their re-fetch) until the account's session key is renewed.
    """
    tried = (
        select(_snapshots.c.id)
        .where(
            _snapshots.c.openid == _cases.c.openid,
            _snapshots.c.zone_id == _cases.c.zone_id,
            _snapshots.c.fetched_at >= _cases.c.confirm_due_at,
            _snapshots.c.fetched_at >= retry_after,
        )
        .exists()
    )
    stmt = (
        select(_accounts.c.id)
        .join(
            _cases,
            (_cases.c.openid == _accounts.c.openid) & (_cases.c.zone_id == _accounts.c.zone_id),
        )
        .where(
            _cases.c.status == CaseStatus.SUSPECTED,
            _cases.c.confirm_due_at <= now,
            _not_parked(),
            ~tried,
            _accounts.c.id.not_in(accounts_in_flight(kind=RunKind.CONFIRM)),
        )
        .distinct()
        .order_by(_accounts.c.id)
        .limit(limit)
    )
    return [int(a) for a in session.execute(stmt).scalars()]


def last_confirm_due(session: Session, *, until: dt.datetime) -> dt.datetime | None:
    """The latest due time, up to `until`, of a suspected case not re-fetched since it was
    due: waiting for it lets one confirm pass take them all."""
    fetched_since_due = (
        select(_snapshots.c.id)
        .where(
            _snapshots.c.openid == _cases.c.openid,
            _snapshots.c.zone_id == _cases.c.zone_id,
            _snapshots.c.fetched_at >= _cases.c.confirm_due_at,
        )
        .exists()
    )
    return session.execute(
        select(func.max(_cases.c.confirm_due_at))
        .join(
            _accounts,
            (_cases.c.openid == _accounts.c.openid) & (_cases.c.zone_id == _accounts.c.zone_id),
        )
        .where(
            _cases.c.status == CaseStatus.SUSPECTED,
            _cases.c.confirm_due_at <= until,
            _not_parked(),
            ~fetched_since_due,
        )
    ).scalar_one_or_none()


def _not_parked() -> Any:
    """A case (joined with its account) that is not parked, or whose account logged in with
    a new session key since it was parked."""
    return or_(
        _cases.c.parked_at.is_(None),
        _accounts.c.session_key_updated_at > _cases.c.parked_at,
    )
