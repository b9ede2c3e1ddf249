"""Diagnostic for benchmark 4: where a worker process's memory goes, at N accounts.

    python -m bench.memtrace 10000 100000      # one pipeline night per size

Not a benchmark (tracemalloc slows the process): it looks for the owner of the RSS growth
of docs/benchmarks.md §4. The night of bench/pipeline.py (same world, same simulator in a
process of its own) runs in this process through `worker.recon.runs.drive`: the pump and
`run_batch`, the code a pool process runs for each message, with its fetch threads, the
Redis limiter and the real client. Every EVERY_S a thread records the RSS, the Python heap
tracemalloc sees and the live objects per type; the report compares the sample after the
warm-up with the last one: the lines (with callers) that hold more at the end, the types
that gained objects, and how much of the RSS growth is Python heap at all (the rest is
native: libpq, OpenSSL, the C allocator's arenas).
"""

from __future__ import annotations

import collections
import datetime as dt
import gc
import json
import sys
import threading
import time
import tracemalloc
from typing import Any

EVERY_S = 5.0
FRAMES = 8
WARM_ACCOUNTS = 5_000  # the baseline sample: the first after this many accounts are done


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler:
    def __init__(self, url: str, run_id: int) -> None:
        self.url, self.run_id = url, run_id
        self.samples: list[dict[str, Any]] = []
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_objects: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> dict[str, Any]:
        from bench.common import run_status

        _status, done = run_status(self.url, self.run_id)
        current, _peak = tracemalloc.get_traced_memory()
        out = {
            "t": round(time.monotonic() - self._t0, 1),
            "done": done,
            "rss_mib": round(_rss_kib() / 1024, 1),
            "heap_mib": round(current / 2**20, 1),
        }
        self.samples.append(out)
        if self.baseline is None and done >= WARM_ACCOUNTS:
            self.baseline = tracemalloc.take_snapshot()
            self.baseline_objects = _objects()
            out["baseline"] = True
        return out

    def _loop(self) -> None:
        while not self._stop.wait(EVERY_S):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _objects() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def night(n: int) -> dict[str, Any]:
    from bench.common import SimProcess, database, environment, seed_world, worker_env
    from bench.pipeline import LEDGER_ROWS, NO_LIMIT, REDIS_URL

    with database() as url, SimProcess(n, LEDGER_ROWS) as sim:
        env = worker_env(url, REDIS_URL, sim.base_url, MIDAS_RATE_LIMIT=NO_LIMIT)
        seed_world(url, n, LEDGER_ROWS, env)
        with environment(env):
            import worker.recon.runs as runs
            from worker import tasks
            from worker.config import get_settings
            from worker.db.session import session_scope

            settings = get_settings()
            deps = tasks.runtime().fetch_deps()
            db = lambda: session_scope(url)  # noqa: E731
            with db() as session:
                started = runs.start_nightly(
                    session, settings, business_date=dt.date(2026, 11, 22), trigger="bench"
                )
            tracemalloc.start(FRAMES)
            rss0 = _rss_kib()
            with Sampler(url, started.run_id) as sampler:
                t0 = time.monotonic()
                runs.drive(db, deps, started.run_id, size=runs.batch_size(settings))
                wall = time.monotonic() - t0
                last = sampler.sample()
            end, end_objects = tracemalloc.take_snapshot(), _objects()
            tracemalloc.stop()
    base = sampler.baseline or end
    return {
        "accounts": n,
        "wall_s": round(wall, 1),
        "rss_before_night_mib": round(rss0 / 1024, 1),
        "samples": sampler.samples,
        "rss_growth_after_warm_mib": round(
            last["rss_mib"] - next(s["rss_mib"] for s in sampler.samples if s.get("baseline")), 1
        )
        if sampler.baseline
        else None,
        "top_lines": [
            f"{s.size_diff / 1024:+.0f} KiB {s.count_diff:+d} blocks {s.traceback[0]}"
            for s in end.compare_to(base, "lineno")[:20]
        ],
        "top_tracebacks": [
            {
                "kib": round(s.size_diff / 1024),
                "blocks": s.count_diff,
                "stack": s.traceback.format(),
            }
            for s in end.compare_to(base, "traceback")[:6]
        ],
        "object_growth": dict(
            sorted(
                ((k, end_objects[k] - sampler.baseline_objects[k]) for k in end_objects),
                key=lambda kv: -abs(kv[1]),
            )[:20]
        ),
    }


def main(argv: list[str]) -> None:
    for n in [int(a) for a in argv] or [10_000, 100_000]:
        print(json.dumps(night(n), indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
