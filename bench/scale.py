"""Benchmark 3, scale: plan + compare for 10k, 100k, 1M accounts with 10 ledger rows each.

The Midas side is a pre-filled fast path (`FastSource`: the counters the simulator would
answer, without HTTP), so what grows with the accounts is ours: planning, claiming, storing
snapshots, the ledger sums and the case updates. The work goes through the production task
bodies and a real broker: this process runs `worker.tasks.start_nightly`, `pump` and
`fetch_batch` (their `.run`) and takes their messages from the Redis lists Celery would, so the
broker holds what it holds in production; only the Celery worker loop is this driver.

Figures: wall time of plan and night, µs per account (flat within ±20% is the goal), Postgres
rows and bytes per account per night (pg_total_relation_size before and after), the peak
of the broker's memory (MEMORY USAGE over our Redis database), and the peak RSS of the
process that ran the task bodies through the night (VmHWM): each size runs in a fresh child
process, and the peak is reset once the world is seeded (/proc/self/clear_refs), so it is the
worker side's memory, not the seeding's.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    REDIS_URL,
    database,
    environment,
    flush_redis,
    midas_counters,
    proc_status_kib,
    redis_db_bytes,
    run_status,
    say,
    seed_world,
    table_sizes,
    worker_env,
    write_result,
)

NAME = "scale"
LEDGER_ROWS = 10


class FastSource:
    """What the simulator would answer for the world's accounts, with no HTTP in between."""

    def __init__(self, k: int) -> None:
        self.k = k

    def get_balance(self, openid: str, zone_id: str = "1", session_key: str | None = None) -> Any:
        from worker.midas.types import Balance

        save, present, cost = midas_counters(int(openid[1:]), self.k)
        return Balance(
            balance=save + present - cost,
            gen_balance=max(0, present - cost),
            first_save=save > 0,
            save_amt=save,
            save_sum=save,
            cost_sum=cost,
            present_sum=present,
            api_version="v1",
        )


def _decode(raw: bytes) -> tuple[str, list[Any]]:
    """(task name, args) of a kombu message as the Redis transport stores it."""
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    return str(message["headers"]["task"]), list(body[0])


def night(url: str, env: dict[str, str], day: dt.date) -> dict[str, Any]:
    """One nightly run driven through the task bodies; the broker is sampled at every step."""
    import worker.db.cases as cases_repo
    import worker.db.runs as repo
    import worker.recon.cases as cases
    import worker.recon.runs as runs
    from bench.pipeline import Stages

    # Wall time inside the steps of a night (Postgres' work included): what grows, if any.
    stages = Stages(clock=time.perf_counter)
    for owner, attr, stage in (
        (repo, "claim_pending", "claim"),
        (repo, "claims_before", "pump: claim checks"),
        (repo, "take_back_claims", "pump: claim checks"),
        (repo, "has_open_items", "pump: anything left"),
        (repo, "start_items", "start items"),
        (runs, "insert_snapshots", "store snapshots"),
        (runs, "reconcile_snapshots", "compare + case update"),
        (cases, "ledger_sums", "  ledger sums"),
        (cases_repo, "current_ok_snapshots", "  read snapshots"),
        (cases_repo, "lock_open_cases", "  open cases"),
        (repo, "lock_held", "mark done"),
        (repo, "mark_done", "mark done"),
        (repo, "close_claim", "mark done"),
        (repo, "refresh_item_statistics", "plan: analyze run_items"),
    ):
        if hasattr(owner, attr):
            stages.wrap(owner, attr, stage)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return _night(client, env, day, stages)
    finally:
        stages.undo()
        client.close()


def _night(client: redis.Redis, env: dict[str, str], day: dt.date, stages: Any) -> dict[str, Any]:
    from worker.recon.rules import checks_from_settings
    from worker.recon.runs import FetchDeps, batch_deadline_s

    with environment(env):
        from worker import dispatch, tasks
        from worker.config import get_settings

        settings = get_settings()
        dispatch.runtime().deps = FetchDeps(
            source=FastSource(LEDGER_ROWS),
            api_version="v1",
            checks=checks_from_settings(settings),
            settle_seconds=settings.RECON_SETTLE_SECONDS,
            skew=settings.calendar.skew,
            threads=1,
            deadline_s=batch_deadline_s(settings),
            settings=settings,
        )
        started = time.monotonic()
        tasks.start_nightly.run(business_date=day.isoformat(), trigger="bench")
        planned_at = time.monotonic()
        peak, steps, batches, skipped = 0, 0, 0, 0
        while True:
            raw = client.rpop("recheck") or client.rpop("nightly")  # rechecks first, as kombu
            if raw is None:
                break
            steps += 1
            name, args = _decode(raw)  # type: ignore[arg-type]
            if name == "midas_recon.pump":
                tasks.pump.run(*args)
            elif name == "midas_recon.fetch_batch":
                tasks.fetch_batch.run(*args)
                batches += 1
            else:
                skipped += 1  # a confirm pass due after the settle window: not part of the night
            peak = max(peak, redis_db_bytes(client))  # what the task left for the workers
        finished = time.monotonic()
    return {
        "stage_wall_s": dict(stages.cpu),
        "plan_s": planned_at - started,
        "night_s": finished - started,
        "batches": batches,
        "other_messages": skipped,
        "broker_peak_bytes": peak,
    }


