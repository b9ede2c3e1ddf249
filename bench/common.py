"""What every benchmark shares: the machine, throwaway databases, a seeded world, the simulator
in a process of its own, Celery worker processes, /proc readings and the JSON results.

The world: accounts `b00000001…`, each with `k` ledger rows (save, present and cost in a fixed
pattern) and a Midas side whose counters agree with that ledger, except one account in
MISMATCH_EVERY whose Midas `save_sum` is 7 coins higher (so the case path runs too).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "docs" / "benchmarks"))
PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_ADMIN_URL",
    os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
)
# A Redis database of its own: the benchmarks empty it before and after each run.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
MISMATCH_EVERY = 1000
GETBALANCE = "/wxa/game/getbalance"
LEDGER_START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the machine and the results ----------------------------------------------------------------


_load_at_start: float | None = None


def mark_start() -> None:
    """Remember the load average as a benchmark starts (the machine is shared)."""
    global _load_at_start
    _load_at_start = round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        model = platform.processor()
    engine = create_engine(PG_ADMIN_URL)
    with engine.connect() as conn:
        pg = str(conn.execute(text("SHOW server_version")).scalar_one())
    engine.dispose()
    client = redis.Redis.from_url(REDIS_URL)
    redis_version = str(client.info("server").get("redis_version"))
    client.close()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgres": pg,
        "redis": redis_version,
        # Other work on the machine (2 cores shared with others' test runs) shows here.
        "loadavg_1m_at_start": _load_at_start,
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "commit": commit,
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, figures: dict[str, Any], *, out: Path | None = None) -> Path:
    """docs/benchmarks/<name>.json: the figures, the machine and the command."""
    folder = out or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "command": "python -m bench.run_all " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "figures": figures,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    print(f"[{name}] written to {path}", flush=True)
    return path


def say(name: str, line: str) -> None:
    print(f"[{name}] {line}", flush=True)


# -- Postgres and Redis -------------------------------------------------------------------------


@contextmanager
def database() -> Iterator[str]:
    """A fresh database at the head migration, dropped afterwards."""
    from worker.db.migrate import upgrade
    from worker.db.session import engine_for

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"midas_recon_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def flush_redis(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def redis_db_bytes(client: redis.Redis) -> int:
    """MEMORY USAGE summed over every key of this database (others share the server)."""
    total = 0
    for key in client.scan_iter(count=1000):
        total += int(client.memory_usage(key) or 0)
    return total


def table_sizes(url: str) -> dict[str, tuple[int, int]]:
    """(rows, bytes incl. indexes and TOAST) of every table of the schema; a partitioned
    table (balance_snapshots) counts its partitions, which are not listed on their own."""
    engine = create_engine(url)
    out: dict[str, tuple[int, int]] = {}
    with engine.connect() as conn:
        names = conn.execute(
            text(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind IN ('r', 'p') AND NOT relispartition"
            )
        ).scalars()
        for name in list(names):
            rows = conn.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one()
            size = conn.execute(
                # pg_partition_tree lists nothing for a plain table: then the table itself.
                text(
                    "SELECT coalesce((SELECT sum(pg_total_relation_size(relid))"
                    " FROM pg_partition_tree(:t)), pg_total_relation_size(:t))"
                ),
                {"t": name},
            ).scalar_one()
            out[name] = (int(rows), int(size))
    engine.dispose()
    return out


def vacuum_analyze(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


# -- the world ----------------------------------------------------------------------------------


def openid(i: int) -> str:
    return f"b{i:08d}"


def session_key(i: int) -> str:
    return base64.b64encode(hashlib.blake2b(str(i).encode(), digest_size=16).digest()).decode()


def _kind(r: int) -> str:
    return "save" if r % 10 < 5 else "present" if r % 10 < 7 else "cost"


def ledger_totals(i: int, k: int) -> tuple[int, int, int]:
    """(save, present, cost) of account i's k ledger rows (see seed_ledger's SQL)."""
    kinds = [_kind(r) for r in range(k)]
    return (
        kinds.count("save") * (100 + i % 7),
        kinds.count("present") * 10,
        kinds.count("cost") * 50,
    )


def midas_counters(i: int, k: int) -> tuple[int, int, int]:
    save, present, cost = ledger_totals(i, k)
    if i % MISMATCH_EVERY == 1:
        save += 7  # a top-up Midas has and the ledger never booked
    return save, present, cost


def seed_accounts(url: str, n: int, *, with_keys: bool, env: dict[str, str] | None = None) -> None:
    """n active accounts by COPY; with_keys: each with its encrypted session key (v2)."""
    from worker.config import load_settings
    from worker.db.crypto import SessionKeyCipher

    cipher = SessionKeyCipher.from_settings(load_settings(env)) if with_keys and env else None
    active = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        columns = "openid, zone_id, last_active_at, session_key_enc, session_key_updated_at"
        with cur.copy(f"COPY accounts ({columns}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for i in range(1, n + 1):
                enc = cipher.encrypt(session_key(i)) if cipher else None
                copy.write_row((openid(i), "1", active, enc, active if enc else None))
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


SEED_LEDGER = """
INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)
SELECT 'L' || a || '_' || r, 'b' || lpad(a::text, 8, '0'), '1',
       CASE WHEN r % 10 < 5 THEN 'save' WHEN r % 10 < 7 THEN 'present' ELSE 'cost' END,
       CASE WHEN r % 10 < 5 THEN 100 + a % 7 WHEN r % 10 < 7 THEN 10 ELSE 50 END,
       :start + r * INTERVAL '1 hour' + (a % 3600) * INTERVAL '1 second'
