"""Monthly partitions of `balance_snapshots` on Postgres: their names, DDL and contents.

One partition per calendar month of `business_date`, named `balance_snapshots_YYYY_MM`, no
default partition: a row whose month has no partition is refused, never parked somewhere.
Which months exist and which may go is decided in worker/recon/retention.py. SQLite has no
partitions: callers ask `partitioned()` first.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Interval,
    Table,
    and_,
    distinct,
    false,
    func,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.db.models import BalanceSnapshot, MismatchCase, MismatchEvent, SnapshotMonth
from worker.vocabulary import OPEN_CASE_STATUSES

PARENT: Final = "balance_snapshots"
# How far behind its month's latest fetch `snapshot_months.fetched_until` may be: a batch
# writes the row only when its fetches are this much later than the row says (about once an
# hour per month), every other batch only reads it.
FETCH_SLACK: Final = dt.timedelta(hours=1)
_months = cast(Table, SnapshotMonth.__table__)
_NAME = re.compile(r"^balance_snapshots_(\d{4})_(\d{2})$")
# Any fixed number: two processes creating the same month one after the other, not at once
# (concurrent CREATE TABLE IF NOT EXISTS of one name can still fail on the catalog's keys).
_LOCK: Final = 0x6D696461735F7061  # "midas_pa"


def month_of(day: dt.date) -> dt.date:
    return day.replace(day=1)


def add_months(month: dt.date, months: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, 1)


def partition_name(month: dt.date) -> str:
    return f"{PARENT}_{month:%Y_%m}"


def month_of_partition(name: str) -> dt.date | None:
    """The month a partition of ours holds; None for any other name."""
    found = _NAME.match(name)
    return dt.date(int(found[1]), int(found[2]), 1) if found else None


def partitioned(bind: Session | Connection) -> bool:
    """Whether this database partitions snapshots (Postgres does, SQLite does not)."""
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    return dialect.name == "postgresql"


def ensure_months(bind: Session | Connection, months: Iterable[dt.date]) -> list[str]:
    """Create the partitions of `months` that do not exist; the names created.

    Creating one locks the parent table (ACCESS EXCLUSIVE) until the transaction ends, so the
    common case, the month exists, only reads the catalog.
    """
    wanted = sorted({month_of(m) for m in months})
    missing = [m for m in wanted if not _exists(bind, partition_name(m))]
    if not missing:
        return []
    bind.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
    created = []
    for month in missing:
        name = partition_name(month)
        if _exists(bind, name):  # made by another process while we waited for the lock
            continue
        # Names and bounds are dates formatted here, never input.
        start, end = month.isoformat(), add_months(month, 1).isoformat()
        bind.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {PARENT}"
                f" FOR VALUES FROM ('{start}') TO ('{end}')"
            )
        )
        created.append(name)
    return created


def note_fetched(session: Session, business_date: dt.date, latest: dt.datetime) -> None:
    """Snapshots fetched up to `latest` are being stored in `business_date`'s month (Postgres).

    Most batches only read the row: it is within FETCH_SLACK. When it is behind, it is moved
    in a transaction of its own, committed before the snapshots' (so a reader that sees them
    sees it): a write in the batch's transaction would hold the row locked until that
    transaction ends, and every other batch storing into the month would wait for it.
    """
    month = month_of(business_date)
    until = session.execute(
        select(_months.c.fetched_until).where(_months.c.month == month)
    ).scalar_one_or_none()
    if until is not None and until >= latest - FETCH_SLACK:
        return
    new = insert(_months).values(month=month, fetched_until=latest)
    stmt = new.on_conflict_do_update(
        index_elements=[_months.c.month],
        set_={"fetched_until": new.excluded.fetched_until},
        where=_months.c.fetched_until < new.excluded.fetched_until,
    )
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    with engine.begin() as conn:
        conn.execute(stmt)


def months_fetched_since(session: Session, since: ColumnElement[Any]) -> list[dt.date]:
    """The months that may hold a snapshot fetched after `since` (a value or a scalar
    subquery), oldest first."""
    query = (
        select(_months.c.month)
        .where(_months.c.fetched_until >= since - literal(FETCH_SLACK, Interval()))
        .order_by(_months.c.month)
    )
    return list(session.execute(query).scalars())


def in_months_fetched_since(
    session: Session, business_date: Any, since: ColumnElement[Any]
) -> list[ColumnElement[bool]]:
    """The condition "`business_date` (a snapshot column) is in a month that may hold a snapshot
    fetched after `since`", for a probe of `balance_snapshots` that would otherwise descend
    every month's index (docs/benchmarks.md §3b). Read in a statement of its own, before the
    probe, so the probe's months are pruned when it is planned; no month: nothing qualifies.
    A snapshot visible to this read is visible to the probe, and its month with it
    (`note_fetched` commits before the snapshot does). SQLite: no condition."""
    if not partitioned(session):
        return []
    months = months_fetched_since(session, since)
    return [
        or_(
            false(),
            *(
                and_(business_date >= month, business_date < add_months(month, 1))
                for month in months
            ),
        )
    ]


def _exists(bind: Session | Connection, name: str) -> bool:
    found = bind.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar()
    return found is not None


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    month: dt.date
    rows: int


def month_partitions(session: Session) -> list[Partition]:
    """Our monthly partitions with their exact row counts, oldest first."""
    names = session.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": PARENT},
    ).scalars()
    found = []
    for name in names:
        month = month_of_partition(name)
        if month is None:  # someone else's partition: not ours to count or drop
            continue
        rows = session.execute(text(f"SELECT count(*) FROM {name}")).scalar_one()  # noqa: S608
        found.append(Partition(name, month, int(rows)))
    return sorted(found, key=lambda p: p.month)


def open_case_references(session: Session, month: dt.date) -> int:
    """How many snapshots of `month` an event of a still open case points at."""
    stmt = (
        select(func.count(distinct(BalanceSnapshot.id)))
        .join(MismatchEvent, MismatchEvent.snapshot_id == BalanceSnapshot.id)
        .join(MismatchCase, MismatchCase.id == MismatchEvent.case_id)
        .where(
            MismatchCase.status.in_(OPEN_CASE_STATUSES),
            # The partition's bounds: only that month's partition is read.
            BalanceSnapshot.business_date >= month,
            BalanceSnapshot.business_date < add_months(month, 1),
        )
    )
    return int(session.execute(stmt).scalar_one())


def drop(session: Session, partition: Partition) -> None:
    """Detach the partition, then drop it: its rows are gone for good."""
    if month_of_partition(partition.name) != partition.month:
        raise ValueError(f"{partition.name} is not the partition of {partition.month:%Y-%m}")
    session.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {partition.name}"))
    session.execute(text(f"DROP TABLE {partition.name}"))
