"""Fixtures for the reconciliation tests: a session on a migrated database and `Books`, which
writes ledger rows and snapshots through the models as the game and the fetcher would.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator, Mapping

import pytest
from sqlalchemy.orm import Session

from worker.db.models import BalanceSnapshot, LedgerEntry, Run
from worker.db.session import engine_for
from worker.db.snapshots import SnapshotRow, insert_snapshots

T0 = dt.datetime(2026, 11, 24, 18, 30, tzinfo=dt.UTC)  # 02:30 in Asia/Shanghai
SETTLE = 300
_bills = itertools.count(1)

KINDS = ("save", "cost", "cancel", "present")
# PRODUCT.md §5 read by hand: which checks a change on either side must show.
AFFECTED_BY_KIND = {
    "save": {"save_sum", "balance"},
    "cost": {"cost_sum", "balance"},
    "cancel": {"cost_sum", "balance"},
    "present": {"present_sum", "balance"},
}
AFFECTED_BY_FIELD = {
    "balance": {"balance"},
    "save_sum": {"save_sum"},
    "cost_sum": {"cost_sum"},
    "present_sum": {"present_sum"},
    "gen_balance": set(),  # no default check reads it
    "save_amt": set(),
}


def expected_counters(rows: list[tuple[str, int]]) -> dict[str, int]:
    """What Midas shows when it agrees with these (kind, amount) rows: PRODUCT.md §5 by hand."""
    total = {k: sum(a for kind, a in rows if kind == k) for k in KINDS}
    return {
        "save_sum": total["save"],
        "cost_sum": total["cost"] - total["cancel"],
        "present_sum": total["present"],
        "balance": total["save"] + total["present"] - total["cost"] + total["cancel"],
        "gen_balance": total["present"],
        "save_amt": total["save"],
    }


class Books:
    """The game's ledger and Midas' answers for a test, written through the models."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.rows: dict[tuple[str, str], list[tuple[str, int, dt.datetime]]] = {}

    def run(self, kind: str = "recheck") -> Run:
        run = Run(business_date=T0.date(), kind=kind, trigger="test", api_version="v1")
        self.session.add(run)
        self.session.flush()
        return run

    def ledger(
        self, openid: str, kind: str, amount: int, at: dt.datetime, zone_id: str = "1"
    ) -> LedgerEntry:
        entry = LedgerEntry(
            bill_no=f"B{next(_bills):08d}",
            openid=openid,
            zone_id=zone_id,
            kind=kind,
            amount=amount,
            occurred_at=at,
        )
        self.session.add(entry)
        self.rows.setdefault((openid, zone_id), []).append((kind, amount, at))
        return entry

    def agreeing(self, openid: str, at: dt.datetime, zone_id: str = "1") -> dict[str, int]:
        """Counters that agree with this test's own ledger rows up to `at` (inclusive)."""
        rows = self.rows.get((openid, zone_id), [])
        return expected_counters([(k, a) for k, a, when in rows if when <= at])

    def snapshot(
        self,
        openid: str,
        at: dt.datetime,
        *,
        zone_id: str = "1",
        status: str = "ok",
        off: Mapping[str, int] | None = None,
        run: Run | None = None,
    ) -> BalanceSnapshot:
        """A snapshot fetched at `at`: agreeing with the ledger, shifted by `off` per counter.

        Stored the way a batch stores it (`insert_snapshots`), which on Postgres also notes
        the month's latest fetch that the "is there a newer snapshot" probe reads."""
        run = run or self.run()
        values: dict[str, int | bool] = {}
        if status == "ok":
            counters = self.agreeing(openid, at, zone_id)
            for name, delta in (off or {}).items():
                counters[name] += delta
            values = {**counters, "first_save": counters["save_sum"] > 0}
        row = SnapshotRow(
            openid,
            zone_id,
            at,
            status,
            "v1",
            errcode=None if status == "ok" else -1,
            errmsg=None if status == "ok" else "system error",
            values=tuple(values.items()),
        )
        (stored,) = insert_snapshots(self.session, run.id, run.business_date, [row])
        snap = self.session.get(BalanceSnapshot, (stored.id, run.business_date))
        assert snap is not None
        return snap


@pytest.fixture
def pg_session(db_url: str) -> Iterator[Session]:
    """A session on the (emptied) test Postgres; the test decides whether to commit."""
    with Session(engine_for(db_url)) as session:
        yield session
        session.rollback()


@pytest.fixture
def books(pg_session: Session) -> Books:
    return Books(pg_session)
