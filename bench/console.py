"""Benchmark 6, the operators' console: `/cases` filtered and paged over C cases, and
`/accounts/<openid>` with 365 nights of snapshots among A accounts, over real HTTP to the
production server (waitress, as `midas-recon web` runs it) with a logged-in operator.

Seeded set-based in SQL (INSERT … SELECT generate_series): A accounts, each with one ledger row
and one snapshot of the latest night; 1,000 of them (the measured one among them) with a
snapshot in each of 365 nightly runs and three ledger rows a night; C cases over C distinct
accounts, four checks, every status, |delta| from 1 to 10,000, first seen over the year, each
with its opening event. Each URL is timed `repeat` times after two warm calls; the figure is
the median (p95 beside it) of the whole request as a client sees it.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text

from bench.common import database, say, table_sizes, vacuum_analyze, write_result

NAME = "console"
GOAL_MS = 200.0
NIGHTS = 365
HISTORY_ACCOUNTS = 1000
TARGET = "b00000007"  # one of the accounts with a year of history
LAST_NIGHT = "2026-12-03"
PASSWORD = "benchmark operator password"  # noqa: S105  (a throwaway database's operator)

SEED = """
INSERT INTO accounts (openid, zone_id, last_active_at, created_at, updated_at)
SELECT 'b' || lpad(i::text, 8, '0'), '1', now(), now(), now()
FROM generate_series(1, :accounts) AS i;

INSERT INTO runs (business_date, kind, trigger, status, api_version, planned, ok,
                  unobservable, error, mismatches_opened, created_at, started_at, finished_at)
SELECT d::date, 'nightly', 'beat', 'complete', 'v2', 0, 0, 0, 0, 0,
       d + interval '18 hours 30 minutes', d + interval '18 hours 30 minutes',
       d + interval '19 hours'
FROM generate_series(CAST(:last_night AS date) - (:nights - 1), CAST(:last_night AS date),
                     interval '1 day') AS d;

-- The latest night: every account observed once.
INSERT INTO balance_snapshots (run_id, business_date, openid, zone_id, fetched_at, status,
    balance, gen_balance, save_amt, save_sum, cost_sum, present_sum, first_save, api_version)
SELECT (SELECT max(id) FROM runs), CAST(:last_night AS date), 'b' || lpad(i::text, 8, '0'), '1',
       CAST(:last_night AS timestamptz) + interval '18 hours 31 minutes', 'ok',
       i % 5000, 0, i % 7000, i % 7000, i % 2000, 0, false, 'v2'
FROM generate_series(1 + :history, :accounts) AS i;

-- A year of nights for the first HISTORY_ACCOUNTS accounts (the measured one among them).
INSERT INTO balance_snapshots (run_id, business_date, openid, zone_id, fetched_at, status,
    balance, gen_balance, save_amt, save_sum, cost_sum, present_sum, first_save, api_version)
SELECT r.id, r.business_date, 'b' || lpad(i::text, 8, '0'), '1',
       r.business_date + interval '18 hours 31 minutes', 'ok',
       300 * n - 120 * n + 10 * n, 10 * n, 300 * n, 300 * n, 120 * n, 10 * n,
       false, 'v2'
FROM (SELECT id, business_date, row_number() OVER (ORDER BY business_date) AS n FROM runs) AS r
CROSS JOIN generate_series(1, :history) AS i;

-- Ledger: three rows a night for the year-long accounts, one row for every other account.
INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at, recorded_at)
SELECT 'L' || i || '-' || k.kind || '-' || d::date, 'b' || lpad(i::text, 8, '0'), '1', k.kind,
       k.amount, d + interval '12 hours', now()
FROM generate_series(CAST(:last_night AS date) - (:nights - 1), CAST(:last_night AS date),
                     interval '1 day') AS d
CROSS JOIN generate_series(1, :history) AS i
CROSS JOIN (VALUES ('save', 300), ('cost', 120), ('present', 10)) AS k(kind, amount);

INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at, recorded_at)
SELECT 'S' || i, 'b' || lpad(i::text, 8, '0'), '1', 'save', 1 + i % 7000,
       CAST(:last_night AS timestamptz), now()
FROM generate_series(1 + :history, :accounts) AS i;

-- Cases over distinct accounts: four checks, every status, |delta| 1..10,000, over the year.
INSERT INTO mismatch_cases (openid, zone_id, "check", status, midas_value, ledger_value, delta,
    first_seen_at, last_seen_at, opened_run_id, confirm_due_at)
SELECT 'b' || lpad(i::text, 8, '0'), '1',
       (ARRAY['save_sum', 'cost_sum', 'present_sum', 'balance'])[1 + i % 4],
       (ARRAY['confirmed', 'confirmed', 'suspected', 'acknowledged', 'resolved',
              'cleared'])[1 + i % 6],
       1000 + (1 + (i * 7919) % 10000) * (CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END), 1000,
       (1 + (i * 7919) % 10000) * (CASE WHEN i % 2 = 0 THEN 1 ELSE -1 END),
       CAST(:last_night AS timestamptz) - (i % :nights) * interval '1 day',
       CAST(:last_night AS timestamptz), NULL, NULL
FROM generate_series(1, :cases) AS i;

INSERT INTO mismatch_events (case_id, at, actor, from_status, to_status, midas_value,
    ledger_value, snapshot_id, run_id, note)