FROM generate_series(0, :k - 1) r CROSS JOIN generate_series(1, :n) a
"""


def seed_ledger(url: str, n: int, k: int) -> None:
    """k rows per account in one INSERT … SELECT, in time order (row r of every account)."""
    if k <= 0:
        return
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(SEED_LEDGER), {"n": n, "k": k, "start": LEDGER_START})
    engine.dispose()


def seed_world(url: str, n: int, k: int, env: dict[str, str], *, with_keys: bool = True) -> None:
    seed_accounts(url, n, with_keys=with_keys, env=env)
    seed_ledger(url, n, k)
    vacuum_analyze(url)


# -- the simulator in a process of its own ------------------------------------------------------


def _serve(n: int, k: int, latency_ms: float, conn: Any, kernel_stamps: bool = False) -> None:
    from worker.simulator import SimConfig, Simulator

    sim = Simulator(
        SimConfig(
            latency_ms=latency_ms, max_recorded_arrivals=3_000_000, kernel_stamps=kernel_stamps
        )
    )
    for i in range(1, n + 1):
        save, present, cost = midas_counters(i, k)
        sim.add_player(
            openid(i), "1", save=save, present=present, cost=cost, session_key=session_key(i)
        )
    sim.start()
    conn.send(sim.port)
    conn.recv()  # until told to stop
    sim.stop()


class SimProcess:
    """worker.simulator.Simulator with the world's players, in a child process, so that its
    CPU is its own; statistics through its control endpoints."""

    def __init__(
        self, n: int, k: int, *, latency_ms: float = 0.0, kernel_stamps: bool = False
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_serve, args=(n, k, latency_ms, child, kernel_stamps), daemon=True
        )
        self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("the simulator did not start")
        self.base_url = f"http://127.0.0.1:{self._conn.recv()}"
        self.http = requests.Session()

    def _get(self, name: str, **query: str) -> Any:
        r = self.http.get(f"{self.base_url}/__sim/{name}", params=query, timeout=60)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict[str, Any]:
        return dict(self._get("stats"))

    def arrivals(self, prefix: str = GETBALANCE) -> list[float]:
        return [float(t) for t in self._get("arrivals", path_prefix=prefix)]

    def arrival_stamps(self) -> list[tuple[float | None, float]]:
        """(kernel receive, handler) per Midas arrival, unix seconds (`kernel_stamps`)."""
        return [(k, float(h)) for k, h in self._get("arrival_stamps")]

    def reset_stats(self) -> None:
        self.http.post(f"{self.base_url}/__sim/reset_stats", timeout=10).raise_for_status()

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid or 0)

    def stop(self) -> None:
        self.http.close()
        self._conn.send("stop")
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- /proc --------------------------------------------------------------------------------------


def machine_cpu_s() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine since boot, over every core (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLK_TCK, sum(ticks) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field of /proc/PID/status: VmRSS, VmHWM (peak RSS)…"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def tree_cpu_s(pid: int) -> float:
    """CPU of a process and its live children (a Celery worker and its pool)."""
    total = proc_cpu_s(pid)
    for child in proc_children(pid):
        try:
            total += proc_cpu_s(child)
        except OSError:
            continue
    return total


# -- environments and Celery processes ------------------------------------------------------------


def worker_env(db_url: str, redis_url: str, base_url: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process (the orchestration tests' one, with these values)."""
    from tests.orchestration.conftest import world_env

    env = world_env(db_url, redis_url, base_url, RECON_SETTLE_SECONDS="300")
    env.update(extra)
    return env


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """This process configured like a worker (settings and the tasks' runtime re-read)."""
    from worker.config import get_settings

    saved = dict(os.environ)
    os.environ.update(env)
    get_settings.cache_clear()
    _reset_runtime()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        _reset_runtime()


