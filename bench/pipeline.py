"""Benchmarks 2, 4 and 6: what a reconciled account costs when Midas is not the bottleneck.

- pipeline (2): the simulator answering at once, MIDAS_RATE_LIMIT at its maximum (100,000):
  a nightly run of N accounts through real Celery workers (one `celery -A worker worker
  --concurrency 2`, i.e. 2 processes on 2 cores): accounts/s end to end (plan, fetch, sign,
  snapshot, compare, case update), CPU of the workers, the simulator and Postgres' share;
  then the same night in this process with CPU clocks on each stage (`Stages`).
- memory (4): the peak RSS (VmHWM) of each worker process over nights of 10k and 100k accounts.
- naive (6): a straightforward script on the same world: for each account one request, one
  INSERT, one ledger query (autocommit), compared in Python; our accounts/s over its.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import create_engine, text

from bench.common import (
    REDIS_URL,
    SimProcess,
    database,
    environment,
    flush_redis,
    proc_children,
    proc_status_kib,
    redis_db_bytes,
    run_status,
    say,
    seed_world,
    start_run,
    table_sizes,
    tree_cpu_s,
    wait_ready,
    wait_run,
    worker_env,
    write_result,
)

LEDGER_ROWS = 10
CONCURRENCY = 2
NO_LIMIT = "100000"  # the highest MIDAS_RATE_LIMIT the settings accept


def postgres_cpu_s() -> float:
    """CPU of every postgres process on this machine (others' tests included: an upper bound)."""
    from bench.common import proc_cpu_s

    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                total += proc_cpu_s(int(entry.name))
        except OSError:
            continue
    return total


class Sampler:
    """Every 0.2 s: the broker's bytes (MEMORY USAGE of our db) and the workers' RSS."""

    def __init__(self, parent_pid: int, progress: Callable[[], int] | None = None) -> None:
        self.parent = parent_pid
        self.broker_peak = 0
        self.rss_peak_kib: dict[int, int] = {}
        # (seconds since start, largest pool process's RSS in MiB, accounts done), every ~5 s:
        # growth or plateau, and its slope per account.
        self.timeline: list[tuple[float, float, int | None]] = []
        self._progress = progress
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._client = redis.Redis.from_url(REDIS_URL)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def sample(self) -> None:
        self.broker_peak = max(self.broker_peak, redis_db_bytes(self._client))
        current = 0
        for pid in [self.parent, *proc_children(self.parent)]:
            try:
                self.rss_peak_kib[pid] = proc_status_kib(pid, "VmHWM")
                if pid != self.parent:
                    current = max(current, proc_status_kib(pid, "VmRSS"))
            except (OSError, KeyError):
                continue
        now = time.monotonic() - self._t0
        if not self.timeline or now - self.timeline[-1][0] >= 5.0:
            done = self._progress() if self._progress is not None else None
            self.timeline.append((round(now, 1), round(current / 1024, 1), done))

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()


def rss_slope_kib_per_1000(timeline: list[tuple[float, float, int | None]], n: int) -> float | None:
    """Least-squares slope of the largest pool process's RSS against the accounts done (of
    the whole night), over the samples past the first 20% of it: KiB per 1,000 accounts."""
    points = [(done, mib) for _t, mib, done in timeline if done is not None and done >= n / 5]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return None
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return round(cov / var * 1024 * 1000, 3)


def celery_night(
    n: int, *, naive_n: int = 0, profile_n: int = 0, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A nightly run of n accounts on a fresh world through one Celery worker of 2 processes
    (`extra_env`: more variables for the worker, e.g. MALLOC_ARENA_MAX)."""
    from tests.orchestration.conftest import Procs

    out: dict[str, Any] = {"accounts": n, "ledger_rows_per_account": LEDGER_ROWS}
    with database() as url, SimProcess(n, LEDGER_ROWS) as sim:
        env = worker_env(url, REDIS_URL, sim.base_url, MIDAS_RATE_LIMIT=NO_LIMIT)
        env.update(extra_env or {})
        seed_world(url, n, LEDGER_ROWS, env)
        flush_redis(REDIS_URL)
        with tempfile.TemporaryDirectory(prefix="bench-night-") as tmp:
            procs = Procs(env, Path(tmp))
            try:
                parent = procs.worker("night", concurrency=CONCURRENCY).pid
                with environment(env):
                    from worker.celery_app import app

                    wait_ready(app, 1)
                    before = table_sizes(url)
                    cpu0, sim0, pg0 = tree_cpu_s(parent), sim.cpu_s(), postgres_cpu_s()
                    run_id: int | None = None
                    progress = lambda: 0 if run_id is None else run_status(url, run_id)[1]  # noqa: E731
                    with Sampler(parent, progress) as sampler:
                        started = time.monotonic()
                        run_id, planned = start_run(url, dt.date(2026, 11, 21))
                        assert planned == n, (planned, n)
                        finished = wait_run(url, run_id, timeout=120 + n / 50)
                    cpu1, sim1, pg1 = tree_cpu_s(parent), sim.cpu_s(), postgres_cpu_s()
                    after = table_sizes(url)
            finally:
                procs.stop_all()
        wall = finished - started
        children = {pid: kib for pid, kib in sampler.rss_peak_kib.items() if pid != parent}
        out.update(
            wall_s=round(wall, 3),
            accounts_per_s=round(n / wall, 1),
            accounts_per_s_per_process=round(n / wall / CONCURRENCY, 1),
            worker_cpu_ms_per_account=round((cpu1 - cpu0) * 1000 / n, 3),
            simulator_cpu_ms_per_account=round((sim1 - sim0) * 1000 / n, 3),
            postgres_cpu_ms_per_account=round((pg1 - pg0) * 1000 / n, 3),
            worker_peak_rss_mib=round(max(children.values()) / 1024, 1),
            worker_parent_peak_rss_mib=round(sampler.rss_peak_kib.get(parent, 0) / 1024, 1),
            broker_peak_bytes=sampler.broker_peak,
            worker_rss_timeline_mib=sampler.timeline,
            worker_rss_slope_kib_per_1000_accounts=rss_slope_kib_per_1000(sampler.timeline, n),
            worker_extra_env=extra_env or {},
            rows_per_account={
                t: round((after[t][0] - before[t][0]) / n, 3) for t in after if t in before
            },
            snapshots=after["balance_snapshots"][0] - before["balance_snapshots"][0],
            cases_opened=after["mismatch_cases"][0] - before["mismatch_cases"][0],
        )
        if profile_n:
            out["stages"] = profile_stages(url, env, min(profile_n, n))
        if naive_n:
            out["naive"] = naive(url, env, min(naive_n, n))
    return out


# -- the stage profile --------------------------------------------------------------------------


class Stages:
    """Time spent inside chosen functions, by stage name: thread CPU time by default, or any
    clock (time.perf_counter for wall time, waiting on Postgres included)."""

    def __init__(self, clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self.cpu: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        original: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                spent = self.clock() - t0
                with self._lock:
                    self.cpu[stage] += spent
                    self.calls[stage] += 1

        setattr(owner, attr, timed)
        self._restore.append((owner, attr, original))

    def undo(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()


def profile_stages(url: str, env: dict[str, str], n: int) -> dict[str, Any]:
    """A night of the first n accounts in this process (pump + run_batch, the Redis limiter,
    the real client), with the CPU of each stage: where a worker process spends its time."""
    from sqlalchemy import update

    import worker.db.runs as repo
    import worker.midas.client as client_mod
    import worker.midas.limiter as limiter_mod
    import worker.midas.signing as signing
    import worker.midas.token as token_mod
    import worker.recon.runs as runs
    from worker.db.models import RunItem
    from worker.db.session import session_scope

    stages = Stages()
    with environment(env):
        from worker import dispatch
        from worker.config import get_settings

        settings = get_settings()
        deps = dispatch.runtime().fetch_deps()
        stages.wrap(runs, "start_nightly", "plan (INSERT … SELECT)")
        stages.wrap(repo, "claim_pending", "claim (pump)")
        stages.wrap(repo, "start_items", "start items")
        stages.wrap(runs, "_target", "decrypt session key")
        stages.wrap(client_mod.MidasClient, "get_balance", "fetch (all of the client)")
        stages.wrap(limiter_mod.RedisLimiter, "_acquire", "  limiter (Redis)")
        stages.wrap(token_mod.StableTokenProvider, "get", "  access token")
        stages.wrap(signing, "v2_signature", "  sign")
        stages.wrap(signing, "v2_pay_sig", "  sign")
        stages.wrap(client_mod.MidasClient, "_post", "  HTTP (requests)")
        stages.wrap(client_mod, "parse_getbalance", "  parse")
        stages.wrap(runs, "insert_snapshots", "store snapshots")
        stages.wrap(runs, "reconcile_snapshots", "compare + case update")
        stages.wrap(repo, "lock_held", "mark done")
        stages.wrap(repo, "mark_done", "mark done")
        try:
            db = lambda: session_scope(url)  # noqa: E731
            cpu0, wall0 = time.process_time(), time.monotonic()
            with db() as session:
                started = runs.start_nightly(
                    session, settings, business_date=dt.date(2026, 11, 22), trigger="bench"
                )
                # Only the first n accounts: the others are marked done beforehand.
                session.execute(
                    update(RunItem)
                    .where(RunItem.run_id == started.run_id, RunItem.account_id > n)
                    .values(state="done", outcome="ok")
                )
            runs.drive(db, deps, started.run_id, size=runs.batch_size(settings))
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        finally:
            stages.undo()
    per = {k: round(v * 1e6 / n, 1) for k, v in sorted(stages.cpu.items(), key=lambda kv: -kv[1])}
    return {
        "accounts": n,
        "process_cpu_us_per_account": round(cpu * 1e6 / n, 1),
        "wall_us_per_account": round(wall * 1e6 / n, 1),
        "stage_cpu_us_per_account": per,
        "note": "thread CPU inside each function; indented stages are part of 'fetch'; "
        "the rest of process CPU is Python glue, SQLAlchemy outside these calls, threads",
    }


# -- the naive baseline ---------------------------------------------------------------------------


def naive(url: str, env: dict[str, str], n: int) -> dict[str, Any]:
    """One account at a time: one request, one INSERT, one ledger query, each committed."""
    from bench.celery_baseline import NoLimit
    from worker.config import load_settings
    from worker.db.crypto import SessionKeyCipher
    from worker.midas.client import MidasClient
    from worker.midas.errors import MidasError

    settings = load_settings(env)
    client = MidasClient.from_settings(settings, limiter=NoLimit())
    cipher = SessionKeyCipher.from_settings(settings)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    differing = errors = 0
    with engine.connect() as conn:
        conn.execute(
            text(
                "CREATE TABLE naive_snapshots (id bigserial PRIMARY KEY, openid text, "
                "zone_id text, fetched_at timestamptz, balance bigint, save_sum bigint, "
                "cost_sum bigint, present_sum bigint)"
            )
        )
        accounts = conn.execute(
            text("SELECT openid, zone_id, session_key_enc FROM accounts ORDER BY id LIMIT :n"),
            {"n": n},
        ).all()
        cpu0, started = time.process_time(), time.monotonic()
        for openid, zone_id, key_enc in accounts:
            try:
                b = client.get_balance(openid, zone_id, cipher.decrypt(key_enc))
            except MidasError:
                errors += 1
                continue
            at = dt.datetime.now(dt.UTC)
            conn.execute(
                text(
                    "INSERT INTO naive_snapshots (openid, zone_id, fetched_at, balance, "
                    "save_sum, cost_sum, present_sum) VALUES (:o, :z, :at, :b, :s, :c, :p)"
                ),
                {"o": openid, "z": zone_id, "at": at, "b": b.balance, "s": b.save_sum}
                | {"c": b.cost_sum, "p": b.present_sum},
            )
            sums = dict(
                conn.execute(
                    text(
                        "SELECT kind, sum(amount) FROM ledger_entries WHERE openid = :o "
                        "AND zone_id = :z AND occurred_at <= :at GROUP BY kind"
                    ),
                    {"o": openid, "z": zone_id, "at": at},
                ).all()
            )
            save, cost, present = sums.get("save", 0), sums.get("cost", 0), sums.get("present", 0)
            cancel = sums.get("cancel", 0)
            if (b.save_sum, b.cost_sum, b.present_sum, b.balance) != (
                save,
                cost - cancel,
                present,
                save + present - cost + cancel,
            ):
                differing += 1
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
    engine.dispose()
    client.close()
    return {
        "accounts": n,
        "wall_s": round(wall, 3),
        "accounts_per_s": round(n / wall, 1),
        "script_cpu_ms_per_account": round(cpu * 1000 / n, 3),
        "accounts_differing": differing,
        "errors": errors,
    }


def naive_with_latency(n: int, latency_ms: float = 50.0) -> dict[str, Any]:
    """The naive script against a Midas answering in `latency_ms`, as the real one does: one
    account at a time, it waits out every answer."""
    with database() as url, SimProcess(n, LEDGER_ROWS, latency_ms=latency_ms) as sim:
        env = worker_env(url, REDIS_URL, sim.base_url, MIDAS_RATE_LIMIT=NO_LIMIT)
        seed_world(url, n, LEDGER_ROWS, env)
        out = naive(url, env, n)
    return {"latency_ms": latency_ms, **out}


# -- entry points ---------------------------------------------------------------------------------


def main(n: int, *, naive_n: int, profile_n: int, out: Path | None = None) -> dict[str, Any]:
    night = celery_night(n, naive_n=naive_n, profile_n=profile_n)
    flush_redis(REDIS_URL)
    say(
        "pipeline",
        f"{n} accounts in {night['wall_s']} s: {night['accounts_per_s']} accounts/s on "
        f"{CONCURRENCY} processes; worker CPU {night['worker_cpu_ms_per_account']} ms/account",
    )
    for stage, us in night.get("stages", {}).get("stage_cpu_us_per_account", {}).items():
        say("pipeline", f"  {stage}: {us} µs/account")
    write_result("pipeline", {k: v for k, v in night.items() if k != "naive"}, out=out)
    if "naive" in night:
        ratio = night["accounts_per_s"] / night["naive"]["accounts_per_s"]
        slow = naive_with_latency(min(200, max(20, naive_n // 4)))
        naive_figures = {
            "naive": night["naive"],
            "naive_at_50ms_latency": slow,
            "ours_accounts_per_s": night["accounts_per_s"],
            "ours_processes": CONCURRENCY,
            "ratio": round(ratio, 2),
            "ratio_per_process": round(ratio / CONCURRENCY, 2),
        }
        say(
            "naive",
            f"naive {night['naive']['accounts_per_s']} accounts/s; ours {ratio:.1f}x "
            f"({ratio / CONCURRENCY:.1f}x per process); at 50 ms latency the naive script "
            f"does {slow['accounts_per_s']} accounts/s",
        )
        write_result("naive", naive_figures, out=out)
    return night


def memory(
    sizes: list[int], out: Path | None = None, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for n in sizes:
        night = celery_night(n, extra_env=extra_env)
        flush_redis(REDIS_URL)
        runs[str(n)] = {
            k: night[k]
            for k in (
                "wall_s",
                "accounts_per_s",
                "worker_peak_rss_mib",
                "worker_parent_peak_rss_mib",
                "broker_peak_bytes",
                "worker_rss_timeline_mib",
                "worker_rss_slope_kib_per_1000_accounts",
                "worker_extra_env",
            )
        }
        say(
            "memory",
            f"{n} accounts: worker peak RSS {night['worker_peak_rss_mib']} MiB (parent "
            f"{night['worker_parent_peak_rss_mib']} MiB), slope "
            f"{night['worker_rss_slope_kib_per_1000_accounts']} KiB per 1,000 accounts",
        )
    peaks = [r["worker_peak_rss_mib"] for r in runs.values()]
    figures = {
        "runs": runs,
        "growth": round(max(peaks) / min(peaks) - 1, 4) if peaks else None,
    }
    write_result("memory", figures, out=out)
    return figures
