"""The rate limiter and in-flight cap: the schedule itself, then both backends under threads.

Grant times are taken from the Redis server clock where the script reports them, otherwise from
time.monotonic() at the moment `slot()` lets the caller go. The multi-process test against the
simulator is in test_limiter_processes.py.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import REGISTRY

from worker.config import load_settings
from worker.midas.limiter import (
    Limiter,
    LocalLimiter,
    RedisLimiter,
    grant_interval,
    make_limiter,
)

GRANTED, PAUSED, FULL, DEFER = 0, 1, 2, 3


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most events in any closed window [t, t + width] (the worst case starts at an event)."""
    ts = sorted(times)
    return max((bisect.bisect_right(ts, t + width) - i for i, t in enumerate(ts)), default=0)


def achieved_rate(times: list[float]) -> float:
    ts = sorted(times)
    return (len(ts) - 1) / (ts[-1] - ts[0])


def hammer(
    limiter: Limiter,
    *,
    threads: int,
    seconds: float,
    hold_s: float = 0.005,
    midway: Callable[[], None] | None = None,
    midway_at: float = 0.0,
) -> list[float]:
    """Threads take slots back to back until the deadline; returns the grant times."""
    grants: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while time.monotonic() < deadline:
                with limiter.slot():
                    now = time.monotonic()
                    with lock:
                        grants.append(now)
                    time.sleep(hold_s)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    if midway is not None:
        time.sleep(midway_at)
        midway()
    for t in pool:
        t.join(timeout=seconds + 30)
    assert not errors, errors
    return grants


def max_concurrency(limiter: Limiter, *, threads: int, each: int, hold_s: float) -> int:
    current = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal current, peak
        for _ in range(each):
            with limiter.slot():
                with lock:
                    current += 1
                    peak = max(peak, current)
                time.sleep(hold_s)
                with lock:
                    current -= 1

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    return peak


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def warm(limiter: Limiter) -> None:
    """Take one slot, so a fresh Redis state's start-up wait is behind us."""
    with limiter.slot():
        pass


# -- the schedule (pure) --------------------------------------------------------------------


def test_interval_keeps_floor_rate_grants_wider_than_a_second() -> None:
    # 50 grants must span 1.02 s: the 51st can never share a one-second window with the 1st.
    assert grant_interval(50, 0.02) == pytest.approx(1.02 / 50)
    assert 50 * grant_interval(50, 0.02) > 1.0
    # A fractional rate allows floor(rate) per second, never rounds up.
    assert grant_interval(2.5, 0.0) == pytest.approx(0.5)
    assert grant_interval(2.5, 0.02) == pytest.approx(0.51)
    # Below one per second the rate itself is the spacing.
    assert grant_interval(0.5, 0.02) == pytest.approx(2.0)
    assert grant_interval(1.0, 0.02) == pytest.approx(1.02)


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_interval_refuses_a_nonsense_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        grant_interval(rate, 0.02)


def test_constructors_refuse_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        LocalLimiter(10, 0)
    unconnected = redis.Redis(host="127.0.0.1", port=1)  # never used: the check comes first
    with pytest.raises(ValueError, match="lease_s"):
        RedisLimiter(unconnected, 10, 2, horizon_s=1.0, lease_s=0.5)


# -- Redis: the script ------------------------------------------------------------------------


@pytest.mark.integration
def test_redis_reservations_are_spaced_exactly_on_the_server_clock(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 20, 1000, horizon_s=3.0)
    r.set(lim._k_marker, "1")  # an intact, idle fleet: no start-up wait
    replies = [lim._reserve(f"h{i}", has_slot=False) for i in range(45)]
    assert {status for status, _, _, _ in replies} == {GRANTED}
    ats = [at for _, _, at, _ in replies]
    assert replies[0][1] < 50_000  # idle: the first one goes (almost) at once
    assert {b - a for a, b in itertools.pairwise(ats)} == {lim._interval_us}
    assert max_in_window([a / 1e6 for a in ats]) == 20

    # The schedule key dies a second after the last reservation, never before it.
    now_s, now_us = r.time()
    ttl_ms = r.pttl(lim._k_schedule)
    assert ats[-1] + lim._interval_us - (now_s * 1_000_000 + now_us) < ttl_ms * 1000
    # Three seconds of queue is the horizon: the next caller is told to come back later.
    while (reply := lim._reserve("late", has_slot=False))[0] == GRANTED:
        pass
    assert reply[0] == DEFER
    assert 0 < reply[1] <= lim._interval_us

    # Expired while idle (the marker is still there): restart at "now", no credit.
    r.delete(lim._k_schedule)
    status, wait_us, _, _ = lim._reserve("after-idle", has_slot=False)
    assert (status, wait_us) == (GRANTED, 0)


