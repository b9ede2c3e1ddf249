"""Postgres restarted mid-run, under real Celery worker and beat processes.

The database is a private cluster (initdb + pg_ctl as the postgres user, on a free port), so
the shared one is never touched. `pg_ctl stop -m fast` ends every connection, as a failover or
a restart does: batches that were storing fail and roll back, pumps fail. What must heal it:
the failed batch's claim loses its liveness key, the sweep (beat) pumps the run again, the
pump takes the dead claim back, the items are fetched again and stored once.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from tests.orchestration.conftest import Procs, nightly_run
from tests.reliability.conftest import (
    GETBALANCE,
    PrivateCluster,
    assert_honest,
    fetched,
    finished_run,
    record,
    rel_env,
    small_world,
    start_celery_night,
    stop_and_witness,
    wait_for,
)
from worker.db.migrate import upgrade
from worker.simulator import Simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def done_so_far(url: str, run_id: int) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM run_items WHERE run_id = :r AND state = 'done'"),
                    {"r": run_id},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_postgres_restart_mid_run_loses_and_duplicates_nothing(
    private_pg: PrivateCluster, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    admin = create_engine(private_pg.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("CREATE DATABASE rel"))
    admin.dispose()
    url = private_pg.url.rsplit("/", 1)[0] + "/rel"
    upgrade(url)
    # The rate is not what this test is about (test_redis_restart.py and the fault mixes
    # assert it); without the simulator's own 45011 rule a host starved by the restart
    # cannot turn a late arrival into a minute's pause of the fleet.
    sim.configure(rate_limit=None)
    world = small_world(sim, rel_env(url, redis_url, sim.base_url, MIDAS_RATE_LIMIT="100"), 400)
    start_celery_night(world, procs)
    observable = world.planned - len(world.no_session)
    run = wait_for(lambda: nightly_run(url), 30, "the nightly run to be planned")
    # Batches hold 200 accounts (MIDAS_RATE_LIMIT x 2 s) and store them at their end: stop
    # while they fetch, and stay down until they have fetched everything and tried to store.
    wait_for(lambda: fetched(sim) >= observable // 3, 60, "a third fetched")
    at_stop = done_so_far(url, run.id)
    private_pg.stop("fast")  # every connection cut, as a restart or failover does
    stopped = time.monotonic()
    wait_for(lambda: fetched(sim) >= observable, 30, "every account fetched")
    time.sleep(1.5)
    private_pg.start()
    down_s = time.monotonic() - stopped

    run = wait_for(lambda: finished_run(url), 90, "the run to finish after the restart", every=0.5)
    recovered_s = time.monotonic() - stopped
    assert at_stop < world.planned, "the run was over before the restart: nothing was tested"
    counts = assert_honest(world, run)
    assert run.status == "complete" and counts["error"] == 0, counts
    stats = sim.stats()
    # Fetched twice at most: the batches whose store failed fetch again, nothing more.
    assert observable <= stats["by_path"][GETBALANCE] <= 2 * observable
    log = stop_and_witness(procs)
    record(
        "postgres_restart:celery",
        planned=run.planned,
        done_at_stop=at_stop,
        down_s=round(down_s, 1),
        finished_after_s=round(recovered_s, 1),
        requests=stats["by_path"][GETBALANCE],
        observable=observable,
        ok=counts["ok"],
        error=counts["error"],
        status=run.status,
        max_per_second=stats["max_per_second"],
        worker_log_errors=log.count('"level": "ERROR"'),
    )
