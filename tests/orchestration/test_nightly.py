"""Nightly runs on real Celery worker processes, Redis, Postgres and the simulator.

The planted world (conftest.plant): differences that must end confirmed, top-ups in flight
that must end cleared, expired sessions and never-logged-in accounts (unobservable), idle
accounts (not planned), -1 bursts, and payments landing while the run goes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.orchestration.conftest import (
    RATE,
    Procs,
    Settler,
    World,
    case_sets,
    nightly_run,
    no_suspected,
    plant,
    wait_for,
    world_env,
)
from worker.celery_app import make_app
from worker.db.models import BalanceSnapshot, Run, RunItem
from worker.db.session import session_scope
from worker.simulator import Simulator, max_per_window

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIDAS_RECON = str(Path(sys.executable).with_name("midas-recon"))
GETBALANCE = "/wxa/game/getbalance"


def cli(world: World, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MIDAS_RECON, *args],
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def done_items(url: str, run_id: int) -> int:
    with session_scope(url) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(RunItem)
                .where(RunItem.run_id == run_id, RunItem.state == "done")
            )
            or 0
        )


def assert_exact_outcome(world: World, run: Run) -> None:
    """Coverage counts exact, one snapshot per planned account, the planted cases only."""
    assert run.status == "complete", run.failure_reason
    assert run.planned == world.planned
    assert run.unobservable == len(world.unobservable)
    assert run.ok == world.planned - len(world.unobservable)
    assert run.error == 0
    with session_scope(world.url) as session:
        snaps = session.execute(
            select(BalanceSnapshot.openid, BalanceSnapshot.zone_id, BalanceSnapshot.status).where(
                BalanceSnapshot.run_id == run.id
            )
        ).all()
        opened = session.execute(
            select(func.count()).select_from(Run).where(Run.kind == "nightly")
        ).scalar_one()
    assert opened == 1
    assert len(snaps) == len({(o, z) for o, z, _ in snaps}) == world.planned
    unobservable = {(o, z) for o, z, status in snaps if status == "unobservable"}
    assert unobservable == world.unobservable
    planned = set(world.players) - world.inactive
    assert {(o, z) for o, z, _ in snaps} == planned

    cases = case_sets(world.url)
    assert cases.get("confirmed", set()) == world.expected_confirmed()
    assert world.expected_cleared() <= cases.get("cleared", set())
    # Payments that landed during the run may have been seen half-way (ledger first): those
    # cases are cleared too. Nothing else differs.
    paying = set(world.paying)
    extra = cases.get("cleared", set()) - world.expected_cleared()
    assert {(o, z) for o, z, _ in extra} <= paying
    assert not cases.get("suspected") and not cases.get("resolved")
    assert run.mismatches_opened >= len(world.expected_confirmed() | world.expected_cleared())


def test_nightly_run_with_payments_faults_and_a_recheck(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    world = plant(sim, world_env(db_url, redis_url, sim.base_url), 1500)
    procs.configure(world.env)
    procs.worker("w1", level="INFO")  # its log is searched for secrets below
    procs.beat()
    sim.inject("minus1", count=40)
    began = time.monotonic()
    with Settler(world):
        runner = subprocess.Popen(
            [MIDAS_RECON, "run", "--wait"],
            env={**os.environ, **world.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        run = wait_for(lambda: nightly_run(world.url), 30, "the nightly run to be planned")
        wait_for(lambda: done_items(world.url, run.id) > world.planned // 3, 60, "a third done")
        # Mid-run: another -1 burst, payments landing, and a recheck after a payment.
        sim.inject("minus1", count=40)
        for account in world.paying:
            world.pay_now(account, 60)
        # As the game's payment handler would: its own Celery app, send_task by name.
        target = world.paying[0]
        sender = make_app(world.settings)
        sent = time.monotonic()
        sender.send_task(
            "midas_recon.recheck",
            kwargs={"openid": target[0], "zone_id": target[1], "bill_no": "P-1"},
        )
        sender.close()
        recheck_run = wait_for(
            lambda: _finished_recheck(world.url, target), 30, "the recheck to be served"
        )
        recheck_latency = time.monotonic() - sent
        out, err = runner.communicate(timeout=120)
        run_seconds = time.monotonic() - began
        assert runner.returncode == 0, err[-2000:]
        assert "complete" in out
        # Not a TTY: a progress line every 10 s, and the last one at done == planned.
        assert re.search(rf"run #\d+: {world.planned}/{world.planned} \(100%\)  \d+/s  ETA", err)
        wait_for(lambda: no_suspected(world.url), 40, "the confirm pass")

    run = nightly_run(world.url)
    assert run is not None
    assert_exact_outcome(world, run)
    # (test_rechecks shows a recheck overtaking a deep nightly backlog.)
    assert recheck_run.status == "complete"
    # The delay before a recheck's fetch is 5 s (rechecks.RECHECK_DELAY_S); then a free
    # process takes it ahead of the nightly batches.
    assert recheck_latency < 10, recheck_latency

    stats = sim.stats()
    # Arrivals as the simulator saw them. Were this to fail while the same arrivals fit in
    # 1 + jitter_s seconds, the limiter's schedule held and the delay between a grant and its
    # arrival varied by more than the limiter's jitter budget (a starved machine).
    arrivals = sim.arrivals("/wxa/")
    assert stats["max_per_second"] <= RATE, (
        stats["max_per_second"],
        max_per_window(arrivals, 1.02),
    )
    assert 45011 not in stats["by_errcode"]
    assert stats["by_errcode"].get(-1, 0) >= 80  # both bursts hit, and were retried
    fetches = stats["by_path"][GETBALANCE]
    assert run.started_at is not None and run.finished_at is not None
    took = (run.finished_at - run.started_at).total_seconds()
    print(
        f"\nnightly: {world.planned} accounts in {took:.1f} s ({world.planned / took:.0f}/s; "
        f"`run --wait` {run_seconds:.1f} s), {fetches} getbalance, "
        f"max/s {stats['max_per_second']}, recheck {recheck_latency:.1f} s"
    )

    # Logs carry ids, never a secret: AppKey, app secret, the encryption key, session keys.
    procs.stop_all()
    text = procs.log("w1")
    assert '"event": "batch_stored"' in text and '"run_id"' in text and '"task_id"' in text
    secrets = [world.env[k] for k in ("MIDAS_APP_KEY", "MIDAS_APP_SECRET")]
    secrets.append(world.env["SESSION_KEY_ENCRYPTION_KEY"])
    secrets += [p["session_key"] for p in sim.players() if p["session_key"]]
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"{len(leaked)} secrets in the worker log"

    listing = cli(world, "runs", "--format", "json", "--kind", "all", "--limit", "100")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    nightly = [r for r in rows if r["kind"] == "nightly"]
    assert len(nightly) == 1
    row = nightly[0]
    for key in (
        "id", "business_date", "trigger", "status", "planned", "ok", "unobservable", "error",
        "mismatches_opened", "started_at", "finished_at",
    ):  # fmt: skip
        assert key in row
    assert row["status"] == "complete" and row["trigger"] == "cli"
    assert row["planned"] == world.planned and row["error"] == 0
    assert dt.datetime.fromisoformat(row["finished_at"]) >= dt.datetime.fromisoformat(
        row["started_at"]
    )
    assert {r["kind"] for r in rows} >= {"nightly", "recheck", "confirm"}
    assert all(r["status"] == "complete" for r in rows)
    # Joining the finished run of today starts nothing and says it is complete.
    again = cli(world, "run", "--wait")
    assert again.returncode == 0 and f"run #{run.id}" in again.stdout


def _finished_recheck(url: str, account: tuple[str, str]) -> Run | None:
    with session_scope(url) as session:
        return session.scalars(
            select(Run)
            .join(BalanceSnapshot, BalanceSnapshot.run_id == Run.id)
            .where(
                Run.kind == "recheck",
                Run.status != "running",
                BalanceSnapshot.openid == account[0],
                BalanceSnapshot.zone_id == account[1],
            )
        ).first()


def test_killed_workers_lose_nothing_and_fetch_nothing_twice(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    world = plant(sim, world_env(db_url, redis_url, sim.base_url), 1000, paying=0)
    procs.configure(world.env)
    procs.worker("w1")
    procs.beat()
    with Settler(world):
        started = cli(world, "run")
        assert started.returncode == 0, started.stderr
        run = wait_for(lambda: nightly_run(world.url), 10, "the nightly run")
        wait_for(lambda: done_items(world.url, run.id) > world.planned // 4, 60, "a quarter")
        # One pool process dies mid-batch: its parent requeues the message, and the batch
        # starts again from its claim (nothing of it was stored).
        os.kill(_pool_child(procs.procs["w1"].pid), signal.SIGKILL)
        wait_for(lambda: done_items(world.url, run.id) > world.planned // 2, 60, "a half")
        # Then the whole worker, parent and pool, dies at once (OOM killer, lost node): its
        # messages stay unacknowledged, the claims' keys expire, the sweep takes them back.
        # (The limiter's in-flight slots of the dead processes stay taken for their lease,
        # 15 s here: much of the time this test takes.)
        procs.kill("w1")
        killed = time.monotonic()
        at_kill = done_items(world.url, run.id)
        procs.worker("w2")
        run = wait_for(
            lambda: (r := nightly_run(world.url)) and r.status != "running" and r,
            150,
            "the run to finish",
            world=world,
        )
        recovered = time.monotonic() - killed
        wait_for(lambda: no_suspected(world.url), 40, "the confirm pass", world=world)
    assert at_kill < world.planned
    print(f"\nworker killed at {at_kill}/{world.planned}; run finished {recovered:.0f} s later")
    run = nightly_run(world.url)
    assert run is not None
    assert_exact_outcome(world, run)
    # Fetched again at most: the accounts of the batches that were killed (never a stored
    # one: their snapshots would collide), and the retries of the -1 answers.
    fetches = sim.stats()["by_path"][GETBALANCE]
    observable = world.planned - len(world.no_session)
    confirm = len(world.mismatched) + len(world.in_flight)
    assert observable + confirm <= fetches <= observable + confirm + 4 * 200


def _pool_child(parent: int) -> int:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out, "the worker has no pool process"
    return int(out[0])


def test_a_run_stopped_by_midas_fails_with_its_reason_and_resumes(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    world = plant(
        sim, world_env(db_url, redis_url, sim.base_url), 300, mismatched=0, in_flight=0, paying=0
    )
    procs.configure(world.env)
    procs.worker("w1")
    sim.inject("quota_day", count=1)  # 45009: the day's quota is used up
    failed = cli(world, "run", "--wait")
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "45009" in failed.stderr
    run = nightly_run(world.url)
    assert run is not None and run.status == "failed" and "45009" in (run.failure_reason or "")
    assert "sim-sandbox-appkey" not in (run.failure_reason or "")

    resumed = cli(world, "run", "--wait")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    run = nightly_run(world.url)
    assert run is not None
    assert run.status == "complete" and run.failure_reason is None
    assert run.planned == world.planned and run.ok + run.unobservable == world.planned
    with session_scope(world.url) as session:
        snaps = session.scalar(
            select(func.count())
            .select_from(BalanceSnapshot)
            .where(BalanceSnapshot.run_id == run.id)
        )
    assert snaps == world.planned
