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

For ours, arrivals are counted by the kernel's receive time at the simulator's socket
(`SimConfig.kernel_stamps`, what a remote Midas would count) and, as before, by the time the
simulator's handler counted them (`by_handler`: adds the simulator's own scheduling); the
workers run `bench.rate_probe` (the production app, timed from outside), which records when
the schedule reserved each request and when it was written to the socket. `--rate-margins`
and `--rate-repeats` run ours per MIDAS_RATE_MARGIN_S, several times.
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
    machine_cpu_s,
    percentiles_ms,
    say,
    seed_world,
    tree_cpu_s,
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


def _client_records(redis_url: str) -> list[tuple[float, float, float, int]]:
    """What `bench.rate_probe` recorded in the workers: (sched, wake, send, re-reservations)."""
    import json

    import redis

    from bench.rate_probe import PROBE_KEY

    client = redis.Redis.from_url(redis_url)
    try:
        batches = client.lrange(PROBE_KEY, 0, -1)
    finally:
        client.close()
    return [tuple(r) for b in batches for r in json.loads(b)]  # type: ignore[misc]


def timing(
    stamps: list[tuple[float | None, float]],
    client: list[tuple[float, float, float, int]],
    limit: float,
) -> dict[str, Any]:
    """Ours by the handler's clock, the lags on the way, and the windows at the sockets."""
    from worker.simulator import max_per_window

    handler = sorted(h for _, h in stamps)
    sends = sorted(c[2] for c in client)
    return {
        "by_handler": {
            k: v for k, v in figures(handler, limit, 0.0, {}).items() if k not in WALL_ONLY
        },
        "without_kernel_stamp": sum(1 for k, _ in stamps if k is None),
        "lag_ms": {
            "handler_minus_kernel": percentiles_ms([h - k for k, h in stamps if k is not None]),
            "send_minus_sched": percentiles_ms([c[2] - c[0] for c in client]),
            "wake_minus_sched": percentiles_ms([c[1] - c[0] for c in client]),
            "send_minus_wake": percentiles_ms([c[2] - c[1] for c in client]),
        },
        # A request later than the one N grants after it by more than the margin puts N + 1
        # into one second: how many were late by more than these (ms) after their slot.
        "send_minus_sched_above_ms": {
            str(ms): sum(1 for c in client if c[2] - c[0] > ms / 1000) for ms in LATE_MS
        },
        "client_requests": len(client),
        "rescheduled": sum(c[3] for c in client),
        "max_in_any_1s_at_send": max_per_window(sends),
        "max_in_any_1s_of_schedule": max_per_window([c[0] for c in client]),
        # The tightest N + 1 consecutive events (more than 1 s: within the limit); the schedule's
        # is 1 s + the margin where it was full, the rest is what the lags took of the margin.
        "tightest_n_plus_1_span_s": {
            "schedule": tightest_span([c[0] for c in client], limit),
            "send": tightest_span(sends, limit),
            "kernel": tightest_span([k for k, _ in stamps if k is not None], limit),
            "handler": tightest_span(handler, limit),
        },
    }


LATE_MS = (5, 10, 15, 20, 25, 30, 50)


def tightest_span(times: list[float], limit: float) -> float | None:
    ts = sorted(times)
    n = max(1, int(limit))
    return round(min(ts[i + n] - ts[i] for i in range(len(ts) - n)), 4) if len(ts) > n else None


# Figures that need a wall time or answers: not repeated for the second clock.
WALL_ONLY = ("wall_s", "non_ok_answers", "requests", "span_s")


def _cpu(procs: Any, sim: SimProcess) -> tuple[float, float, float, float]:
    """CPU seconds so far: machine busy, machine all, the workers' trees, the simulator."""
    busy, total = machine_cpu_s()
    workers = sum(tree_cpu_s(p.pid) for p in procs.procs.values())
    return busy, total, workers, sim.cpu_s()


