"""Balance snapshots: insert-only, one per (run_id, openid, zone_id) (PRODUCT.md §4).

Each row carries its run's business date, the key of its month partition on Postgres; the
unique key holds it too, which changes nothing since the run fixes the date. That key is the
last guard against a second snapshot of an account in one run (a
redelivered batch, a restarted worker): the insert skips a row that exists, and the caller
takes the stored row's status as the item's outcome.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, select, tuple_
from sqlalchemy.orm import Session

from worker.db import partitions
from worker.db.models import BalanceSnapshot
from worker.db.session import dialect_insert
from worker.midas.types import COUNTER_FIELDS
from worker.vocabulary import SnapshotStatus

_snapshots = cast(Table, BalanceSnapshot.__table__)

VALUE_FIELDS = (*COUNTER_FIELDS, "first_save")


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    """One answer to store; `values` is empty unless status is ok (never a zero for 'unknown')."""

    openid: str
    zone_id: str
    fetched_at: dt.datetime
    status: str
    api_version: str
    errcode: int | None = None
    errmsg: str | None = None
    values: tuple[tuple[str, int | bool], ...] = ()


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    id: int
    openid: str
    zone_id: str
    status: str
    new: bool  # inserted now (False: the run already had it, from an earlier delivery)


def insert_snapshots(
    session: Session, run_id: int, business_date: dt.date, rows: Sequence[SnapshotRow]
) -> list[StoredSnapshot]:
    """Insert `rows`, skipping accounts that already have a snapshot in this run.

    Returns the stored snapshot of every row's account: the new one, or the one that was
    already there (whose status then decides the item's outcome).
    """
    if not rows:
        return []
    params = []
    for row in rows:
        values = dict(row.values)
        if (row.status == SnapshotStatus.OK) != bool(values) or (
            values and set(values) != set(VALUE_FIELDS)
        ):
            raise ValueError("a snapshot has all values exactly when its status is ok")
        params.append(
            {
                "run_id": run_id,
                "business_date": business_date,
                "openid": row.openid,
                "zone_id": row.zone_id,
                "fetched_at": row.fetched_at,
                "status": row.status,
                "errcode": row.errcode,
                "errmsg": row.errmsg,
                "api_version": row.api_version,
                **{name: values.get(name) for name in VALUE_FIELDS},
            }
        )
    # The rows go as parameters of one cached statement (SQLAlchemy's "insertmanyvalues"
    # sends them as multi-row INSERTs): a `.values(params)` statement holds every value as a
    # bind of its own, and compiling it anew for each batch cost more than 3x the CPU
    # (bench/pipeline.py's stage profile).
    stmt = (
        dialect_insert(session, _snapshots)
        .on_conflict_do_nothing(
            index_elements=[
                _snapshots.c.run_id,
                _snapshots.c.openid,
                _snapshots.c.zone_id,
                _snapshots.c.business_date,
            ]
        )
        .returning(
            _snapshots.c.id,
            _snapshots.c.openid,
            _snapshots.c.zone_id,
            _snapshots.c.status,
        )
    )
    stored = {
        (r.openid, r.zone_id): StoredSnapshot(int(r.id), r.openid, r.zone_id, r.status, True)
        for r in session.execute(stmt, params)
    }
    if stored and partitions.partitioned(session):  # `stored` holds the inserted rows so far
        latest = max(r.fetched_at for r in rows if (r.openid, r.zone_id) in stored)
        partitions.note_fetched(session, business_date, latest)
    missing = [(r.openid, r.zone_id) for r in rows if (r.openid, r.zone_id) not in stored]
    if missing:
        existing = session.execute(
            select(
                _snapshots.c.id,
                _snapshots.c.openid,
                _snapshots.c.zone_id,
                _snapshots.c.status,
            ).where(
                _snapshots.c.run_id == run_id,
                _snapshots.c.business_date == business_date,
                tuple_(_snapshots.c.openid, _snapshots.c.zone_id).in_(missing),
            )
        )
        for r in existing:
            stored[(r.openid, r.zone_id)] = StoredSnapshot(
                int(r.id), r.openid, r.zone_id, r.status, False
            )
    return [stored[(r.openid, r.zone_id)] for r in rows if (r.openid, r.zone_id) in stored]


def snapshots_of_run(session: Session, run_id: int) -> list[BalanceSnapshot]:
    return list(
        session.execute(
            select(BalanceSnapshot)
            .where(BalanceSnapshot.run_id == run_id)
            .order_by(BalanceSnapshot.id)
        ).scalars()
    )


def accounts_with_status(session: Session, run_id: int, status: str) -> set[tuple[str, str]]:
    """(openid, zone_id) of the run's snapshots in `status`."""
    query = select(BalanceSnapshot.openid, BalanceSnapshot.zone_id).where(
        BalanceSnapshot.run_id == run_id, BalanceSnapshot.status == status
    )
    return {(openid, zone_id) for openid, zone_id in session.execute(query)}


def accounts_fetched(session: Session, openids: Sequence[str]) -> set[tuple[str, str]]:
    """(openid, zone_id) of these openids that have any snapshot stored."""
    query = select(BalanceSnapshot.openid, BalanceSnapshot.zone_id).where(
        BalanceSnapshot.openid.in_(openids)
    )
    return {(openid, zone_id) for openid, zone_id in session.execute(query)}
