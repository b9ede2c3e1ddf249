"""Benchmark 5, reports: `midas-recon report daily` over 30 nights x N accounts of snapshots.

The data is tests/reports/test_report_speed.py's (one ledger row per account and day, one
account in 50 unobservable, 3,000 cases), seeded in SQL; each format is timed after one warm
call (imports, matplotlib's font cache), as an operator's second call would be.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import database, environment, say, table_sizes, vacuum_analyze, write_result

NAME = "reports"
GOAL_S = 2.0


def main(accounts: int, out: Path | None = None) -> dict[str, Any]:
    from click.testing import CliRunner

    from tests.reports.test_report_speed import LAST, SEED
    from worker.cli.base import cli
    from worker.db.partitions import ensure_months

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
    figures = {
        "accounts": accounts,
        "nights": 30,
        "snapshots": snapshots,
        "seed_s": round(seeded, 1),
        "seconds_by_format": timings,
        "slowest_s": max(timings.values()),
        "goal_s": GOAL_S,
    }
    say(NAME, f"{accounts} accounts x 30 nights ({snapshots} snapshots): {timings}")
    write_result(NAME, figures, out=out)
    return figures
