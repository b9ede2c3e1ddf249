"""Benchmark 1, rate utilisation: does the fleet spend Midas' rate fully without exceeding it?

4 worker processes against the simulator answering after 50 ms, limit R (100 and 400 req/s):

- ours: 4 `celery -A worker worker --concurrency 1` processes running a nightly run of
  R x seconds accounts through the production tasks (pump, fetch_batch, the Redis limiter);
- baseline "R per worker": 4 `celery -A bench.celery_baseline worker --pool threads` processes,
  one task per account, `rate_limit="R/s"` (Celery's bucket is per worker instance);
- baseline "R/4 per worker": the same with `rate_limit="R/4 /s"`, the correct division.

The simulator records the arrival of every getbalance; from them: achieved rate / R (first to
last request, and over the middle of the run without the first and last second), the most
requests in any sliding one-second window, whole seconds above R and the requests Midas
would have refused with 45011.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import (
    REDIS_URL,
    SimProcess,
    database,
    environment,
    flush_redis,
    say,
    seed_world,
    wait_ready,
    wait_run,
    windows_above,
    worker_env,
    write_result,
)

NAME = "rate"
WORKERS = 4
# Each baseline worker: a prefork pool of this many processes (Celery's default pool; its
# event loop runs the rate limit's timer, where the threads pool, polling once a second, let
# through about one task per second per worker after the first burst).
BASELINE_POOL = os.environ.get("BENCH_BASELINE_POOL", "prefork")
BASELINE_CONCURRENCY = int(os.environ.get("BENCH_BASELINE_CONCURRENCY", "8"))
LATENCY_MS = 50.0
LEDGER_ROWS = 3


def figures(
    times: list[float], limit: float, wall_s: float, errors: dict[str, int]
) -> dict[str, Any]:
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    middle = [t for t in times if times[0] + 1.0 <= t <= times[-1] - 1.0]
    middle_span = span - 2.0
    rate = (len(times) - 1) / span if span > 0 else 0.0
    middle_rate = len(middle) / middle_span if middle_span > 0 else 0.0
    return {
        "requests": len(times),
        "span_s": round(span, 3),
        "wall_s": round(wall_s, 3),
        "achieved_rate": round(rate, 2),
        "utilisation": round(rate / limit, 4),
        "utilisation_middle": round(middle_rate / limit, 4),
        **windows_above(times, limit),
        "non_ok_answers": errors,
    }


def _errors(stats: dict[str, Any]) -> dict[str, int]:
    return {code: n for code, n in stats.get("by_errcode", {}).items() if str(code) != "0"}


def run_ours(
    url: str, sim: SimProcess, env: dict[str, str], n: int, workers: int, folder: Path
) -> dict[str, Any]:
    from tests.orchestration.conftest import Procs

    flush_redis(REDIS_URL)
    procs = Procs(env, folder)
    try:
        for w in range(workers):
            procs.worker(f"ours{w}", concurrency=1)
        with environment(env):
            from bench.common import start_run
            from worker.celery_app import app

            wait_ready(app, workers)
            sim.reset_stats()
            started = time.monotonic()
            run_id, planned = start_run(url, dt.date(2026, 11, 20))
            assert planned == n, (planned, n)
            finished = wait_run(url, run_id, timeout=60 + 4 * n / float(env["MIDAS_RATE_LIMIT"]))
    finally:
        procs.stop_all()
    return figures(
        sim.arrivals(), float(env["MIDAS_RATE_LIMIT"]), finished - started, _errors(sim.stats())
    )


def run_baseline(
    url: str,
    sim: SimProcess,
    env: dict[str, str],
    n: int,
    per_worker: float,
    workers: int,
    folder: Path,
    concurrency: int = BASELINE_CONCURRENCY,
) -> dict[str, Any]:
    from tests.orchestration.conftest import CELERY, Procs

    flush_redis(REDIS_URL)
    limit = float(env["MIDAS_RATE_LIMIT"])
    procs = Procs({**env, "BENCH_RATE_LIMIT": f"{per_worker:g}/s"}, folder)
    engine = create_engine(url)
    with engine.connect() as conn:
        accounts = conn.execute(
            text("SELECT openid, zone_id, session_key_enc FROM accounts ORDER BY id")
        ).all()
    engine.dispose()
    try:
        for w in range(workers):
            name = f"base{w}"
            cmd = [
                CELERY, "-A", "bench.celery_baseline", "worker", "--pool", BASELINE_POOL,
                "--concurrency", str(concurrency), "-Q", "baseline", "-n", f"{name}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
            ]  # fmt: skip
            procs._start(name, cmd)
        with environment({**env, "BENCH_RATE_LIMIT": f"{per_worker:g}/s"}):
            from bench.celery_baseline import app, fetch_account

            wait_ready(app, workers)
            sim.reset_stats()
            started = time.monotonic()
            with app.producer_or_acquire() as producer:
                for openid, zone_id, key_enc in accounts:
                    fetch_account.apply_async(args=(openid, zone_id, key_enc), producer=producer)
            deadline = started + 60 + 8 * n / min(limit, per_worker * workers)
            while sim.stats()["by_path"].get("/wxa/game/getbalance", 0) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("the baseline did not finish in time")
                time.sleep(0.1)
            finished = time.monotonic()
    finally:
        procs.stop_all()
    return figures(sim.arrivals(), limit, finished - started, _errors(sim.stats()))


def main(
    rates: list[float],
    seconds: float,
    out: Path | None = None,
    workers: int = WORKERS,
    max_in_flight: int | None = None,
    baselines: bool = True,
    baseline_concurrency: int = BASELINE_CONCURRENCY,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "latency_ms": LATENCY_MS,
        "workers": workers,
        "baseline_pool": f"{BASELINE_POOL} x {baseline_concurrency}",
        "max_in_flight": max_in_flight or "default (MIDAS_MAX_IN_FLIGHT=32)",
        "rates": {},
    }
    for rate in rates:
        n = int(rate * seconds)
        with database() as url, SimProcess(n, LEDGER_ROWS, latency_ms=LATENCY_MS) as sim:
            env = worker_env(url, REDIS_URL, sim.base_url, MIDAS_RATE_LIMIT=f"{rate:g}")
            if max_in_flight is not None:
                env["MIDAS_MAX_IN_FLIGHT"] = str(max_in_flight)
            seed_world(url, n, LEDGER_ROWS, env)
            with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
                folder = Path(tmp)
                row = {"accounts": n, "ours": run_ours(url, sim, env, n, workers, folder)}
                if baselines:
                    for label, per_worker in (
                        ("celery_rate_limit_R_per_worker", rate),
                        ("celery_rate_limit_R_over_4_per_worker", rate / workers),
                    ):
                        row[label] = run_baseline(
                            url, sim, env, n, per_worker, workers, folder, baseline_concurrency
                        )
        flush_redis(REDIS_URL)
        results["rates"][f"{rate:g}"] = row
        for label, f in row.items():
            if label == "accounts":
                continue
            say(
                NAME,
                f"R={rate:g} {label}: {f['achieved_rate']} req/s = {f['utilisation']:.3f} R "
                f"(middle {f['utilisation_middle']:.3f}), max {f['max_in_any_1s_window']} in 1 s, "
                f"{f['seconds_above_limit']} s above R, {f['arrivals_over_limit']} over the limit",
            )
    write_result(NAME, results, out=out)
    return results
