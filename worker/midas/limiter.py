"""The fleet-wide Midas rate limiter and in-flight cap (PRODUCT.md §6, API.md §6).

Every Midas HTTP attempt runs inside `with limiter.slot():` (or `slot_prepared(build)`, which
builds the request while waiting for its moment, so that little is left to do after the check
below). A slot is two things, taken in this order:

1. an *in-flight slot* (at most `max_in_flight` holders fleet-wide), then
2. a *rate reservation*: a start time on one shared schedule, which the caller sleeps out.

In-flight first, because a reservation is a moment in time: a caller that reserved first and
then waited for a free in-flight slot would arrive late, wasting the moment or bunching with
later callers. Holding the slot while sleeping costs nothing extra: the wait is at most the
reservation horizon, and if the cap binds, the rate could not have been used anyway.

**The schedule (why no one-second window exceeds the limit).** Midas counts arrivals in any
one-second window; with N = floor(rate) (at least 1) it may see at most N. Grants are spaced by
a fixed interval T = max(1/rate, W/N) with W = 1 + `jitter_s` (GCRA with burst 1: each grant is
at max(now, previous grant + T), never earlier). Any N+1 consecutive grants then span N*T >= W
seconds, more than one second. The extra `jitter_s` (default 50 ms, i.e. the schedule runs at
~95% of the limit) absorbs the difference in delay between a grant and its arrival at Midas
(sleep overshoot, GIL, network): as long as that delay varies by less than `jitter_s` between
requests, any one-second window of arrivals maps onto a window of grants narrower than W, which
holds at most N. Arrivals are never early (nobody goes before its moment), so the condition is
simply that no request reaches Midas more than `jitter_s` after its moment. A caller that wakes
up later than half of that budget does not go: it takes a new reservation (the slot it missed
is lost); from the third in a row on, that reservation leaves a gap after it as long as the
lateness it just saw exceeded the tolerance, so that the schedule itself absorbs a host whose
wake-ups stay late (instead of the caller going anyway, as it once did).
The other half of the budget is for the way from the check to Midas (the HTTP stack, the
network), which nothing here can check; hence `slot_prepared`: building and preparing a
request takes ~0.5 ms of Python, the socket write after it ~0.15 ms, and a thread that needs
the GIL longer is likelier to be held up by the other threads on a busy host. Measured on the
project's 2-core VM under load (`bench/rate_lag.py`, docs/benchmarks.md §1).

**Clocks.** The Redis limiter keeps all state in Redis and decides inside Lua scripts with the
Redis server's clock (`TIME`), so machines with skewed clocks share one schedule. The caller
sleeps client-side (no polling of Redis while it waits) until its moment *on that clock*: each
reply tells the server's time, which happened between our request and the reply, so it bounds
the offset between the server's clock and our monotonic one; the tightest recent bound
(`_ScheduleClock`) maps the moment onto ours. Sleeping "reply + wait" instead would make every
slow reply's return leg a lateness, and judging lateness from the request (the only safe
reading without the offset) would count every round trip as late: under load (Redis round
trips of several ms) that re-reserved 4% of grants at 100/s and 30% at 400/s.

**Redis restart / FLUSHDB.** State lives in short-lived keys; a permanent marker key tells "idle
(keys expired)" from "state lost". After an expiry the schedule restarts at now with no credit
(burst 1 has none to give). When the marker is missing, reservations handed out before the loss
may still fire up to `horizon_s` from now, so the new schedule starts after them: the first
grant waits horizon + T (once, also on a fleet's very first start). The in-flight set and a
pause are lost with the keys: the cap may be exceeded by the old holders until they finish, and
a lost 45011 pause is re-established by the next 45011. Run Redis with `noeviction` (as the
Celery broker needs anyway): evicting the schedule key under memory pressure would be a silent
state loss.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from worker.metrics import FLEET_PAUSES, LIMITER_IN_FLIGHT, LIMITER_WAIT
from worker.midas.errors import RetryableError

if TYPE_CHECKING:
    import redis

    from worker.config import Settings

log = logging.getLogger(__name__)

# Statuses shared by both backends (the Lua scripts return the same numbers).
_GRANTED, _PAUSED, _FULL, _DEFER = 0, 1, 2, 3

# A caller late by more than this share of `jitter_s` re-reserves; the rest of the budget is
# left for the HTTP path, which nothing here can check.
_LATE_SHARE = 0.5
# A late caller's first re-reservations are plain (the missed slot is the whole cost: most late
# wake-ups are one-off stalls); from this many in a row on, each asks for a gap after its
# moment. A gap after every late wake-up cost a third of the rate at 400/s on a loaded worker.
_PLAIN_RESCHEDULES = 2
# The longest gap a re-reservation asks for: a caller later than the tolerance plus this keeps
# re-reserving (a one-second stall is far beyond anything a margin could absorb anyway).
_MAX_GAP_S = 1.0
# How long a reading of the server's clock stays usable for the offset: clocks drift apart
# (NTP slews the wall clock by up to 0.5 ms/s), so old tight readings must not win forever.
_CLOCK_KEEP_S = 2.0
# Upper bound for one sleep while paused or deferred: the pause can be extended, or lifted by a
# Redis state loss, and we want to notice.
_MAX_SLEEP_S = 5.0


_T = TypeVar("_T")


def _nothing() -> None:
    return None


class Limiter(Protocol):
    def slot(self) -> AbstractContextManager[None]:
        """Block for an in-flight slot and a rate grant; release the in-flight slot on exit."""
        ...

    def slot_prepared(self, prepare: Callable[[], _T]) -> AbstractContextManager[_T]:
        """`slot()`, running `prepare` while waiting for the grant's moment (again after a
        re-reservation); yields what it returned."""
        ...

    def pause_until(self, unix_ts: float) -> None:
        """Pause the whole fleet until `unix_ts` (the later of this and any current pause)."""
        ...

    def paused_until(self) -> float | None:
        """The end of the current pause (unix seconds), or None."""
        ...


@dataclass(frozen=True)
class LimiterStats:
    """Counters of this process's limiter object, for benchmarks."""

    grants: int
    wait_seconds: float
    rescheduled: int


