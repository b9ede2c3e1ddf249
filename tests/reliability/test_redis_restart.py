"""Redis restarted mid-run (a private redis-server without persistence: every key is lost).

The limiter's schedule, in-flight set and pause live in Redis; so do the token cache, the
claims' liveness keys and the broker's messages. A restart must cost time, never the rate:
after it the limiter finds its state marker gone and starts its schedule after every
reservation it may have handed out before (worker/midas/limiter.py), so no one-second window
at Midas holds more than the limit.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from tests.orchestration.conftest import Procs
from tests.reliability.conftest import (
    GETBALANCE,
    PrivateRedis,
    assert_honest,
    drive_nightly,
    fetched,
    finished_run,
    record,
    rel_env,
    small_world,
    snapshots,
    start_celery_night,
    stop_and_witness,
    wait_for,
)
from worker.midas.errors import RetryableError
from worker.midas.limiter import RedisLimiter
from worker.recon.fetch import RetryPolicy
from worker.simulator import Simulator, max_per_window

pytestmark = pytest.mark.integration


def restart(server: PrivateRedis, down_s: float) -> None:
    server.kill()  # SIGKILL: no shutdown save, nothing flushed; the keys are gone
    time.sleep(down_s)
    server.start()


def test_the_limiter_allows_no_burst_after_a_redis_restart(private_redis: PrivateRedis) -> None:
    rate, threads = 50, 12
    grants: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def take() -> None:
        client = redis.Redis.from_url(
            private_redis.url, socket_timeout=2, socket_connect_timeout=0.5
        )
        limiter = RedisLimiter(client, rate, 32, prefix="rel:limiter")
        while not stop.is_set():
            try:
                with limiter.slot():
                    at = time.monotonic()
                    with lock:
                        grants.append(at)
            except RetryableError as exc:  # Redis away: the caller's retry policy decides
                failures.append(str(exc))
                time.sleep(0.05)
        client.close()

    workers = [threading.Thread(target=take, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    wait_for(lambda: len(grants) > rate + 10, 10, "the limiter to run at its rate")
    before = len(grants)
    restart(private_redis, 0.3)
    wait_for(lambda: len(grants) > before + rate + 10, 15, "grants after the restart")
    stop.set()
    for w in workers:
        w.join(timeout=10)
    assert failures, "the restart was not noticed: nothing was tested"
    assert all(f.startswith("rate limiter unavailable (Redis") for f in failures), failures[:3]
    # Grants are taken inside the slot, before any request: Midas would see these moments.
    worst = max_per_window(sorted(grants), 1.0)
    assert worst <= rate, worst
    record(
        "redis_restart:limiter",
        rate=rate,
        grants=len(grants),
        redis_errors=len(failures),
        max_per_second=worst,
    )


def test_a_run_through_a_redis_restart_loses_nothing_and_keeps_the_rate(
    db_url: str, private_redis: PrivateRedis, sim: Simulator
) -> None:
    """The limiter and the token cache lose their Redis for half a second mid-run: the
    accounts being fetched meanwhile are retried like any transient failure."""
    env = rel_env(db_url, private_redis.url, sim.base_url, MIDAS_RATE_LIMIT="100")
    sim.configure(rate_limit=100)
    world = small_world(sim, env, n=300)
    sim.reset_stats()
    client = redis.Redis.from_url(private_redis.url, socket_timeout=2, socket_connect_timeout=0.5)
    restarted: list[float] = []

    def outage() -> None:
        wait_for(lambda: fetched(sim) >= 100, 30, "a third")
        restart(private_redis, 0.5)
        restarted.append(time.monotonic())

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    # The production retry policy: its backoff (~1-2 s over four attempts) is what rides out
    # a short outage.
    run = drive_nightly(world, client, RetryPolicy())
    thread.join(timeout=10)
    client.close()
    assert restarted, "the run ended before Redis was restarted"
    counts = assert_honest(world, run)
    stats = sim.stats()
    assert stats["max_per_second"] <= 100, stats["max_per_second"]
    assert 45011 not in stats["by_errcode"]
    errors = {s.errmsg for s in snapshots(world.url, run.id) if s.status == "error"}
    assert counts["error"] == 0 and run.status == "complete", (counts, errors)
    record(
        "redis_restart:run",
        planned=run.planned,
        requests=stats["by_path"][GETBALANCE],
        ok=counts["ok"],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
        token_calls=stats["token_calls"],
    )


@pytest.mark.slow
def test_a_redis_restart_under_celery_loses_the_queue_and_the_run_still_completes(
    db_url: str, private_redis: PrivateRedis, sim: Simulator, procs: Procs
) -> None:
    """The broker itself restarts without persistence: queued batch messages, claim keys, the
    pump key, the limiter and the token cache are gone. The worker and beat reconnect, the
    sweep pumps the run again, the dead claims go back to the plan."""
    world = small_world(
        sim, rel_env(db_url, private_redis.url, sim.base_url, MIDAS_RATE_LIMIT="100"), n=400
    )
    sim.configure(rate_limit=None)  # the rate is asserted above, not on a starved host here
    start_celery_night(world, procs)
    observable = world.planned - len(world.no_session)
    wait_for(lambda: fetched(sim) >= observable // 3, 60, "a third fetched")
    restart(private_redis, 1.0)
    restarted = time.monotonic()
    run = wait_for(
        lambda: finished_run(world.url), 120, "the run to finish after the restart", every=0.5
    )
    recovered_s = time.monotonic() - restarted
    counts = assert_honest(world, run)
    assert run.status == "complete" and counts["error"] == 0, counts
    stats = sim.stats()
    assert observable <= stats["by_path"][GETBALANCE] <= 2 * observable
    stop_and_witness(procs)
    record(
        "redis_restart:celery",
        planned=run.planned,
        finished_after_s=round(recovered_s, 1),
        requests=stats["by_path"][GETBALANCE],
        observable=observable,
        ok=counts["ok"],
        error=counts["error"],
        status=run.status,
    )
