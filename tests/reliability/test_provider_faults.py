"""Provider faults: nightly runs over real HTTP against the simulator while it misbehaves.

Each run goes through the production batch code (plan, pump, `run_batch`, the Midas client,
the Redis limiter and token cache) in this process. Whatever Midas does, every planned account
ends with one snapshot: ok with exactly what Midas holds, or an honest `unobservable` /
`error` without values; the verdict and the coverage figures follow from the snapshots; the
rate is never exceeded; and retries are bounded, counted at the simulator:

    getbalance requests == answers that settled an account (ok, 90016) + faults fired

since every fault costs one attempt, and an account gives up after RetryPolicy.attempts.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from tests.reliability.conftest import (
    GETBALANCE,
    RATE,
    assert_honest,
    drive_nightly,
    make_sim,
    record,
    rel_env,
    small_world,
)
from worker.recon.fetch import RetryPolicy
from worker.simulator import Simulator

pytestmark = pytest.mark.integration

ATTEMPTS = RetryPolicy().attempts


@pytest.fixture
def fast_quota_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 45011 pauses the fleet until the next whole minute; here until the next second, so
    that a storm costs seconds, not minutes (the pause itself is what is under test)."""
    import worker.midas.client as client_module

    monkeypatch.setattr(client_module, "next_minute", lambda now: float(int(now) + 1))


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def check_accounting(sim: Simulator, counts: dict[str, int], n_no_session: int, planned: int):  # type: ignore[no-untyped-def]
    """Requests at the simulator match what the run stored; returns the stats."""
    stats = sim.stats()
    requests_ = stats["by_path"].get(GETBALANCE, 0)
    fired = (
        sum(stats["faults"].values())
        + stats["by_errcode"].get(45011, 0)
        - stats["faults"].get("quota_minute", 0)
    )
    settled = counts["ok"] + (counts["unobservable"] - n_no_session)
    assert requests_ == settled + fired, (requests_, settled, fired, stats)
    # An account is given up only after ATTEMPTS faulted attempts: never on the first fault
    # (an error recorded without retrying would show here).
    assert counts["error"] * ATTEMPTS <= fired, (counts, fired)
    # Bounded: each account at most ATTEMPTS failed attempts (plus one token refresh each,
    # plus the waits out of 45011 pauses, which are not the account's fault).
    assert requests_ <= (planned - n_no_session) * (2 * ATTEMPTS + RetryPolicy().quota_waits)
    return stats


BURSTS = {
    # Faults served to the next requests in turn, many more than the run's first wave can
    # absorb: the tail of the run is retries only, so some accounts run out of attempts.
    "minus1": [("minus1", 40)],
    "timeout": [("timeout", 12)],
    "transport": [("http500", 20), ("malformed_json", 20), ("truncated", 20)],
    "values": [("wrong_types", 20), ("huge", 20), ("negative", 20)],
    "token_expired": [("token_expired", 30)],
}


# Where the rate is asserted, it binds: the run's requests need more than a second at it,
# and the simulator answers 45011 above it.
BOUND_RATE = 100


@pytest.mark.parametrize("burst", list(BURSTS))
def test_a_fault_burst_ends_honest_bounded_and_within_the_rate(
    db_url: str, r: redis.Redis, redis_url: str, sim: Simulator, burst: str
) -> None:
    env = rel_env(
        db_url, redis_url, sim.base_url, MIDAS_TIMEOUT_S="0.5", MIDAS_RATE_LIMIT=str(BOUND_RATE)
    )
    sim.configure(rate_limit=BOUND_RATE)
    world = small_world(sim, env)
    sim.reset_stats()
    for kind, count in BURSTS[burst]:
        sim.inject(kind, count=count)
    began = time.monotonic()
    run = drive_nightly(world, r)
    took = time.monotonic() - began
    counts = assert_honest(world, run)
    stats = check_accounting(sim, counts, len(world.no_session), world.planned)
    assert stats["faults"] == dict(BURSTS[burst]), "the whole burst was served to the run"
    assert stats["max_per_second"] <= BOUND_RATE
    assert 45011 not in stats["by_errcode"]
    total = sum(c for _, c in BURSTS[burst])
    assert counts["error"] <= total // ATTEMPTS
    record(
        f"burst:{burst}",
        planned=run.planned,
        faults=total,
        requests=stats["by_path"][GETBALANCE],
        ok=counts["ok"],
        unobservable=counts["unobservable"],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
        token_calls=stats["token_calls"],
        seconds=round(took, 1),
    )