SELECT id, first_seen_at, 'system', NULL, 'suspected', midas_value, ledger_value, NULL, NULL, NULL
FROM mismatch_cases;
"""


def _seed(url: str, accounts: int, cases: int, nights: int, history: int) -> None:
    from worker.db.partitions import add_months, ensure_months, month_of

    # The runs are written directly, not created: their months' partitions are made here.
    last_night = dt.date.fromisoformat(LAST_NIGHT)
    months, month = [], month_of(last_night - dt.timedelta(days=nights - 1))
    while month <= last_night:
        months.append(month)
        month = add_months(month, 1)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
        ensure_months(conn, months)
        for statement in SEED.split(";\n"):
            if statement.strip():
                conn.execute(
                    text(statement),
                    {
                        "accounts": accounts,
                        "cases": cases,
                        "nights": nights,
                        "history": history,
                        "last_night": LAST_NIGHT,
                    },
                )
    engine.dispose()


def _log_in(base: str) -> requests.Session:
    http = requests.Session()
    page = http.get(f"{base}/login", timeout=30)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if token is None:
        raise RuntimeError("no CSRF token on the login page")
    answer = http.post(
        f"{base}/login",
        data={"csrf_token": token.group(1), "name": "bench", "password": PASSWORD},
        timeout=30,
    )
    if "operator-name" not in answer.text:
        raise RuntimeError("the benchmark operator could not log in")
    return http


def _time(http: requests.Session, url: str, repeat: int, check: str) -> dict[str, Any]:
    for _ in range(2):  # warm: the first calls compile templates and fill the pool
        http.get(url, timeout=60).raise_for_status()
    samples = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        answer = http.get(url, timeout=60)
        samples.append(1000 * (time.perf_counter() - started))
        answer.raise_for_status()
        if check not in answer.text:
            raise RuntimeError(f"{url} does not show {check!r}")
        size = len(answer.content)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 1),
        "p95_ms": round(samples[max(0, int(0.95 * len(samples)) - 1)], 1),
        "min_ms": round(samples[0], 1),
        "bytes": size,
    }


def main(
    accounts: int, cases: int, *, repeat: int = 30, nights: int = NIGHTS, out: Path | None = None
) -> dict[str, Any]:
    import datetime as dt

    from worker.config import load_settings
    from worker.db.session import session_scope
    from worker.web.operators import add_operator
    from worker.web.server import make_server

    history = min(HISTORY_ACCOUNTS, accounts)
    with database() as url:
        seeding = time.monotonic()
        _seed(url, accounts, cases, nights, history)
        with session_scope(url) as session:
            add_operator(session, "bench", PASSWORD, now=dt.datetime.now(dt.UTC))
        vacuum_analyze(url)
        seeded = time.monotonic() - seeding
        sizes = table_sizes(url)
        say(
            NAME,
            f"seeded in {seeded:.0f} s: "
            + ", ".join(f"{k} {v[0]:,}" for k, v in sorted(sizes.items()) if v[0]),
        )
        settings = load_settings({"DATABASE_URL": url, "RECON_TIMEZONE": "Asia/Shanghai"})
        server = make_server(settings, "127.0.0.1", 0)
        thread = threading.Thread(target=server.run, name="console-bench", daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.effective_port}"
        try:
            http = _log_in(base)
            last = dt.date.fromisoformat(LAST_NIGHT)
            urls = {
                "cases, default (open, largest |delta|, page 1)": (f"{base}/cases", "case-total"),
                "cases, filtered and paged": (
                    f"{base}/cases?status=open&check=balance&zone_id=1&min_delta=100"
                    f"&opened_from={last - dt.timedelta(days=180)}&opened_to={last}"
                    "&sort=delta&page=3&per_page=50",
                    "case-total",
                ),
                "cases, all statuses, oldest first, page 100": (
                    f"{base}/cases?status=all&sort=age&page=100&per_page=50",
                    "case-total",
                ),
                "api/cases, filtered and paged": (
                    f"{base}/api/cases?status=open&check=balance&min_delta=100&page=3",
                    '"total"',
                ),
                f"accounts/{TARGET}, {nights} nights": (
                    f"{base}/accounts/{TARGET}?zone_id=1",
                    "polyline",
                ),
                f"api/accounts/{TARGET}": (f"{base}/api/accounts/{TARGET}?zone_id=1", '"fetches"'),
            }
            timings = {}
            for label, (target, check) in urls.items():
                timings[label] = _time(http, target, repeat, check)
                say(
                    NAME,
                    f"{label}: median {timings[label]['median_ms']} ms, "
                    f"p95 {timings[label]['p95_ms']} ms",
                )
        finally:
            server.close()
            thread.join(timeout=10)
    figures = {
        "accounts": accounts,
        "cases": cases,
        "nights_of_history": nights,
        "snapshots": sizes["balance_snapshots"][0],
        "ledger_entries": sizes["ledger_entries"][0],
        "seed_s": round(seeded, 1),
        "repeat": repeat,
        "timings": timings,
        "goal_median_ms": GOAL_MS,
        "slowest_median_ms": max(t["median_ms"] for t in timings.values()),
    }
    write_result(NAME, figures, out=out)
    return figures


if __name__ == "__main__":  # python -m bench.console (run_all --only console is the usual way)
    main(20_000, 5_000, repeat=10)