def _reset_runtime() -> None:
    if "worker.dispatch" in sys.modules:
        sys.modules["worker.dispatch"]._runtime = None
    from worker.db.session import engine_for

    engine_for.cache_clear()


def wait_ready(app: Any, workers: int, timeout: float = 60.0) -> None:
    """Until `workers` Celery workers answer a ping."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = len(app.control.ping(timeout=1.0, limit=workers) or [])
        if seen >= workers:
            return
    raise RuntimeError(f"only {seen} of {workers} Celery workers answered in {timeout:.0f} s")


def run_state(url: str, run_id: int) -> str:
    """The status of a run (cheap: no count of its items)."""
    from sqlalchemy import select

    from worker.db.models import Run
    from worker.db.session import session_scope

    with session_scope(url) as session:
        return str(session.scalar(select(Run.status).where(Run.id == run_id)))


def run_status(url: str, run_id: int) -> tuple[str, int]:
    """(status, items done) of a run."""
    from sqlalchemy import func, select

    from worker.db.models import Run, RunItem
    from worker.db.session import session_scope

    with session_scope(url) as session:
        status = session.scalar(select(Run.status).where(Run.id == run_id))
        done = session.scalar(
            select(func.count())
            .select_from(RunItem)
            .where(RunItem.run_id == run_id, RunItem.state == "done")
        )
    return str(status), int(done or 0)


def start_run(url: str, business_date: dt.date) -> tuple[int, int]:
    """Plan the nightly run of a date (the `midas-recon run` path) and send its first pump.

    The caller has entered `environment(...)` with the workers' variables."""
    from worker import dispatch
    from worker.config import get_settings
    from worker.db.session import session_scope
    from worker.recon.runs import start_nightly

    with session_scope(url) as session:
        started = start_nightly(session, get_settings(), business_date=business_date, trigger="cli")
    dispatch.request_pump(started.run_id)
    return started.run_id, started.planned


def wait_run(url: str, run_id: int, timeout: float, every: float = 0.1) -> float:
    """Until the run is no longer running; the monotonic time it was seen finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Status only: counting the done items ten times a second (~0.1 s a count at 1M)
        # would load the night it measures.
        status = run_state(url, run_id)
        if status not in ("planning", "running"):
            if status != "complete":
                raise RuntimeError(f"run {run_id} ended {status}")
            return time.monotonic()
        time.sleep(every)
    status, done = run_status(url, run_id)
    raise RuntimeError(f"run {run_id} still {status} after {timeout:.0f} s ({done} done)")


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of durations in seconds, in ms (empty: {})."""
    s = sorted(values)
    if not s:
        return {}

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)

    return {
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": round(s[-1] * 1000, 2),
    }


def windows_above(times: list[float], limit: float) -> dict[str, int]:
    """How the arrivals break a per-second limit: the most in any sliding one-second window,
    how many whole seconds (from the first arrival) held more than `limit`, and how many
    arrivals found `limit` others in the second before them (Midas would answer them 45011)."""
    from worker.simulator import max_per_window

    if not times:
        return {"max_in_any_1s_window": 0, "seconds_above_limit": 0, "arrivals_over_limit": 0}
    t0 = times[0]
    buckets: dict[int, int] = {}
    for t in times:
        buckets[int(t - t0)] = buckets.get(int(t - t0), 0) + 1
    over, left, cap = 0, 0, int(limit)
    for right, t in enumerate(times):
        while times[left] <= t - 1.0:
            left += 1
        if right - left + 1 > cap:
            over += 1
    return {
        "max_in_any_1s_window": max_per_window(times),
        "seconds_above_limit": sum(1 for c in buckets.values() if c > limit),
        "arrivals_over_limit": over,
    }