def one_size(n: int) -> dict[str, Any]:
    with database() as url:
        env = worker_env(
            url, REDIS_URL, "http://127.0.0.1:9", MIDAS_API_VERSION="v1", MIDAS_RATE_LIMIT="100"
        )
        seeding = time.monotonic()
        seed_world(url, n, LEDGER_ROWS, env, with_keys=False)
        seeded = time.monotonic() - seeding
        flush_redis(REDIS_URL)
        before = table_sizes(url)
        rss_reset = _reset_peak_rss()
        rss_start = proc_status_kib(os.getpid(), "VmRSS")
        result = night(url, env, dt.date(2026, 11, 23))
        rss_peak = proc_status_kib(os.getpid(), "VmHWM")
        after = table_sizes(url)
        from worker.db.runs import nightly_run_id
        from worker.db.session import session_scope

        with session_scope(url) as session:
            run_id = nightly_run_id(session, dt.date(2026, 11, 23))
        assert run_id is not None
        status, done = run_status(url, run_id)
        if status != "complete" or done != n:
            raise RuntimeError(f"the night ended {status} with {done} of {n} done")
    flush_redis(REDIS_URL)
    grown = {t: (after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in after}
    rows = sum(r for r, _b in grown.values())
    size = sum(b for _r, b in grown.values())
    return {
        "accounts": n,
        "seed_s": round(seeded, 1),
        "plan_s": round(result["plan_s"], 3),
        "night_s": round(result["night_s"], 3),
        "us_per_account": round(result["night_s"] * 1e6 / n, 1),
        "plan_us_per_account": round(result["plan_s"] * 1e6 / n, 2),
        "batches": result["batches"],
        "rows_per_account": round(rows / n, 3),
        "bytes_per_account": round(size / n, 1),
        "by_table": {
            t: {"rows_per_account": round(r / n, 4), "bytes_per_account": round(b / n, 1)}
            for t, (r, b) in grown.items()
            if r or b
        },
        "broker_peak_bytes": result["broker_peak_bytes"],
        "stage_wall_us_per_account": {
            k: round(v * 1e6 / n, 1)
            for k, v in sorted(result["stage_wall_s"].items(), key=lambda kv: -kv[1])
        },
        "ledger_bytes_per_account": round(after["ledger_entries"][1] / n, 1),
        # This process ran the task bodies: its peak is the worker side's (plus the driver).
        "night_peak_rss_mib": round(rss_peak / 1024, 1),
        "night_start_rss_mib": round(rss_start / 1024, 1),
        "peak_rss_covers": "the night" if rss_reset else "seeding and the night",
    }


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _child(n: int, results: Any) -> None:
    results.put(one_size(n))


def one_size_apart(n: int) -> dict[str, Any]:
    """one_size in a fresh process, so that each size's peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(n, results))
    proc.start()
    try:
        while True:  # drained before the join (a big result); a dead child is no result
            try:
                result: dict[str, Any] = results.get(timeout=5)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the {n}-account run died (exit {proc.exitcode})") from None
    finally:
        proc.join()
    return result


def main(sizes: list[int], out: Path | None = None) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for n in sizes:
        runs[str(n)] = r = one_size_apart(n)
        say(
            NAME,
            f"{n} accounts: plan {r['plan_s']} s, night {r['night_s']} s = "
            f"{r['us_per_account']} µs/account; {r['rows_per_account']} rows and "
            f"{r['bytes_per_account']} bytes/account/night; broker peak {r['broker_peak_bytes']} B;"
            f" peak RSS {r['night_peak_rss_mib']} MiB",
        )
    per = [r["us_per_account"] for r in runs.values()]
    rss = [r["night_peak_rss_mib"] for r in runs.values()]
    figures = {
        "ledger_rows_per_account": LEDGER_ROWS,
        "runs": runs,
        "us_per_account_spread": round(max(per) / min(per) - 1, 4) if per else None,
        "night_peak_rss_spread": round(max(rss) / min(rss) - 1, 4) if rss else None,
    }
    write_result(NAME, figures, out=out)
    return figures
