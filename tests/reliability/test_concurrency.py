"""Races on one Postgres: starts of the same night, a batch message delivered twice at once,
the finalizer beside the last batches. Threads stand in for processes: every one has its own
connection and transactions, which is what the guarantees rest on (row locks, unique keys,
the claim carried by the message).

Covered elsewhere and not repeated here: a worker SIGKILLed mid-batch and a pool process
killed (tests/orchestration/test_nightly.py), a redelivered or overtaken batch one after the
other and concurrent claimers (tests/orchestration/test_runs.py).
"""

from __future__ import annotations

import threading
from functools import partial

import pytest
import redis
from sqlalchemy import func, select

from tests.reliability.conftest import (
    GETBALANCE,
    assert_honest,
    load_run,
    make_deps,
    record,
    rel_env,
    small_world,
    snapshots,
    wait_for,
)
from worker.db.models import Run, RunItem
from worker.db.session import session_scope
from worker.recon import runs as service
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def race(n: int, target) -> list[object]:  # type: ignore[no-untyped-def]
    """Run `target(i)` in n threads released at the same moment; their results (or errors)."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_starts_of_one_night_make_one_run_planned_once(
    db_url: str, redis_url: str, sim: Simulator
) -> None:
    """Two beat processes, a retried start and an operator at the same moment."""
    world = small_world(sim, rel_env(db_url, redis_url, sim.base_url), n=300)
    settings = world.settings

    def start(_i: int) -> service.StartResult:
        with session_scope(world.url) as session:
            return service.start_nightly(session, settings, trigger="beat")

    for attempt in range(3):  # the race again on the same date: still one run
        results = race(8, start)
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, errors
        ids = {r.run_id for r in results}  # type: ignore[union-attr]
        assert len(ids) == 1
        created = [r for r in results if r.created]  # type: ignore[union-attr]
        assert len(created) == (1 if attempt == 0 else 0)
    with session_scope(world.url) as session:
        runs = session.scalar(select(func.count()).select_from(Run).where(Run.kind == "nightly"))
        items = session.scalar(select(func.count()).select_from(RunItem))
    assert runs == 1
    assert items == world.planned
    record("concurrent_start", starts=24, runs=runs, items=items, planned=world.planned)


def test_a_batch_delivered_twice_at_once_is_stored_once(
    db_url: str, redis_url: str, sim: Simulator
) -> None:
    """Redis redelivers an unacknowledged message while its first copy still runs (a worker
    that lost its broker connection): both copies carry the same claim."""
    world = small_world(sim, rel_env(db_url, redis_url, sim.base_url), n=200)
    # Each copy runs in its own worker process, with its own Redis client and Midas client.
    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    deps = [make_deps(world, c) for c in clients]
    db = partial(session_scope, world.url)
    with db() as session:
        started = service.start_nightly(session, world.settings, trigger="cli")
    rounds = 0
    while True:
        with db() as session:
            pumped = service.pump(session, started.run_id, room=lambda _k: 1, size=50)
        if pumped.status != "running":
            break
        for batch in pumped.batches:
            rounds += 1
            copies = race(
                2,
                lambda i, b=batch: service.run_batch(db, deps[i], b.run_id, b.account_ids, b.claim),
            )
            assert not [c for c in copies if isinstance(c, Exception)], copies
            done = sum(c.done for c in copies)  # type: ignore[union-attr]
            assert done == len(batch.account_ids), "each account stored by exactly one copy"
    for c in clients:
        c.close()
    run = load_run(world.url, started.run_id)
    counts = assert_honest(world, run)  # one snapshot per account, the figures add up
    fetched = sim.stats()["by_path"][GETBALANCE]
    observable = world.planned - len(world.no_session)
    # Both copies may fetch (the claim is the same), never store twice.
    assert observable <= fetched <= 2 * observable
    record(
        "batch_delivered_twice",
        batches=rounds,
        planned=run.planned,
        snapshots=sum(counts.values()),
        getbalance=fetched,
        observable=observable,
        status=run.status,
    )


def test_the_finalizer_beside_the_last_batches_never_closes_early(
    db_url: str, redis_url: str, sim: Simulator
) -> None:
    """Finalizers in a loop (the operator's task, the pump of another batch) while batches
    store: the run is closed once, after the last item, with figures that add up."""
    world = small_world(sim, rel_env(db_url, redis_url, sim.base_url), n=200)
    db = partial(session_scope, world.url)
    with db() as session:
        started = service.start_nightly(session, world.settings, trigger="cli")
        pumped = service.pump(session, started.run_id, room=lambda _k: 8, size=25)
    batches = pumped.batches
    # Each batch in a worker process of its own: its own Redis client and Midas client.
    clients = [redis.Redis.from_url(redis_url) for _ in batches]
    deps = [make_deps(world, c) for c in clients]
    assert len(batches) == 8 and sum(len(b.account_ids) for b in batches) == world.planned
    stop = threading.Event()
    early: list[tuple[int, int]] = []
    finalizations = [0]

    def finalizer() -> None:
        while not stop.is_set():
            with db() as session:
                run = service.finalize(session, started.run_id)
                finalizations[0] += 1
                if run is not None and run.status != "running":
                    open_items = service.repo.item_counts(session, started.run_id).open
                    if open_items:
                        early.append((finalizations[0], open_items))
            stop.wait(0.005)  # a busy operator, not a spin loop holding the run's row lock

    finalizers = [threading.Thread(target=finalizer) for _ in range(3)]
    for f in finalizers:
        f.start()
    results = race(
        len(batches),
        lambda i: service.run_batch(
            db, deps[i], batches[i].run_id, batches[i].account_ids, batches[i].claim
        ),
    )
    try:
        wait_for(lambda: load_run(world.url, started.run_id).status != "running", 10, "a finalizer")
    finally:
        stop.set()
        for f in finalizers:
            f.join(timeout=30)
        for c in clients:
            c.close()
    assert not [r for r in results if isinstance(r, Exception)], results
    assert not early, f"closed with open items: {early[:3]}"
    run = load_run(world.url, started.run_id)
    counts = assert_honest(world, run)
    assert counts["error"] == 0, {s.errmsg for s in snapshots(world.url, run.id) if s.errmsg}
    record(
        "finalizer_race",
        batches=len(batches),
        finalize_calls=finalizations[0],
        planned=run.planned,
        ok=run.ok,
        unobservable=run.unobservable,
        error=run.error,
        status=run.status,
    )
