"""Ledger repository: the game's coin movements, written by `ledger import` or by the game.

The game may also INSERT into `ledger_entries` directly, from its own transaction, e.g.

    INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)
    VALUES ('B20261124-0001', 'o6_bmjrPTlm6_2sgVt7hMZOPfL2M', '1', 'save', 600,
            '2026-11-24T10:00:00+08:00')
    ON CONFLICT (bill_no) DO NOTHING;

The table itself refuses what can never be right: a bill_no twice, a kind other than
save/cost/cancel/present, an amount that is not a positive integer. Amounts are whole coins
(BIGINT); occurred_at is a timestamp with time zone. `recorded_at` and `id` are ours.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import cast

from sqlalchemy import Table, func, select
from sqlalchemy.orm import Session

from worker.db import partitions
from worker.db.models import Account, BalanceSnapshot, LedgerEntry
from worker.db.session import dialect_insert
from worker.vocabulary import SnapshotStatus

BATCH_SIZE = 1000
COMPARED = ("openid", "zone_id", "kind", "amount", "occurred_at")

_ledger = cast(Table, LedgerEntry.__table__)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One coin movement as supplied, with where it came from for error messages."""

    bill_no: str
    openid: str
    zone_id: str
    kind: str
    amount: int
    occurred_at: dt.datetime
    row: int = 0  # its row in the source file (the header is row 1)
    repeats_row: int | None = None  # an earlier row of the same file with this bill_no


@dataclass(frozen=True, slots=True)
class LedgerImportResult:
    inserted: int
    already_present: int  # identical to an entry already stored (a re-import)


class LedgerConflict(Exception):
    """A bill_no already stored (or earlier in the file) with different content."""

    def __init__(self, row: LedgerRow, differs: list[str]) -> None:
        self.row = row.row
        self.bill_no = row.bill_no
        self.differs = differs
        what = ", ".join(differs)
        if row.repeats_row is not None:
            reason = f"bill_no {row.bill_no} repeats row {row.repeats_row} with a different {what}"
        else:
            reason = f"bill_no {row.bill_no} is already in the ledger with a different {what}"
        super().__init__(f"row {row.row}: {reason}")


def import_entries(
    session: Session, rows: Iterable[LedgerRow], *, batch_size: int = BATCH_SIZE
) -> LedgerImportResult:
    """Insert new entries, check known ones are identical; raise LedgerConflict otherwise.

    Runs in the caller's transaction: on any error the caller rolls back and nothing is kept.
    """
    inserted = present = 0
    source = iter(rows)
    for batch in iter(lambda: list(islice(source, batch_size)), []):
        fresh = _insert_new(session, batch)
        _verify(session, batch)
        inserted += len(fresh)
        present += len(batch) - len(fresh)
    return LedgerImportResult(inserted=inserted, already_present=present)


def _insert_new(session: Session, batch: list[LedgerRow]) -> set[str]:
    """Insert the batch, skipping known bill_nos; returns the bill_nos actually inserted."""
    stmt = (
        dialect_insert(session, _ledger)
        .on_conflict_do_nothing(index_elements=[_ledger.c.bill_no])
        .returning(_ledger.c.bill_no)
    )
    params = [
        {
            "bill_no": r.bill_no,
            "openid": r.openid,
            "zone_id": r.zone_id,
            "kind": r.kind,
            "amount": r.amount,
            "occurred_at": r.occurred_at,
        }
        for r in batch
    ]
    return set(session.execute(stmt, params).scalars())


def _verify(session: Session, batch: list[LedgerRow]) -> None:
    """Every row of the batch must now match what is stored under its bill_no."""
    # All rows, not only the skipped ones: with a bill_no twice in one batch, the database
    # decides which copy went in, and the other must be compared with it.
    stored = {
        entry.bill_no: entry
        for entry in session.execute(
            select(_ledger).where(_ledger.c.bill_no.in_({r.bill_no for r in batch}))
        )
    }
    for row in batch:
        entry = stored[row.bill_no]
        differs = [name for name in COMPARED if getattr(entry, name) != getattr(row, name)]
        if differs:
            raise LedgerConflict(row, differs)


def last_id(session: Session) -> int:
    """The highest ledger id so far (0 for an empty ledger)."""
    return int(session.execute(select(func.max(_ledger.c.id))).scalar_one() or 0)


def accounts_compared_without(session: Session, after_id: int) -> list[int]:
    """Accounts with ledger rows newer than id `after_id` that an `ok` snapshot fetched at or
    after the earliest of those rows' times has already compared without them: their cases
    (and their last comparison) are stale until they are fetched again."""
    led = _ledger
    snap, acc = cast(Table, BalanceSnapshot.__table__), cast(Table, Account.__table__)
    # Only the months that may hold a snapshot fetched after the earliest late row are read
    # (one index descent per month kept otherwise: docs/benchmarks.md §3b).
    earliest = select(func.min(led.c.occurred_at)).where(led.c.id > after_id).scalar_subquery()
    in_months = partitions.in_months_fetched_since(session, snap.c.business_date, earliest)
    late = (
        select(led.c.openid, led.c.zone_id, func.min(led.c.occurred_at).label("earliest"))
        .where(led.c.id > after_id)
        .group_by(led.c.openid, led.c.zone_id)
        .subquery("late")
    )
    compared = (
        select(snap.c.id)
        .where(
            snap.c.openid == late.c.openid,
            snap.c.zone_id == late.c.zone_id,
            snap.c.status == SnapshotStatus.OK,
            snap.c.fetched_at >= late.c.earliest,
            *in_months,
        )
        .exists()
    )
    query = (
        select(acc.c.id)
        .join(late, (late.c.openid == acc.c.openid) & (late.c.zone_id == acc.c.zone_id))
        .where(compared)
        .order_by(acc.c.id)
    )
    return [int(a) for a in session.execute(query).scalars()]
