"""A beat that can fail over: two (or more) beats run, the one holding a Redis lock schedules.

`LockedScheduler` is Celery's PersistentScheduler under a lease in Redis (the broker):

- Every tick (at most TICK_S apart) a beat renews its lease or, if the key is free, takes it.
  The others stand by, ticking, sending nothing. A leader that dies stops renewing; its lease
  expires after LEASE_S and a standby takes over at its next tick: within LEASE_S + TICK_S.
- Who sent what is shared: after sending an entry the leader records its `last_run_at` in a
  Redis hash, and a beat that becomes leader adopts those times first. So the new leader does
  not send again what the old one sent (the nightly of today), and does send what came due
  while nobody led (the nightly, if the leader died just before it).
- The nightly's `business_date` stays a BeatLazyFunc, evaluated by whichever beat sends it.

Why not celery-redbeat: it stores entries as JSON in Redis and cannot keep the BeatLazyFunc
in the nightly's kwargs; this is ~100 lines around Celery's own scheduler instead.
Recorded after sending, not before: a leader that dies between the two makes the next leader
send that entry again, which is harmless (one run per date, periodic tasks are idempotent);
the other order could lose a night.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import uuid
from typing import Any, Final

import redis
from celery.beat import PersistentScheduler, ScheduleEntry

from worker import liveness

log = logging.getLogger(__name__)

LOCK_KEY: Final = "midas_recon:beat:leader"
LAST_RUN_KEY: Final = "midas_recon:beat:last_run"
LEASE_S: Final = 30
TICK_S: Final = 5.0
assert TICK_S * 3 < LEASE_S  # a leader renews several times per lease, a slow tick is no loss

# Renew our lease, or take a free one; 1 when we hold it afterwards.
_HOLD_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LockedScheduler(PersistentScheduler):  # type: ignore[misc]
    """PersistentScheduler that sends only while it holds the beat lock (see module doc)."""

    # Ticks stay short while leading too, so the lease is renewed in time.
    max_interval = TICK_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis = redis.Redis.from_url(
            self.app.conf.broker_url, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self._hold = self._redis.register_script(_HOLD_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._leading = False

    @property
    def leading(self) -> bool:
        return self._leading

    def tick(self, *args: Any, **kwargs: Any) -> float:
        liveness.touch("beat")
        holds = self._holds_lock()
        if holds and not self._leading:
            self._adopt_shared_times()
            log.info("beat_leading", extra={"beat": self._me})
        elif self._leading and not holds:
            log.warning("beat_standing_by", extra={"beat": self._me})
        self._leading = holds
        if not holds:
            return TICK_S
        return float(min(super().tick(*args, **kwargs), TICK_S))

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        super().apply_entry(entry, producer=producer)
        sent = self.schedule.get(entry.name, entry).last_run_at
        try:
            self._redis.hset(LAST_RUN_KEY, entry.name, sent.isoformat())
        except redis.RedisError:
            log.warning("beat_last_run_not_shared", extra={"entry": entry.name})

    def close(self) -> None:
        if self._leading:
            try:  # a clean stop hands over at once instead of after the lease
                self._release(keys=[LOCK_KEY], args=[self._me])
            except redis.RedisError:
                pass
        super().close()

    def _holds_lock(self) -> bool:
        try:
            return bool(self._hold(keys=[LOCK_KEY], args=[self._me, LEASE_S * 1000]))
        except redis.RedisError:
            # Without Redis there is no lock and no broker either: nothing could be sent.
            log.warning("beat_lock_unreachable", extra={"beat": self._me})
            return False

    def _adopt_shared_times(self) -> None:
        """Take over the last-sent times the previous leaders recorded."""
        try:
            shared: dict[bytes, bytes] = self._redis.hgetall(LAST_RUN_KEY)  # type: ignore[assignment]
        except redis.RedisError:
            shared = {}
        for raw_name, raw_at in shared.items():
            name = raw_name.decode()
            entry = self.schedule.get(name)
            if entry is None:
                continue
            at = dt.datetime.fromisoformat(raw_at.decode())
            if entry.last_run_at is None or at > entry.last_run_at:
                entry.last_run_at = at
        self._heap = None  # rebuilt from the adopted times at the next tick