@pytest.mark.integration
def test_redis_lost_state_waits_out_reservations_handed_out_before(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 50, 10, horizon_s=0.4)
    sec, usec = r.time()
    lost_at = sec * 1_000_000 + usec
    status, _, _, _ = lim._reserve("a", has_slot=False)
    assert status == DEFER
    while (reply := lim._reserve("a", has_slot=True))[0] != GRANTED:
        time.sleep(reply[1] / 1e6)
    # Nothing before the horizon: a reservation made before the loss may still fire until then.
    assert reply[2] >= lost_at + lim._horizon_us


@pytest.mark.integration
def test_redis_in_flight_lease_reported_when_full(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 1000, 2, horizon_s=0.5, lease_s=5.0)
    r.set(lim._k_marker, "1")
    assert lim._reserve("a", has_slot=False)[0] == GRANTED
    assert lim._reserve("b", has_slot=False)[0] == GRANTED
    status, wait_us, _, _ = lim._reserve("c", has_slot=False)
    assert status == FULL
    assert 4_000_000 < wait_us <= 5_000_000  # until the oldest lease ends


# -- Redis: callers -------------------------------------------------------------------------


@pytest.mark.integration
def test_redis_threads_never_exceed_the_rate_in_any_second(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 40, 16)
    grants = hammer(lim, threads=8, seconds=3.2)  # ~1 s start-up wait, then ~2 s of grants
    assert len(grants) > 60
    assert max_in_window(grants) <= 40
    assert achieved_rate(grants) >= 0.85 * 40
    assert lim.stats().grants == len(grants)


@pytest.mark.integration
def test_redis_flushdb_mid_stream_does_not_burst(r: redis.Redis) -> None:
    # Eight threads keep ~8 reservations outstanding. Were the schedule to restart at "now"
    # after the flush, the new grants would overlap them (up to 30 + 8 in one second).
    lim = RedisLimiter(r, 30, 16, horizon_s=0.5)
    warm(lim)
    flushed_at = 0.0

    def flush() -> None:
        nonlocal flushed_at
        r.flushdb()
        flushed_at = time.monotonic()

    grants = hammer(lim, threads=8, seconds=3.0, midway=flush, midway_at=1.4)
    before = [g for g in grants if g < flushed_at]
    after = [g for g in grants if g > flushed_at]
    assert len(before) > 30
    assert len(after) > 20
    assert max_in_window(grants) <= 30


@pytest.mark.integration
def test_redis_in_flight_cap_holds_across_threads(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 500, 3, horizon_s=0.3)
    warm(lim)
    assert max_concurrency(lim, threads=10, each=5, hold_s=0.04) == 3
    assert r.zcard(lim._k_holders) == 0  # all released


@pytest.mark.integration
def test_redis_crashed_holder_slot_comes_back_after_its_lease(r: redis.Redis) -> None:
    crashed = RedisLimiter(r, 100, 1, horizon_s=0.3, lease_s=1.5)
    warm(crashed)
    held = crashed.slot()
    held.__enter__()  # a holder that dies: it never releases
    taken_at = time.monotonic()
    other = RedisLimiter(r, 100, 1, horizon_s=0.3, lease_s=1.5)
    with other.slot():
        waited = time.monotonic() - taken_at
    assert 1.3 <= waited <= 3.0
    held.__exit__(None, None, None)  # releasing a reclaimed lease is harmless


@pytest.mark.integration
def test_redis_exception_inside_slot_releases_it(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 500, 1, horizon_s=0.3)
    warm(lim)
    with pytest.raises(RuntimeError), lim.slot():
        raise RuntimeError("boom")
    assert r.zcard(lim._k_holders) == 0
    started = time.monotonic()
    warm(lim)
    assert time.monotonic() - started < 0.5


