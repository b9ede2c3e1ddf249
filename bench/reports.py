"""Benchmark 5, reports: `midas-recon report daily` over 30 nights x N accounts of snapshots.

    python -m bench.run_all --only reports --report-accounts 1000000   # 30 M snapshots

The data is tests/reports/test_report_speed.py's (one ledger row per account and day, one
account in 50 unobservable, 3,000 cases), seeded in SQL (INSERT … SELECT generate_series);
each format is timed after one warm call (imports, connections), as an
operator's second call would be. Then one more `--format html` call with every SQL statement
timed: which query the time goes to. At 1M accounts the throwaway database holds ~14 GB
(seeding ~12 min on 2 cores); it is dropped at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
from worker.db.models import Run

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
        env = {"DATABASE_URL": url, "RECON_TIMEZONE": "Asia/Shanghai"}
        with environment(env):
            # Cold: no stored figures (an install before 20261204_0010, or figures that no
            # longer hold): every figure aggregated from the snapshots, as before.
            cold = _time_formats(env)
            stored_s = _store_figures(url)
            warm = _time_formats(env)
            runner = CliRunner()
            args = ["report", "daily", "--date", LAST.isoformat(), "--format", "html"]
            queries = _timed_queries(url, lambda: runner.invoke(cli, args))
    figures = {
        "accounts": accounts,
        "nights": 30,
        "snapshots": snapshots,
        "seed_s": round(seeded, 1),
        "seconds_by_format": warm["cli_in_process"],
        "slowest_s": max(warm["cli_in_process"].values()),
        "stored": warm,
        "cold": cold,
        "store_s_per_night": stored_s,
        "queries_s": queries,
        "goal_s": GOAL_S,
    }
    timings = warm["cli_in_process"]
    say(NAME, f"{accounts} accounts x 30 nights ({snapshots} snapshots): {timings}")
    write_result(NAME, figures, out=out)
    return figures


def _time_formats(env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each format through the CLI in this process (after one warm call) and as a new
    process (Python's start and imports included), and the statement and the trend built
    in-process the way the CLI builds them (second call)."""
    from click.testing import CliRunner

    from tests.reports.test_report_speed import LAST
    from worker.cli.base import cli
    from worker.config import load_settings
    from worker.db.session import session_scope
    from worker.reports.statement import build_statement, build_trend

    runner = CliRunner()
    args = ["report", "daily", "--date", LAST.isoformat(), "--format"]
    warm = runner.invoke(cli, [*args, "html"])
    if warm.exit_code != 0:
        raise RuntimeError(f"report daily failed: {warm.output[-500:]}") from warm.exception
    in_process: dict[str, float] = {}
    new_process: dict[str, float] = {}
    command = str(Path(sys.executable).parent / "midas-recon")
    for fmt in ("table", "json", "csv", "html"):
        started = time.perf_counter()
        result = runner.invoke(cli, [*args, fmt])
        in_process[fmt] = round(time.perf_counter() - started, 3)
        if result.exit_code != 0:
            raise RuntimeError(f"report daily --format {fmt} failed")
        started = time.perf_counter()
        subprocess.run(
            [command, *args, fmt], env={**os.environ, **env}, check=True, capture_output=True
        )
        new_process[fmt] = round(time.perf_counter() - started, 3)
    calendar = load_settings(env).calendar
    built: dict[str, float] = {}
    for _ in range(2):  # the second call: cache warm
        with session_scope(env["DATABASE_URL"]) as session:
            started = time.perf_counter()
            build_statement(session, LAST, calendar=calendar)
            built["statement"] = round(time.perf_counter() - started, 3)
            started = time.perf_counter()
            build_trend(session, LAST, calendar=calendar)
            built["trend"] = round(time.perf_counter() - started, 3)
    say(NAME, f"cli {in_process}, new process {new_process}, in-process {built}")
    return {"cli_in_process": in_process, "cli_new_process": new_process, "built": built}


def _store_figures(url: str) -> float:
    """Store every night's figures with the function a run's close calls
    (night_figures.store_after_close stores the run's, then the next date's: here each
    night once, in date order); returns the mean seconds per night."""
    from tests.reports.test_report_speed import FIRST, LAST
    from worker.business_calendar import utcnow
    from worker.db import night_figures
    from worker.db.session import session_scope
    from worker.db.statement import nightly_runs

    with session_scope(url) as session:
        ids = [run.id for run in nightly_runs(session, FIRST, LAST)]
    started = time.perf_counter()
    for run_id in ids:
        with session_scope(url) as session:
            run = session.get(Run, run_id)
            assert run is not None
            night_figures.store(session, run, now=utcnow())
    spent = (time.perf_counter() - started) / len(ids)
    say(NAME, f"stored the figures of {len(ids)} nights, {spent:.2f} s each")
    return round(spent, 3)


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
