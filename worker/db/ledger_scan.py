"""The ledger scan's queries: its cursor (a row of `cursors`, locked while a scan runs) and
the ledger rows above it (worker.recon.rechecks.scan_ledger)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.orm import Session

from worker.db.models import Cursor, LedgerEntry
from worker.db.session import dialect_insert

_cursors = cast(Table, Cursor.__table__)
_ledger = cast(Table, LedgerEntry.__table__)


def lock_cursor(session: Session, name: str, *, initial: int, now: dt.datetime) -> int | None:
    """The cursor's value, row-locked for this transaction; None while another holds it.

    A missing cursor is created at `initial` first (ON CONFLICT: two first scans agree).
    """
    session.execute(
        dialect_insert(session, _cursors)
        .values(name=name, value=initial, updated_at=now)
        .on_conflict_do_nothing(index_elements=[_cursors.c.name])
    )
    return session.execute(
        select(_cursors.c.value).where(_cursors.c.name == name).with_for_update(skip_locked=True)
    ).scalar_one_or_none()


def set_cursor(session: Session, name: str, value: int, *, now: dt.datetime) -> None:
    session.execute(
        update(_cursors).where(_cursors.c.name == name).values(value=value, updated_at=now)
    )


def max_ledger_id(session: Session) -> int:
    return int(session.execute(select(func.coalesce(func.max(_ledger.c.id), 0))).scalar_one())


def ledger_rows_after(
    session: Session, *, high: int, gaps: Sequence[tuple[int, int]], limit: int
) -> list[tuple[int, str, str]]:
    """(id, openid, zone_id) of ledger rows above `high` or inside a gap range, by id."""
    where = [_ledger.c.id > high] + [_ledger.c.id.between(lo, hi) for lo, hi in gaps]
    rows = session.execute(
        select(_ledger.c.id, _ledger.c.openid, _ledger.c.zone_id)
        .where(or_(*where))
        .order_by(_ledger.c.id)
        .limit(limit)
    )
    return [(int(i), str(o), str(z)) for i, o, z in rows]
