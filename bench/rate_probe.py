"""The production Celery app with client-side stamps, for benchmark 1 (`-A bench.rate_probe`).

Nothing in `worker/` records these; this module wraps three production methods from outside
(as `bench/rate_lag.py` does) in the benchmark's worker processes only:

- ``sched``: the moment the Redis schedule reserved for the request (the Lua script's `at`,
  the Redis server's clock), the last one if the caller re-reserved;
- ``wake``: the caller leaves the limiter's wait;
- ``send``: the request's first bytes go into the socket (`HTTPConnection.send`).

All three are CLOCK_REALTIME of this host (Redis `TIME`, `time.time()`), as are the
simulator's kernel stamps, so they subtract directly. After each task the process appends
its records, as JSON, to the Redis list `PROBE_KEY` of its own `REDIS_URL`.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any

from celery.signals import task_postrun

from worker.celery_app import app
from worker.midas import limiter as limiter_mod

PROBE_KEY = "bench:rate:client"

_local = threading.local()
_records: list[tuple[float, float, float, int]] = []  # (sched, wake, send, re-reservations)
_lock = threading.Lock()

_reserve = limiter_mod.RedisLimiter._reserve
_acquire = limiter_mod._ScheduledLimiter._acquire
_send = http.client.HTTPConnection.send


def _probe_reserve(self: Any, holder: str, has_slot: bool, gap_us: int = 0) -> Any:
    reply = _reserve(self, holder, has_slot, gap_us)
    if reply[0] == limiter_mod._GRANTED:
        _local.grants = getattr(_local, "grants", 0) + 1
        _local.sched = reply[2] / 1e6
    return reply


def _probe_acquire(self: Any, prepare: Any) -> Any:
    _local.grants = 0
    acquired = _acquire(self, prepare)
    _local.pending = (_local.sched, time.time(), _local.grants - 1)
    return acquired


def _probe_send(self: Any, data: Any) -> None:
    pending = getattr(_local, "pending", None)
    if pending is not None:  # the first write of a request that went through the limiter
        _local.pending = None
        sched, wake, again = pending
        with _lock:
            _records.append((sched, wake, time.time(), again))
    _send(self, data)


limiter_mod.RedisLimiter._reserve = _probe_reserve  # type: ignore[method-assign]
limiter_mod._ScheduledLimiter._acquire = _probe_acquire  # type: ignore[method-assign]
http.client.HTTPConnection.send = _probe_send  # type: ignore[method-assign]


@task_postrun.connect
def _flush(**_: Any) -> None:
    with _lock:
        batch = list(_records)
        _records.clear()
    if not batch:
        return
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        client.rpush(PROBE_KEY, json.dumps(batch))
    finally:
        client.close()


__all__ = ["PROBE_KEY", "app"]
