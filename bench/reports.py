"""Benchmark 5, reports: `midas-recon report daily` over 30 nights x N accounts of snapshots.

    python -m bench.run_all --only reports --report-accounts 1000000   # 30 M snapshots

The data is tests/reports/test_report_speed.py's (one ledger row per account and day, one
account in 50 unobservable, 3,000 cases), seeded in SQL (INSERT … SELECT generate_series);
each format is timed after one warm call (imports, matplotlib's font cache), as an
operator's second call would be. Then one more `--format html` call with every SQL statement
timed: which query the time goes to. At 1M accounts the throwaway database holds ~14 GB
(seeding ~12 min on 2 cores); it is dropped at the end.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text

from bench.common import (
    PG_ADMIN_URL,
    database,
    environment,
    say,
    table_sizes,
    vacuum_analyze,
    write_result,
)

NAME = "reports"
GOAL_S = 2.0
# What one account-night takes in Postgres, indexes included: 14 GB for 30 M at 1M accounts.
BYTES_PER_ACCOUNT_NIGHT = 470


def main(accounts: int, out: Path | None = None) -> dict[str, Any]:
    from click.testing import CliRunner

    from tests.reports.test_report_speed import LAST, SEED
    from worker.cli.base import cli
    from worker.db.partitions import ensure_months

    _check_disk(accounts)
    with database() as url:
        seeding = time.monotonic()
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL TimeZone = 'UTC'"))
            for statement in SEED.split(";\n"):
                if statement.strip():
                    conn.execute(text(statement), {"n": accounts})
                if "INSERT INTO runs" in statement:
                    # Runs written directly, not created: their months' partitions are made here.
                    dates = conn.execute(text("SELECT DISTINCT business_date FROM runs"))
                    ensure_months(conn, dates.scalars())
        engine.dispose()
        vacuum_analyze(url)
        seeded = time.monotonic() - seeding
        snapshots = table_sizes(url)["balance_snapshots"][0]
        timings: dict[str, float] = {}
        with environment({"DATABASE_URL": url, "RECON_TIMEZONE": "Asia/Shanghai"}):
            runner = CliRunner()
            args = ["report", "daily", "--date", LAST.isoformat(), "--format"]
            warm = runner.invoke(cli, [*args, "html"])
            if warm.exit_code != 0:
                raise RuntimeError(f"report daily failed: {warm.output[-500:]}")
            for fmt in ("table", "json", "csv", "html"):
                started = time.perf_counter()
                result = runner.invoke(cli, [*args, fmt])
                timings[fmt] = round(time.perf_counter() - started, 3)
                if result.exit_code != 0:
                    raise RuntimeError(f"report daily --format {fmt} failed")
            queries = _timed_queries(url, lambda: runner.invoke(cli, [*args, "html"]))
    figures = {
        "accounts": accounts,
        "nights": 30,
        "snapshots": snapshots,
        "seed_s": round(seeded, 1),
        "seconds_by_format": timings,
        "slowest_s": max(timings.values()),
        "queries_s": queries,
        "goal_s": GOAL_S,
    }
    say(NAME, f"{accounts} accounts x 30 nights ({snapshots} snapshots): {timings}")
    write_result(NAME, figures, out=out)
    return figures


def _timed_queries(url: str, call: Any) -> list[tuple[float, str]]:
    """Seconds of each SQL statement `call` sends through the CLI's engine, slowest first
    (the first 100 characters of each, whitespace folded)."""
    from worker.db.session import engine_for

    engine: Engine = engine_for(url)
    started: dict[int, float] = {}
    timed: list[tuple[float, str]] = []

    def before(conn: Any, _cursor: Any, _statement: str, *_args: Any) -> None:
        started[id(conn)] = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        spent = time.perf_counter() - started.pop(id(conn), time.perf_counter())
        timed.append((round(spent, 3), " ".join(statement.split())[:100]))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    return sorted(timed, reverse=True)


def _check_disk(accounts: int) -> None:
    """Refuse to start a seeding that would fill the disk Postgres writes to (when it is this
    machine's): the data plus as much again for WAL and the index builds."""
    need = accounts * 30 * BYTES_PER_ACCOUNT_NIGHT * 2
    engine = create_engine(PG_ADMIN_URL)
    with engine.connect() as conn:
        folder = conn.execute(text("SHOW data_directory")).scalar_one()
    engine.dispose()
    if not Path(folder).exists():
        say(NAME, f"Postgres writes to {folder}, not on this machine: free space not checked")
        return
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(
            f"reports: {accounts} accounts need ~{need / 1e9:.0f} GB free where Postgres "
            f"writes ({folder}), {free / 1e9:.0f} GB are"
        )