@pytest.mark.integration
def test_redis_pause_blocks_every_process_until_its_end(r: redis.Redis) -> None:
    setter = RedisLimiter(r, 100, 10)
    other = RedisLimiter(r, 100, 10)  # another process's limiter: it only sees Redis
    warm(other)
    pause_end = time.time() + 0.8
    setter.pause_until(pause_end)
    setter.pause_until(pause_end - 5)  # an earlier end never shortens a pause
    assert other.paused_until() == pytest.approx(pause_end, abs=1e-3)

    granted: list[float] = []
    lock = threading.Lock()

    def go() -> None:
        with other.slot():
            with lock:
                granted.append(time.time())

    pool = [threading.Thread(target=go) for _ in range(3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=10)
    assert len(granted) == 3
    assert min(granted) >= pause_end - 0.005  # same host: one wall clock, to the ms
    assert other.paused_until() is None


@pytest.mark.integration
def test_redis_metrics_count_waits_and_holders(r: redis.Redis) -> None:
    lim = RedisLimiter(r, 100, 4, horizon_s=0.3)
    before = REGISTRY.get_sample_value("midas_limiter_wait_seconds_count") or 0.0
    with lim.slot():
        assert REGISTRY.get_sample_value("midas_limiter_in_flight") == 1
    assert REGISTRY.get_sample_value("midas_limiter_in_flight") == 0
    assert REGISTRY.get_sample_value("midas_limiter_wait_seconds_count") == before + 1
    assert lim.stats().grants == 1
    assert lim.stats().wait_seconds > 0.3  # the fresh state's start-up wait


# -- in-process --------------------------------------------------------------------------


def test_local_threads_never_exceed_the_rate_in_any_second() -> None:
    lim = LocalLimiter(40, 16)
    grants = hammer(lim, threads=8, seconds=2.5)
    assert max_in_window(grants) <= 40
    assert achieved_rate(grants) >= 0.85 * 40


def test_local_in_flight_cap_holds_across_threads() -> None:
    lim = LocalLimiter(500, 3)
    assert max_concurrency(lim, threads=10, each=5, hold_s=0.04) == 3


def test_local_pause_blocks_until_its_end() -> None:
    lim = LocalLimiter(100, 10)
    pause_end = time.time() + 0.5
    lim.pause_until(pause_end)
    lim.pause_until(pause_end - 5)
    assert lim.paused_until() == pause_end
    with lim.slot():
        assert time.time() >= pause_end
    assert lim.paused_until() is None


def test_local_late_caller_reschedules_with_a_gap_instead_of_going_late() -> None:
    class SlowReply(LocalLimiter):
        """The answer arrives 60 ms after the decision: the reserved moment is past."""

        slow_replies = 0
        last_moment = 0.0

        def _try(self, holder: str, has_slot: bool, gap_s: float) -> tuple[int, float, float]:
            reply = super()._try(holder, has_slot, gap_s)
            self.last_moment = reply[2] + reply[1]
            if self.slow_replies:
                self.slow_replies -= 1
                time.sleep(0.06)
            return reply

    lim = SlowReply(100, 4, jitter_s=0.02)
    warm(lim)
    lim.slow_replies = 1
    warm(lim)
    assert lim.stats().rescheduled == 1  # one late answer, one new reservation
    time.sleep(0.1)  # the gap it left is over: the schedule is idle again
    lim.slow_replies = 100
    warm(lim)  # always late: a reservation that leaves room for its lateness goes
    assert lim.stats().rescheduled >= 1 + 1
    assert lim.stats().grants == 3
    # Nobody gets the moments the late caller may still be using: a gap of its lateness
    # beyond the tolerance (60 ms late, 10 ms tolerated).
    assert lim._tat - lim.last_moment >= lim.interval_s + 0.05


class _LateThreadClock:
    """`time` for the limiter module, whose sleeps overshoot by `late_s` in threads named
    "late…" (threads the OS wakes late, every time)."""

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s
        self.monotonic = time.monotonic
        self.time = time.time

    def sleep(self, seconds: float) -> None:
        if threading.current_thread().name.startswith("late"):
            seconds += self.late_s
        time.sleep(seconds)


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_thread_that_always_wakes_late_never_bunches_with_the_next_second(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: after three late wake-ups a caller went anyway, 30 ms late with a 20 ms margin;
    two of them together with a full second after them made N+1 requests in one second."""
    import worker.midas.limiter as limiter_mod

    rate = 50
    lim: Limiter
    if backend == "redis":
        lim = RedisLimiter(request.getfixturevalue("r"), rate, 16, jitter_s=0.02)
    else:
        lim = LocalLimiter(rate, 16, jitter_s=0.02)
    warm(lim)
    monkeypatch.setattr(limiter_mod, "time", _LateThreadClock(0.03))
    gone: list[float] = []
    late_went = 0
    lock = threading.Lock()
    deadline = time.monotonic() + 3.0

    def work() -> None:
        nonlocal late_went
        late = threading.current_thread().name.startswith("late")
        while time.monotonic() < deadline:
            with lim.slot():
                with lock:
                    gone.append(time.monotonic())  # the request would leave now
                    late_went += late
                # Late threads come back only after the full second behind them.
                time.sleep(1.1 if late else 0.005)

    pool = [threading.Thread(target=work) for _ in range(6)]
    pool += [threading.Thread(target=work, name=f"late{i}") for i in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert max_in_window(gone) <= rate
    # No livelock: the late threads went again and again (at 0, ~1.1 and ~2.2 s), and the
    # others kept most of the rate (a late wake-up costs its slot and a gap of its lateness).
    assert late_went >= 2 * 2
    assert achieved_rate(gone) >= 0.6 * rate


def test_local_exception_inside_slot_releases_it() -> None:
    lim = LocalLimiter(500, 1)
    with pytest.raises(RuntimeError), lim.slot():
        raise RuntimeError("boom")
    started = time.monotonic()
    warm(lim)
    assert time.monotonic() - started < 0.5


# -- factory -------------------------------------------------------------------------------


def test_make_limiter_is_local_without_redis() -> None:
    lim = make_limiter(load_settings({"MIDAS_RATE_LIMIT": "7", "MIDAS_MAX_IN_FLIGHT": "3"}))
    assert isinstance(lim, LocalLimiter)
    assert (lim.rate, lim.max_in_flight) == (7, 3)


def test_make_limiter_takes_the_rate_margin_from_settings() -> None:
    wide = make_limiter(load_settings({"MIDAS_RATE_LIMIT": "100", "MIDAS_RATE_MARGIN_S": "0.1"}))
    assert wide.jitter_s == 0.1
    assert wide.interval_s == pytest.approx(1.1 / 100)  # 100 grants span 1.1 s
    default = make_limiter(load_settings({"MIDAS_RATE_LIMIT": "100"}))
    assert default.interval_s == pytest.approx(1.05 / 100)


@pytest.mark.integration
def test_make_limiter_uses_redis_url(redis_url: str) -> None:
    settings = load_settings(
        {"REDIS_URL": redis_url, "MIDAS_RATE_LIMIT": "7", "MIDAS_MAX_IN_FLIGHT": "3"}
    )
    lim = make_limiter(settings)
    assert isinstance(lim, RedisLimiter)
    assert (lim.rate, lim.max_in_flight) == (7, 3)
    assert lim.lease_s > settings.MIDAS_TIMEOUT_S
    lim.pause_until(time.time() + 30)  # talks to that Redis
    client = redis.Redis.from_url(redis_url)
    assert client.exists(lim._k_pause)
    client.close()
    lim._redis.close()


@pytest.mark.integration
def test_each_fleet_pause_is_logged_and_counted_once(r: redis.Redis) -> None:
    """Many callers meet the same 45011 and pause until the same minute: one pause, counted
    once over the fleet (the alert on 45011 storms counts these)."""
    from worker.midas.limiter import fleet_pauses_since

    def counted() -> float:
        return REGISTRY.get_sample_value("midas_fleet_pauses_total") or 0.0

    before = counted()
    a, b = RedisLimiter(r, 20, 10), RedisLimiter(r, 20, 10)  # two processes' limiters
    minute = (int(time.time()) // 60 + 1) * 60
    for lim in (a, b, a, b):
        lim.pause_until(minute)
    assert fleet_pauses_since(r, time.time() - 3600) == 1
    assert counted() == before + 1
    b.pause_until(minute + 60)  # the next minute's pause is another one
    assert fleet_pauses_since(r, time.time() - 3600) == 2
    assert fleet_pauses_since(r, minute + 30) == 1
    assert counted() == before + 2
