"""Benchmark 3b: what the months kept cost a batch, with 1, 12 and 24 monthly partitions of
`balance_snapshots` holding rows.

The reads of `balance_snapshots` on a batch's path that have no `business_date` bound, and so
visit every month's partition: the "is there a newer ok snapshot" probe of
`current_ok_snapshots` (once per batch, one probe per snapshot). For comparison, the account
locks of the same batch (`lock_accounts_of_snapshots`, bounded by the run's date), and the
ledger scan's `accounts_compared_without` (once per scan tick with late rows, unbounded).
Each is timed on batches of the newest night, then explained (`EXPLAIN (ANALYZE, BUFFERS)`)
once.

    python -m bench.run_all --only partitions       # 20,000 accounts, 4 nights a month
    python -m bench.run_all --only partitions --part-accounts 2000 --part-months 1,3
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from bench.common import database, say, seed_accounts, vacuum_analyze, write_result

BATCH = 200  # MAX_BATCH: the snapshots one batch reconciles
NEWEST = dt.date(2026, 11, 1)  # the month of the newest night, the one the batches are of

# One night of `n` accounts: a complete run and an ok snapshot per account, fetched that night.
SEED_NIGHT = """
WITH run AS (
    INSERT INTO runs (business_date, kind, trigger, status, api_version, planned, ok)
    VALUES (:day, 'nightly', 'bench', 'complete', 'v2', :n, :n) RETURNING id
)
INSERT INTO balance_snapshots (run_id, business_date, openid, zone_id, fetched_at, status,
    balance, gen_balance, save_amt, save_sum, cost_sum, present_sum, first_save, api_version)
SELECT run.id, :day, 'b' || lpad(a::text, 8, '0'), '1',
       :day + INTERVAL '1 day 3 hours' + a * INTERVAL '10 milliseconds', 'ok',
       500, 500, 0, 700, 200, 0, true, 'v2'
