"""Which months of snapshots exist and which may go: the partitions' one decision room.

Partitions exist for the current month and MONTHS_AHEAD after it (made ahead by a daily beat
task, so the night never waits on DDL) and for the month of any run created (a backfill of an
old date). Retention keeps the current month and the `keep_months - 1` before it: at least
two, since a statement compares a night with the one before. Older months are dropped only
when no still open case points at one of their snapshots. The SQL is worker/db/partitions.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session

from worker.db import partitions
from worker.db.partitions import Partition, add_months, month_of

MONTHS_AHEAD: Final = 2
MIN_KEEP_MONTHS: Final = 2


def months_to_ensure(today: dt.date) -> list[dt.date]:
    """The current month and the MONTHS_AHEAD after it."""
    return [add_months(month_of(today), n) for n in range(MONTHS_AHEAD + 1)]


def ensure_ahead(session: Session, today: dt.date) -> list[str]:
    """Create the partitions of the coming months that are missing (none on SQLite)."""
    if not partitions.partitioned(session):
        return []
    return partitions.ensure_months(session, months_to_ensure(today))


class RetentionRefused(Exception):
    """Retention cannot go ahead as asked; nothing was dropped."""


@dataclass(frozen=True, slots=True)
class Blocked:
    partition: Partition
    referenced: int  # snapshots of it that an open case's events point at


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    first_kept: dt.date  # the oldest month kept
    drop: list[Partition]
    blocked: list[Blocked]  # among `drop`: the ones an open case still needs


def plan_retention(session: Session, today: dt.date, keep_months: int) -> RetentionPlan:
    """What `keep_months` would drop today; RetentionRefused on SQLite or a bad number."""
    if keep_months < MIN_KEEP_MONTHS:
        raise RetentionRefused(
            f"--keep-months must be at least {MIN_KEEP_MONTHS}: the statement of the first"
            " day of a month needs the night before it"
        )
    if not partitions.partitioned(session):
        raise RetentionRefused(
            "retention drops the monthly partitions of balance_snapshots on Postgres;"
            " this database (SQLite) has none, nothing was dropped"
        )
    first_kept = add_months(month_of(today), -(keep_months - 1))
    drop = [p for p in partitions.month_partitions(session) if p.month < first_kept]
    blocked = []
    for partition in drop:
        referenced = partitions.open_case_references(session, partition.month)
        if referenced:
            blocked.append(Blocked(partition, referenced))
    return RetentionPlan(first_kept, drop, blocked)


def apply_retention(session: Session, plan: RetentionPlan) -> list[Partition]:
    """Detach and drop every partition of the plan, or none while any is blocked."""
    if plan.blocked:
        raise RetentionRefused("an open case still points at snapshots of a month to drop")
    for partition in plan.drop:
        partitions.drop(session, partition)
    return plan.drop