def run_ours(
    url: str, sim: SimProcess, env: dict[str, str], n: int, workers: int, folder: Path
) -> dict[str, Any]:
    from tests.orchestration.conftest import Procs

    flush_redis(REDIS_URL)
    procs = Procs(env, folder)
    load_start = os.getloadavg()[0]
    try:
        for w in range(workers):
            procs.worker(f"ours{w}", concurrency=1, app="bench.rate_probe")
        with environment(env):
            from bench.common import start_run
            from worker.celery_app import app

            wait_ready(app, workers)
            sim.reset_stats()
            cpu_before = _cpu(procs, sim)
            started = time.monotonic()
            run_id, planned = start_run(url, dt.date(2026, 11, 20))
            assert planned == n, (planned, n)
            finished = wait_run(url, run_id, timeout=60 + 4 * n / float(env["MIDAS_RATE_LIMIT"]))
            cpu_after = _cpu(procs, sim)
            cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    finally:
        procs.stop_all()
    wall = finished - started
    limit = float(env["MIDAS_RATE_LIMIT"])
    stamps = sim.arrival_stamps()
    kernel = sorted(k for k, _ in stamps if k is not None)
    return {
        "margin_s": float(env.get("MIDAS_RATE_MARGIN_S", "nan")),
        "loadavg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        # Cores used during the run (of nproc): the whole machine (others' work included), the
        # worker processes with their pools, the simulator.
        "cores_busy": {
            "machine": round(cpu[0] / wall, 2),
            "of": round(cpu[1] / wall, 2),
            "workers": round(cpu[2] / wall, 2),
            "simulator": round(cpu[3] / wall, 2),
        },
        **figures(kernel, limit, wall, _errors(sim.stats())),
        **timing(stamps, _client_records(REDIS_URL), limit),
    }


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
    margins: list[float] | None = None,
    repeats: int = 1,
    name: str = NAME,
) -> dict[str, Any]:
    """`margins` None: the settings' default margin; with margins, ours only, `repeats` each."""
    from worker.config import Settings

    default_margin = Settings.model_fields["MIDAS_RATE_MARGIN_S"].default
    results: dict[str, Any] = {
        "latency_ms": LATENCY_MS,
        "workers": workers,
        "baseline_pool": f"{BASELINE_POOL} x {baseline_concurrency}",
        "max_in_flight": max_in_flight or "default (MIDAS_MAX_IN_FLIGHT=32)",
        "arrivals_counted_by": "kernel receive time at the simulator's socket (SO_TIMESTAMPNS)",
        "rates": {},
    }
    for rate in rates:
        n = int(rate * seconds)
        row: dict[str, Any] = {"accounts": n}
        with SimProcess(n, LEDGER_ROWS, latency_ms=LATENCY_MS, kernel_stamps=True) as sim:
            # Margins take turns within each repeat, so the machine's load (shared, drifting)
            # falls on every margin alike.
            for repeat in range(repeats):
                for margin in margins or [default_margin]:
                    with database() as url:
                        env = worker_env(
                            url,
                            REDIS_URL,
                            sim.base_url,
                            MIDAS_RATE_LIMIT=f"{rate:g}",
                            MIDAS_RATE_MARGIN_S=f"{margin:g}",
                        )
                        if max_in_flight is not None:
                            env["MIDAS_MAX_IN_FLIGHT"] = str(max_in_flight)
                        seed_world(url, n, LEDGER_ROWS, env)
                        with tempfile.TemporaryDirectory(prefix="bench-rate-") as tmp:
                            f = run_ours(url, sim, env, n, workers, Path(tmp))
                            row.setdefault("ours", []).append(f)
                            _say_ours(rate, f, repeat)
                            if baselines and margins is None:
                                for label, per_worker in (
                                    ("celery_rate_limit_R_per_worker", rate),
                                    ("celery_rate_limit_R_over_4_per_worker", rate / workers),
                                ):
                                    row[label] = b = run_baseline(
                                        url, sim, env, n, per_worker, workers, Path(tmp),
                                        baseline_concurrency,
                                    )  # fmt: skip
                                    say(NAME, f"R={rate:g} {label}: {_line(b)}")
        flush_redis(REDIS_URL)
        results["rates"][f"{rate:g}"] = row
    write_result(name, results, out=out)
    return results


def _line(f: dict[str, Any]) -> str:
    return (
        f"{f['achieved_rate']} req/s = {f['utilisation']:.3f} R "
        f"(middle {f['utilisation_middle']:.3f}), max {f['max_in_any_1s_window']} in 1 s, "
        f"{f['seconds_above_limit']} s above R, {f['arrivals_over_limit']} over the limit"
    )


def _say_ours(rate: float, f: dict[str, Any], repeat: int) -> None:
    lag = f["lag_ms"]
    say(
        NAME,
        f"R={rate:g} ours, margin {f['margin_s']:g} #{repeat + 1} (load {f['loadavg_1m']}): "
        f"by kernel {_line(f)}; by handler max {f['by_handler']['max_in_any_1s_window']}, "
        f"{f['by_handler']['arrivals_over_limit']} over; handler-kernel p99/max "
        f"{lag['handler_minus_kernel'].get('p99_ms')}/{lag['handler_minus_kernel'].get('max_ms')}"
        f" ms; send-sched p99/max {lag['send_minus_sched'].get('p99_ms')}/"
        f"{lag['send_minus_sched'].get('max_ms')} ms; max at send {f['max_in_any_1s_at_send']}",
    )