FROM run CROSS JOIN generate_series(1, :n) a
"""


def months_back(count: int) -> list[dt.date]:
    """`count` months ending with NEWEST, newest first."""
    out, month = [], NEWEST
    for _ in range(count):
        out.append(month)
        month = (month - dt.timedelta(days=1)).replace(day=1)
    return out


def seed_month(url: str, month: dt.date, accounts: int, nights: int) -> None:
    from worker.db import partitions
    from worker.db.session import session_scope

    with session_scope(url) as session:
        partitions.ensure_months(session, [month])
        for k in range(nights):
            day = month + dt.timedelta(days=k * 7)  # weekly nights (fewer rows to seed)
            session.execute(text(SEED_NIGHT), {"day": day, "n": accounts})
            # What the batches that stored the night would have noted (snapshot_months; the
            # check lets the same script measure the code before it).
            latest = session.execute(
                text("SELECT max(fetched_at) FROM balance_snapshots WHERE business_date = :d"),
                {"d": day},
            ).scalar_one()
            if hasattr(partitions, "note_fetched"):
                partitions.note_fetched(session, day, latest)


def newest_batches(session: Session, count: int) -> tuple[dt.date, list[list[int]]]:
    """`count` batches of snapshot ids of the newest night, spread over its accounts."""
    day, run_id = session.execute(
        text("SELECT business_date, id FROM runs ORDER BY business_date DESC LIMIT 1")
    ).one()
    ids = list(
        session.execute(
            text("SELECT id FROM balance_snapshots WHERE run_id = :r ORDER BY id"), {"r": run_id}
        ).scalars()
    )
    step = max(BATCH, len(ids) // count)
    return day, [ids[i : i + BATCH] for i in range(0, len(ids) - BATCH + 1, step)][:count]


@contextmanager
def captured(session: Session) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and their parameters) this session sends meanwhile."""
    found: list[tuple[str, Any]] = []
    engine = session.get_bind()

    def note(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        found.append((statement, params))

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield found
    finally:
        event.remove(engine, "before_cursor_execute", note)


def explain(session: Session, call: Callable[[], object]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the SELECTs `call` sends (run inside, then rolled back)."""
    with captured(session) as statements:
        call()
    raw = session.connection().connection.driver_connection
    assert raw is not None
    plans = []
    for statement, params in statements:
        if not statement.lstrip().upper().startswith("SELECT"):
            continue
        with raw.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, params)
            plans.append("\n".join(row[0] for row in cur.fetchall()))
    return plans


def timed(calls: list[Callable[[], object]]) -> dict[str, float]:
    """Wall ms per call (a warm-up call first, not counted)."""
    calls[0]()
    spent = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        spent.append((time.perf_counter() - t0) * 1000)
    return {
        "median_ms": round(statistics.median(spent), 3),
        "p90_ms": round(sorted(spent)[int(len(spent) * 0.9) - 1], 3),
        "calls": len(spent),
    }


def measure(url: str, batches: int, late_accounts: int) -> dict[str, Any]:
    from worker.db import cases as repo
    from worker.db.ledger import accounts_compared_without
    from worker.db.session import session_scope

    with session_scope(url) as session:
        day, chunks = newest_batches(session, batches)
        # Ledger rows booked late for `late_accounts` accounts, older than the newest night:
        # every one of them was compared without its row, so the intake finds them all.
        after_id = session.execute(text("SELECT coalesce(max(id), 0) FROM ledger_entries"))
        after = int(after_id.scalar_one())
        session.execute(
            text(
                "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)"
                " SELECT 'late' || a, 'b' || lpad(a::text, 8, '0'), '1', 'save', 1, :at"
                " FROM generate_series(1, :n) a"
            ),
            {"at": dt.datetime.combine(day, dt.time(1), dt.UTC), "n": late_accounts},
        )
        out: dict[str, Any] = {
            "current_ok_snapshots": timed(
                [lambda c=c: repo.current_ok_snapshots(session, c, day) for c in chunks]
            ),
            "lock_accounts_of_snapshots": timed(
                [lambda c=c: repo.lock_accounts_of_snapshots(session, c, day) for c in chunks]
            ),
            "accounts_compared_without": timed(
                [lambda: accounts_compared_without(session, after) for _ in range(5)]
            ),
        }
        found = len(accounts_compared_without(session, after))
        assert found == late_accounts, (found, late_accounts)
        assert len(repo.current_ok_snapshots(session, chunks[0], day)) == BATCH
        out["explain"] = {
            "current_ok_snapshots": explain(
                session, lambda: repo.current_ok_snapshots(session, chunks[1], day)
            ),
            "accounts_compared_without": explain(
                session, lambda: accounts_compared_without(session, after)
            ),
        }
        session.rollback()
    return out


def main(
    accounts: int,
    months: list[int],
    nights: int,
    *,
    batches: int = 50,
    late_accounts: int = 200,
    out: Path | None = None,
) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "accounts": accounts,
        "nights_per_month": nights,
        "batch": BATCH,
        "late_accounts": late_accounts,
        "by_months": {},
    }
    with database() as url:
        seed_accounts(url, accounts, with_keys=False)
        seeded: list[dt.date] = []
        for count in sorted(months):
            t0 = time.monotonic()
            for month in months_back(count):
                if month not in seeded:
                    seed_month(url, month, accounts, nights)
                    seeded.append(month)
            vacuum_analyze(url)
            seed_s = time.monotonic() - t0
            result = measure(url, batches, late_accounts)
            result["seed_s"] = round(seed_s, 1)
            result["snapshot_rows"] = accounts * nights * count
            figures["by_months"][str(count)] = result
            say(
                "partitions",
                f"{count} months ({result['snapshot_rows']:,} snapshots): current_ok_snapshots "
                f"{result['current_ok_snapshots']['median_ms']} ms per batch of {BATCH}, "
                f"account locks {result['lock_accounts_of_snapshots']['median_ms']} ms, "
                f"accounts_compared_without {result['accounts_compared_without']['median_ms']} ms",
            )
    write_result("partitions", figures, out=out)
    return figures