class _ScheduleClock:
    """Maps moments on the backend's clock onto this process's time.monotonic().

    A reply that says "the server's time was `server_now`", asked at `before` and answered at
    `after` (monotonic), bounds the offset server - local to [server_now - after,
    server_now - before]. The narrowest such interval of the last `_CLOCK_KEEP_S` seconds gives
    the offset (its midpoint, off by at most half that round trip).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._best: tuple[float, float, float] | None = None  # (width, offset, taken at)

    def local_moment(self, before: float, after: float, server_now: float, wait_s: float) -> float:
        """When (monotonic) the moment `server_now + wait_s` comes; never outside
        [before, after] + wait_s, where the reply itself proves it lies."""
        width = after - before
        offset = server_now - (before + after) / 2
        with self._lock:
            best = self._best
            if best is None or width <= best[0] or after - best[2] > _CLOCK_KEEP_S:
                self._best = best = (width, offset, after)
        moment = server_now + wait_s - best[1]
        return min(max(moment, before + wait_s), after + wait_s)


def grant_interval(rate: float, jitter_s: float) -> float:
    """Seconds between grants: N = floor(rate) grants must span more than 1 + jitter_s."""
    if rate <= 0 or not math.isfinite(rate):
        raise ValueError("rate must be a positive number")
    if jitter_s < 0:
        raise ValueError("jitter_s must not be negative")
    per_window = max(1, math.floor(rate))
    return max(1.0 / rate, (1.0 + jitter_s) / per_window)


class _ScheduledLimiter(ABC):
    """The caller side shared by both backends: acquire, sleep out the reservation, release."""

    def __init__(
        self, rate: float, max_in_flight: int, *, jitter_s: float, horizon_s: float
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if horizon_s <= 0:
            raise ValueError("horizon_s must be positive")
        self.rate = rate
        self.max_in_flight = max_in_flight
        self.jitter_s = jitter_s
        self.horizon_s = horizon_s
        self.interval_s = grant_interval(rate, jitter_s)
        self._late_tolerance_s = jitter_s * _LATE_SHARE
        self._clock = _ScheduleClock()
        # A pause this process set itself is honoured at once, even by threads that already
        # hold a reservation (the fleet-wide one only stops new reservations).
        self._local_pause = 0.0
        self._counter_lock = threading.Lock()
        self._grants = 0
        self._wait_s = 0.0
        self._rescheduled = 0

    # -- backend primitives ----------------------------------------------------------------

    @abstractmethod
    def _try(self, holder: str, has_slot: bool, gap_s: float) -> tuple[int, float, float]:
        """One atomic step: (status, seconds, the backend clock's now in seconds).

        GRANTED: wait this long, then go; the next grant comes `gap_s` later than usual.
        """

    @abstractmethod
    def _release(self, holder: str) -> None:
        """Give the in-flight slot back (a no-op if it is no longer held)."""

    @abstractmethod
    def _wait_free(self, timeout_s: float) -> None:
        """Block until an in-flight slot may have been freed (or the timeout)."""

    @abstractmethod
    def pause_until(self, unix_ts: float) -> None: ...

    @abstractmethod
    def paused_until(self) -> float | None: ...

    # -- public interface ------------------------------------------------------------------

    def slot(self) -> AbstractContextManager[None]:
        return self.slot_prepared(_nothing)

    @contextmanager
    def slot_prepared(self, prepare: Callable[[], _T]) -> Iterator[_T]:
        holder, prepared = self._acquire(prepare)
        LIMITER_IN_FLIGHT.inc()
        try:
            yield prepared
        finally:
            LIMITER_IN_FLIGHT.dec()
            self._release(holder)

    def _note_local_pause(self, unix_ts: float) -> None:
        with self._counter_lock:
            self._local_pause = max(self._local_pause, unix_ts)

    def stats(self) -> LimiterStats:
        with self._counter_lock:
            return LimiterStats(self._grants, self._wait_s, self._rescheduled)

    # -- the loop ------------------------------------------------------------------------------

    def _acquire(self, prepare: Callable[[], _T]) -> tuple[str, _T]:
        holder = uuid.uuid4().hex
        started = time.monotonic()
        has_slot = False
        gap = 0.0
        late_count = 0
        try:
            while True:
                local_pause = self._local_pause - time.time()
                if local_pause > 0:
                    if has_slot:
                        self._release(holder)
                        has_slot = False
                    time.sleep(min(local_pause, _MAX_SLEEP_S))
                    continue
                before = time.monotonic()
                status, seconds, server_now = self._try(holder, has_slot, gap)
                after = time.monotonic()
                if status == _PAUSED:
                    has_slot = False  # the backend dropped it: nobody holds slots in a pause
                    time.sleep(min(seconds, _MAX_SLEEP_S))
                    continue
                if status == _FULL:
                    self._wait_free(seconds)
                    continue
                has_slot = True
                if status == _DEFER:
                    # The schedule is full beyond the horizon: come back later rather than hold
                    # a reservation far in the future.
                    time.sleep(min(seconds, _MAX_SLEEP_S))
                    continue
                # Sleep until the reserved moment on the schedule's own clock; lateness is
                # measured against that moment, not against when we asked or heard back.
                moment = self._clock.local_moment(before, after, server_now, seconds)
                prepared = prepare()  # while we wait; if it takes longer, that is lateness
                delay = moment - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                late = time.monotonic() - moment
                if self._local_pause > time.time():
                    continue
                if late > self._late_tolerance_s + gap:
                    # Sent now, this request would bunch with the grants after it. Take a new
                    # moment; when lateness persists, one followed by a gap of what it
                    # exceeded the tolerance by: if the next wake-up is as late, it goes, its
                    # delay absorbed by the schedule, never by the limit. (Only the excess:
                    # the whole lateness, doubling, cost half the rate at 100/s when loaded.)
                    late_count += 1
                    if late_count > _PLAIN_RESCHEDULES:
                        gap = min(max(gap, late - self._late_tolerance_s), _MAX_GAP_S)
                    with self._counter_lock:
                        self._rescheduled += 1
                    continue
                waited = time.monotonic() - started
                LIMITER_WAIT.observe(waited)
                with self._counter_lock:
                    self._grants += 1
                    self._wait_s += waited
                return holder, prepared
        except BaseException:
            if has_slot:
                self._release(holder)
            raise


class LocalLimiter(_ScheduledLimiter):
    """The same limiter for the threads of one process (embedded mode), on time.monotonic."""

    def __init__(
        self,
        rate: float,
        max_in_flight: int,
        *,
        jitter_s: float = 0.05,
        horizon_s: float = 1.0,
    ) -> None:
        super().__init__(rate, max_in_flight, jitter_s=jitter_s, horizon_s=horizon_s)
        self._cond = threading.Condition()
        self._holders: set[str] = set()
        self._tat = 0.0  # monotonic time of the next free grant
        self._pause = 0.0  # unix seconds

    def pause_until(self, unix_ts: float) -> None:
        self._note_local_pause(unix_ts)
        with self._cond:
            self._pause = max(self._pause, unix_ts)

    def paused_until(self) -> float | None:
        with self._cond:
            return self._pause if self._pause > time.time() else None

    def _try(self, holder: str, has_slot: bool, gap_s: float) -> tuple[int, float, float]:
        with self._cond:
            while True:
                pause = self._pause - time.time()
                if pause > 0:
                    if has_slot:
                        self._drop(holder)
                    return _PAUSED, pause, 0.0
                if has_slot or len(self._holders) < self.max_in_flight:
                    break
                # Waiting inside the lock: a release cannot slip in between check and wait.
                self._cond.wait(0.5)
            self._holders.add(holder)
            now = time.monotonic()
            at = max(now, self._tat)
            if at - now > self.horizon_s:
                return _DEFER, at - now - self.horizon_s, now
            self._tat = at + self.interval_s + gap_s
            return _GRANTED, at - now, now

    def _drop(self, holder: str) -> None:
        if holder in self._holders:
            self._holders.discard(holder)
            self._cond.notify()

    def _release(self, holder: str) -> None:
        with self._cond:
            self._drop(holder)

    def _wait_free(self, timeout_s: float) -> None:
        # Unused in practice: _try waits for a free slot itself, under the lock.
        with self._cond:
            self._cond.wait(min(timeout_s, 0.5))


# KEYS: schedule (next free grant, µs), holders (zset: holder -> lease expiry µs), pause (µs),
# marker (present while the state is intact). All times are the Redis server's clock.
# ARGV: holder, has_slot, max_in_flight, lease_us, interval_us, horizon_us, gap_us (extra
# space after this grant). Returns {status, microseconds, reserved_at_us, now_us}.
_ACQUIRE_LUA = """
local function num(x) return string.format('%.0f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holder = ARGV[1]
local has_slot = ARGV[2] == '1'
local max_in_flight = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local interval = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
local gap = tonumber(ARGV[7])

-- A fleet-wide pause (45011): nobody reserves, and a waiting holder gives its slot back.
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then
  if has_slot then redis.call('ZREM', KEYS[2], holder) end
  return {1, pause - now, 0, now}
end

-- In-flight slots are leases: a crashed holder's slot comes back when its lease runs out.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', num(now))
if not has_slot and redis.call('ZCARD', KEYS[2]) >= max_in_flight then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {2, tonumber(first[2]) - now, 0, now}
end
redis.call('ZADD', KEYS[2], num(now + lease), holder)
redis.call('PEXPIRE', KEYS[2], num(math.ceil(lease / 1000) + 1000))

local tat = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tat < 0 then
  if redis.call('EXISTS', KEYS[4]) == 0 then
    -- State lost (first start, FLUSHDB, restart): grants reserved before may still fire up
    -- to the horizon from now; begin after the last of them.
    tat = now + horizon + interval
    redis.call('SET', KEYS[4], '1')
  else
    -- The key expired while idle: the last grant is long past, no credit to carry.
    tat = now
  end
end
local at = math.max(now, tat)
local deferred = at - now > horizon
local next_tat = at + interval + gap
if deferred then next_tat = tat end
-- Expire a second after the schedule's end: by then restarting at "now" is safe.
redis.call('SET', KEYS[1], num(next_tat), 'PX', num(math.ceil((next_tat - now) / 1000) + 1000))
if deferred then
  return {3, at - now - horizon, 0, now}
end
return {0, at - now, at, now}
"""

# KEYS: holders, freed (list of wake-up tokens). ARGV: holder, max_in_flight.
_RELEASE_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('PEXPIRE', KEYS[2], 60000)
end
return 1
"""

# KEYS: pause. ARGV: until_us (0: only read). Returns the pause end in µs, or 0 if none.
_PAUSE_LUA = """
local function num(x) return string.format('%.0f', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_us = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1]))
if until_us <= now then return 0 end
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[1], num(until_us), 'PX', num(math.ceil((until_us - now) / 1000) + 1000))
end
return until_us
"""


@contextmanager
def _redis_away_is_retryable() -> Iterator[None]:
    """Redis unreachable (a restart, a failover): this attempt cannot be scheduled. A
    RetryableError lets the caller's retry policy try again after a backoff, as for any
    transient failure, instead of the account ending as an internal error."""
    import redis as redis_lib

    try:
        yield
    except redis_lib.RedisError as exc:
        raise RetryableError(f"rate limiter unavailable (Redis {type(exc).__name__})") from None


class RedisLimiter(_ScheduledLimiter):
    """One limiter for every process on every machine sharing `prefix` in one Redis.

    All processes sharing a prefix must use the same rate, jitter and horizon.
    `lease_s` must exceed the longest time a slot is held (the Midas request timeout plus the
    horizon); it is how long a crashed holder's slot stays taken.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        rate: float,
        max_in_flight: int,
        *,
        prefix: str = "midas:limiter",
        jitter_s: float = 0.05,
        horizon_s: float = 1.0,
        lease_s: float = 60.0,
    ) -> None:
        super().__init__(rate, max_in_flight, jitter_s=jitter_s, horizon_s=horizon_s)
        if lease_s <= horizon_s:
            raise ValueError("lease_s must exceed horizon_s")
        self._redis = redis_client
        self.lease_s = lease_s
        # A hash tag keeps every key in one Redis Cluster slot, as a multi-key script needs.
        base = "{" + prefix + "}"
        self._k_schedule = f"{base}:schedule"
        self._k_holders = f"{base}:holders"
        self._k_pause = f"{base}:pause"
        self._k_pauses = pause_log_key(prefix)
        self._k_marker = f"{base}:state"
        self._k_freed = f"{base}:freed"
        # register_script runs EVALSHA and reloads the script on NOSCRIPT (e.g. after a restart).
        self._acquire_script = redis_client.register_script(_ACQUIRE_LUA)
        self._release_script = redis_client.register_script(_RELEASE_LUA)
        self._pause_script = redis_client.register_script(_PAUSE_LUA)
        self._interval_us = math.ceil(self.interval_s * 1e6)
        self._horizon_us = math.ceil(horizon_s * 1e6)
        self._lease_us = math.ceil(lease_s * 1e6)

    def _reserve(self, holder: str, has_slot: bool, gap_us: int = 0) -> tuple[int, int, int, int]:
        """One acquire step: (status, µs, the reserved moment in Redis µs when granted, the
        Redis clock's now in µs)."""
        with _redis_away_is_retryable():
            reply: Any = self._acquire_script(
                keys=[self._k_schedule, self._k_holders, self._k_pause, self._k_marker],
                args=[
                    holder,
                    "1" if has_slot else "0",
                    self.max_in_flight,
                    self._lease_us,
                    self._interval_us,
                    self._horizon_us,
                    gap_us,
                ],
            )
        return int(reply[0]), int(reply[1]), int(reply[2]), int(reply[3])

    def _try(self, holder: str, has_slot: bool, gap_s: float) -> tuple[int, float, float]:
        status, micros, _, now_us = self._reserve(holder, has_slot, math.ceil(gap_s * 1e6))
        return status, micros / 1e6, now_us / 1e6

    def _release(self, holder: str) -> None:
        try:
            self._release_script(
                keys=[self._k_holders, self._k_freed], args=[holder, self.max_in_flight]
            )
        except Exception:  # never mask the caller's own exception
            # The lease runs out on its own; the slot is only late to come back.
            log.warning("limiter_release_failed", exc_info=True)

    def _wait_free(self, timeout_s: float) -> None:
        # Releases push a token; BLPOP wakes the longest waiter without polling. The timeout
        # covers leases that expire (crashed holders push nothing) and lost tokens.
        # Kept short so a client with a modest socket_timeout never times out on it.
        with _redis_away_is_retryable():
            self._redis.blpop([self._k_freed], timeout=min(max(timeout_s, 0.01), 0.5))

    def pause_until(self, unix_ts: float) -> None:
        self._note_local_pause(unix_ts)
        with _redis_away_is_retryable():
            self._pause_script(keys=[self._k_pause], args=[math.ceil(unix_ts * 1e6)])
            # A pause ends on a minute boundary (worker.midas.client), so its end names it:
            # one member per pause however many callers met the 45011. Alerts count them.
            added = self._redis.zadd(self._k_pauses, {str(int(unix_ts)): unix_ts})
            self._redis.zremrangebyscore(self._k_pauses, 0, unix_ts - PAUSE_LOG_KEEP_S)
        if added:
            FLEET_PAUSES.inc()

    def paused_until(self) -> float | None:
        with _redis_away_is_retryable():
            reply: Any = self._pause_script(keys=[self._k_pause], args=[0])
        return int(reply) / 1e6 if int(reply) else None


# How long the log of fleet pauses is kept (the alert looks at the last hour).
PAUSE_LOG_KEEP_S: Final = 86_400


def pause_log_key(prefix: str = "midas:limiter") -> str:
    """The sorted set of fleet pauses (member and score: the pause's end, unix seconds)."""
    return "{" + prefix + "}:pauses"


def fleet_pauses_since(
    client: redis.Redis, since_unix: float, prefix: str = "midas:limiter"
) -> int:
    """How many fleet pauses (45011) ended after `since_unix`."""
    return int(client.zcount(pause_log_key(prefix), since_unix, "+inf"))


def make_limiter(settings: Settings, redis: redis.Redis | None = None) -> Limiter:
    """The fleet limiter when REDIS_URL is set, else the in-process one (embedded mode)."""
    rate, cap = settings.MIDAS_RATE_LIMIT, settings.MIDAS_MAX_IN_FLIGHT
    margin = settings.MIDAS_RATE_MARGIN_S
    if settings.REDIS_URL is None:
        return LocalLimiter(rate, cap, jitter_s=margin)
    if redis is None:
        import redis as redis_lib

        redis = redis_lib.Redis.from_url(
            settings.REDIS_URL, socket_timeout=10.0, socket_connect_timeout=5.0
        )
    # A slot is held for the reservation wait (<= 1 s) plus one request; requests' timeout
    # is per read, so allow a few of them before a silent holder is presumed dead. Kept short:
    # a killed process's slots are lost to the whole fleet until their leases run out, while a
    # lease expiring under a slow-dripping answer only lets the cap be exceeded by one, briefly
    # (the rate schedule does not depend on leases).
    return RedisLimiter(
        redis, rate, cap, jitter_s=margin, lease_s=max(15.0, 3 * settings.MIDAS_TIMEOUT_S)
    )