def test_a_token_that_expires_mid_run_is_refreshed_once(
    db_url: str, r: redis.Redis, redis_url: str, sim: Simulator
) -> None:
    world = small_world(sim, rel_env(db_url, redis_url, sim.base_url), n=300)
    sim.reset_stats()
    expired_at: list[int] = []

    def expire_twice() -> None:
        for _ in range(2):
            while sim.stats()["by_path"].get(GETBALANCE, 0) < 100 * (len(expired_at) + 1):
                time.sleep(0.01)
            sim.expire_tokens()  # every token handed out so far stops working at once
            expired_at.append(sim.stats()["by_path"][GETBALANCE])

    expirer = threading.Thread(target=expire_twice, daemon=True)
    expirer.start()
    run = drive_nightly(world, r)
    expirer.join(timeout=5)
    assert len(expired_at) == 2, "the run ended before the token expired twice"
    counts = assert_honest(world, run)
    assert counts["error"] == 0 and run.status == "complete"
    stats = sim.stats()
    # Each expiry: the in-flight requests see 42001 once, one process refreshes (compare and
    # refresh in Redis), everyone retries with the new token.
    rejected = stats["by_errcode"].get(42001, 0)
    assert 1 <= rejected <= 2 * 32
    assert stats["token_calls"] <= 1 + 2 * 2, stats["token_calls"]
    assert stats["force_refresh_calls"] == 0
    assert stats["by_path"][GETBALANCE] == counts["ok"] + len(world.expired) + rejected
    record(
        "token_expires_mid_run",
        planned=run.planned,
        expiries=2,
        rejected_42001=rejected,
        token_calls=stats["token_calls"],
        requests=stats["by_path"][GETBALANCE],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
    )


def test_a_45011_storm_pauses_the_fleet_and_loses_no_account(
    db_url: str, r: redis.Redis, redis_url: str, fast_quota_minute: None
) -> None:
    """Midas' real quota is far below MIDAS_RATE_LIMIT (a misconfiguration): it answers 45011
    to everything above 60 a second. Every 45011 pauses the whole fleet; no account is lost,
    each ends ok or, after RetryPolicy.quota_waits pauses, as an honest error."""
    sim = make_sim(rate_limit=60)
    try:
        world = small_world(sim, rel_env(db_url, redis_url, sim.base_url), n=150)
        sim.reset_stats()
        began = time.monotonic()
        run = drive_nightly(world, r)
        took = time.monotonic() - began
        counts = assert_honest(world, run)
        stats = check_accounting(sim, counts, len(world.no_session), world.planned)
    finally:
        from tests.reliability.conftest import WITNESS

        WITNESS.simulator(sim)
        sim.stop()
    storm = stats["by_errcode"].get(45011, 0)
    assert storm > 0, "the storm did not happen"
    # After a 45011 nobody is granted a slot until the pause ends: above Midas' quota come
    # only the requests already in flight (MIDAS_MAX_IN_FLIGHT), not MIDAS_RATE_LIMIT's 400.
    assert stats["max_per_second"] <= 60 + 32, stats["max_per_second"]
    # The pauses hold the fleet: far fewer 45011 answers than requests a free-running
    # client would have sent in the same time at MIDAS_RATE_LIMIT.
    assert storm < took * RATE / 4, (storm, took)
    record(
        "storm:45011",
        planned=run.planned,
        answered_45011=storm,
        requests=stats["by_path"][GETBALANCE],
        ok=counts["ok"],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
        seconds=round(took, 1),
    )


# (45011 pauses are left to the storm test: each costs a second.)
KINDS = [k for kinds in ("minus1", "transport", "values") for k, _ in BURSTS[kinds]]


# A longer soak: RELIABILITY_MIX_SEEDS=200 pytest tests/reliability -k mixes
MIX_SEEDS = int(os.environ.get("RELIABILITY_MIX_SEEDS", "3"))


@pytest.mark.parametrize("seed", range(MIX_SEEDS))
def test_random_fault_mixes_give_an_honest_verdict(
    db_url: str,
    r: redis.Redis,
    redis_url: str,
    sim: Simulator,
    seed: int,
) -> None:
    """Run verdicts under a random mix: several fault kinds at random rates, some so high that
    accounts run out of attempts. The run is complete exactly when no account errored, and
    ok + unobservable + error == planned, whatever the mix."""
    rng = random.Random(seed)
    # A rate the run's ~170 requests must wait for: here the limit binds, retries included.
    env = rel_env(db_url, redis_url, sim.base_url, MIDAS_RATE_LIMIT=str(BOUND_RATE))
    sim.configure(rate_limit=BOUND_RATE)
    world = small_world(sim, env, n=120, seed=seed)
    sim.reset_stats()
    mix = {kind: round(rng.uniform(0.02, 0.25), 2) for kind in rng.sample(KINDS, 3)}
    for kind, rate in mix.items():
        sim.inject(kind, rate=rate)
    run = drive_nightly(world, r)
    counts = assert_honest(world, run)
    stats = check_accounting(sim, counts, len(world.no_session), world.planned)
    assert stats["max_per_second"] <= BOUND_RATE
    assert 45011 not in stats["by_errcode"]
    record(
        f"mix:{seed}",
        mix=mix,
        planned=run.planned,
        requests=stats["by_path"][GETBALANCE],
        faults=sum(stats["faults"].values()),
        ok=counts["ok"],
        unobservable=counts["unobservable"],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
    )
