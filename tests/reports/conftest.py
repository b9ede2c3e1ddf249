"""A small hand-made history for the statement tests, with every figure worked out by hand.

Business date D = 2026-11-20 in Asia/Shanghai (UTC+8, no DST): the day is
[2026-11-19 16:00Z, 2026-11-20 16:00Z). Run 1 is the nightly run of D-1, run 2 that of D,
run 3 a recheck on D (never counted), run 4 the nightly run of D+1, left incomplete.
The expected figures are in EXPECTED; tests/reports/README-style derivations sit beside them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy.orm import Session

from worker.config import load_settings
from worker.db.models import BalanceSnapshot, LedgerEntry, MismatchCase, MismatchEvent, Run
from worker.db.session import session_scope

TZ = ZoneInfo("Asia/Shanghai")
CAL = load_settings({"RECON_TIMEZONE": "Asia/Shanghai"}).calendar
D = dt.date(2026, 11, 20)


def local(day: int, hh: int, mm: int = 0, ss: int = 0, month: int = 11) -> dt.datetime:
    return dt.datetime(2026, month, day, hh, mm, ss, tzinfo=TZ)


# Per-account fetch times: the previous run (t0) and this run (t1).
T0 = {
    "a1": local(19, 2, 30),
    "a2": local(19, 2, 30, 5),
    "a3": local(19, 2, 30, 9),
    "a4": local(19, 2, 30, 12),
    "b1": local(19, 2, 31),
    "b2": local(19, 2, 31, 3),
}
T1 = {k: v + dt.timedelta(days=1) for k, v in T0.items()}
ZONE = {"a1": "1", "a2": "1", "a3": "1", "a4": "1", "b1": "2", "b2": "2"}

# (openid, status, balance, save_sum, cost_sum, present_sum) per run.
RUN1 = [
    ("a1", "ok", 100, 100, 0, 0),
    ("a2", "ok", 200, 200, 0, 0),
    ("a3", "unobservable", None, None, None, None),
    ("a4", "ok", 10, 10, 0, 0),
    ("b1", "ok", 0, 0, 0, 0),
    ("b2", "ok", 300, 300, 0, 0),
]
RUN2 = [
    ("a1", "ok", 134, 150, 20, 4),  # agrees with the ledger
    ("a2", "ok", 260, 200, 0, 60),  # Midas shows 20 gifted coins the ledger lacks
    ("a3", "ok", 70, 70, 0, 0),  # not observed in run 1: not compared
    ("a4", "unobservable", None, None, None, None),
    ("b1", "ok", 500, 500, 0, 0),
    ("b2", "error", None, None, None, None),
]

# (bill_no, openid, kind, amount, occurred_at)
LEDGER = [
    ("L01", "a1", "save", 5, local(18, 9)),  # before both windows
    ("L02", "a1", "save", 3, T0["a1"]),  # exactly at t0: already in the opening balance
    ("L03", "a1", "save", 50, local(19, 12)),
    ("L04", "a1", "cost", 30, local(19, 13)),
    ("L05", "a1", "cancel", 10, local(19, 14)),
    ("L06", "a1", "present", 4, T1["a1"]),  # exactly at t1: inside the window, and on day D
    ("L07", "a2", "present", 40, local(19, 20)),
    ("L08", "a2", "cost", 15, local(20, 9)),  # after t1, on day D
    ("L09", "a3", "save", 70, local(19, 8)),  # a3 is not compared
    ("L10", "a3", "present", 7, local(20, 0)),  # local midnight starting D: on day D
    ("L11", "a1", "save", 999, local(21, 0)),  # local midnight ending D: not on day D
    ("L12", "b1", "save", 500, local(20, 1)),  # in the window and on day D
    ("L13", "b1", "cost", 100, local(20, 3)),  # after t1, on day D
]

# case key -> (openid, check, [(at, from_status, to_status)])
CASES = {
    "c1": (
        "a2",
        "present_sum",
        [(local(20, 2, 31), None, "suspected"), (local(20, 2, 36), "suspected", "confirmed")],
    ),
    "c2": (
        "a2",
        "balance",
        [
            (local(20, 2, 31), None, "suspected"),
            (local(20, 2, 36), "suspected", "confirmed"),
            (local(20, 11), "confirmed", "acknowledged"),
        ],
    ),
    "c3": (
        "b1",
        "save_sum",
        [(local(20, 2, 31), None, "suspected"), (local(20, 2, 36), "suspected", "cleared")],
    ),
    "c4": (
        "a1",
        "cost_sum",
        [
            (local(18, 2, 31), None, "suspected"),
            (local(18, 2, 36), "suspected", "confirmed"),
            (local(20, 15), "confirmed", "resolved"),
        ],
    ),
    "c5": (
        "b2",
        "balance",
        [(local(19, 2, 31), None, "suspected"), (local(19, 2, 36), "suspected", "confirmed")],
    ),
    "c6": ("a1", "save_sum", [(local(21, 1), None, "suspected")]),
    "c7": (
        "b1",
        "cost_sum",
        [
            (local(19, 10), None, "suspected"),
            (local(19, 10, 5), "suspected", "confirmed"),
            (local(21, 0), "confirmed", "resolved"),
        ],
    ),
}

Z1: dict[str, Any] = dict(
    accounts=4,
    ok=3,
    unobservable=1,
    error=0,
    balance=464,
    save_sum=420,
    cost_sum=20,
    present_sum=64,
    compared=2,
    opening_balance=300,
    top_ups=50,
    gifts=44,
    spends=30,
    cancels=10,
    expected_closing=374,
    closing_balance=394,
    residual=20,
    midas_save_sum_change=50,
    midas_cost_sum_change=20,
    midas_present_sum_change=64,
    unexplained_save_sum=0,
    unexplained_cost_sum=0,
    unexplained_present_sum=20,
    day_save=0,
    day_cost=15,
    day_cancel=0,
    day_present=11,
    day_net=-4,
    cases_opened=2,
    cases_confirmed=2,
    cases_cleared=0,
    cases_resolved=1,
    cases_acknowledged=1,
    cases_open_at_end=2,
)
Z2: dict[str, Any] = dict(
    accounts=2,
    ok=1,
    unobservable=0,
    error=1,
    balance=500,
    save_sum=500,
    cost_sum=0,
    present_sum=0,
    compared=1,
    opening_balance=0,
    top_ups=500,
    gifts=0,
    spends=0,
    cancels=0,
    expected_closing=500,
    closing_balance=500,
    residual=0,
    midas_save_sum_change=500,
    midas_cost_sum_change=0,
    midas_present_sum_change=0,
    unexplained_save_sum=0,
    unexplained_cost_sum=0,
    unexplained_present_sum=0,
    day_save=500,
    day_cost=100,
    day_cancel=0,
    day_present=0,
    day_net=400,
    cases_opened=1,
    cases_confirmed=0,
    cases_cleared=1,
    cases_resolved=0,
    cases_acknowledged=0,
    cases_open_at_end=2,
)
TOTAL: dict[str, Any] = {k: Z1[k] + Z2[k] for k in Z1}
EXPECTED = {"1": Z1, "2": Z2, None: TOTAL}
# Trend points: the two complete nightly runs, and open cases at each local midnight.
TREND_TOTALS = {dt.date(2026, 11, 19): (610, 610, 0, 0), D: (964, 920, 20, 64)}
TREND_OPEN = {dt.date(2026, 11, 18): 1, dt.date(2026, 11, 19): 3, D: 4}


def _run(session: Session, day: int, kind: str, status: str, **counts: int) -> Run:
    run = Run(
        business_date=dt.date(2026, 11, day),
        kind=kind,
        trigger="beat",
        status=status,
        api_version="v1",
        started_at=local(day, 2, 30),
        finished_at=local(day, 2, 40),
        **counts,
    )
    session.add(run)
    session.flush()
    return run


def _snapshots(
    session: Session, run: Run, rows: list[tuple[Any, ...]], times: dict[str, Any]
) -> None:
    for openid, status, bal, save, cost, present in rows:
        ok = status == "ok"
        session.add(
            BalanceSnapshot(
                run_id=run.id,
                business_date=run.business_date,
                openid=openid,
                zone_id=ZONE[openid],
                fetched_at=times[openid],
                status=status,
                errcode=None if ok else (-1 if status == "error" else 90010),
                errmsg=None if ok else "seeded",
                balance=bal,
                gen_balance=0 if ok else None,
                save_amt=save,
                save_sum=save,
                cost_sum=cost,
                present_sum=present,
                first_save=(save > 0) if ok else None,
                api_version="v1",
            )
        )


def seed(session: Session) -> dict[str, int]:
    """Insert the history above; returns the run ids by name."""
    r1 = _run(session, 19, "nightly", "complete", planned=6, ok=5, unobservable=1)
    r2 = _run(
        session,
        20,
        "nightly",
        "complete",
        planned=6,
        ok=4,
        unobservable=1,
        error=1,
        mismatches_opened=3,
    )
    r3 = _run(session, 20, "recheck", "complete", planned=1, ok=1)
    r4 = _run(session, 21, "nightly", "incomplete", planned=6, ok=3, error=3)
    _snapshots(session, r1, RUN1, T0)
    _snapshots(session, r2, RUN2, T1)
    # A recheck of a1 later on D with other numbers: only nightly runs make the statement.
    _snapshots(session, r3, [("a1", "ok", 1, 1, 1, 1)], {"a1": local(20, 10)})
    _snapshots(session, r4, [("a1", "ok", 134, 150, 20, 4)], {"a1": local(21, 2, 30)})
    for bill, openid, kind, amount, at in LEDGER:
        session.add(
            LedgerEntry(
                bill_no=bill,
                openid=openid,
                zone_id=ZONE[openid],
                kind=kind,
                amount=amount,
                occurred_at=at,
            )
        )
    for openid, check, events in CASES.values():
        last_at, _, last_status = events[-1]
        case_row = MismatchCase(
            openid=openid,
            zone_id=ZONE[openid],
            check=check,
            status=last_status,
            midas_value=1,
            ledger_value=0,
            delta=1,
            first_seen_at=events[0][0],
            last_seen_at=last_at,
        )
        session.add(case_row)
        session.flush()
        for at, src, dst in events:
            session.add(
                MismatchEvent(
                    case_id=case_row.id,
                    at=at,
                    actor="system",
                    from_status=src,
                    to_status=dst,
                    midas_value=1,
                    ledger_value=0,
                )
            )
    session.flush()
    return {"r1": r1.id, "r2": r2.id, "r3": r3.id, "r4": r4.id}


@pytest.fixture
def seeded(db_url: str) -> tuple[str, dict[str, int]]:
    """The Postgres test database holding the history above, and the run ids."""
    with session_scope(db_url) as session:
        ids = seed(session)
    return db_url, ids
