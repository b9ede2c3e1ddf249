"""The embedded mode: no Redis, SQLite, the same service code in one process (PRODUCT.md §10)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.orchestration.conftest import Settler, case_sets, plant, world_env
from worker.db.models import BalanceSnapshot, Run
from worker.db.session import session_scope
from worker.recon.runs import RunProgress, run_embedded
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def test_embedded_run_end_to_end(sqlite_url: str, sim: Simulator) -> None:
    world = plant(sim, world_env(sqlite_url, None, sim.base_url), 400)
    sim.inject("minus1", count=20)
    seen: list[RunProgress] = []
    with Settler(world):
        run = run_embedded(world.settings, trigger="test", progress=seen.append)

    assert run.kind == "nightly" and run.status == "complete"
    assert run.planned == world.planned
    assert run.unobservable == len(world.unobservable)
    assert run.ok == world.planned - len(world.unobservable)
    assert run.error == 0
    assert run.mismatches_opened == len(world.expected_confirmed() | world.expected_cleared())
    assert seen and seen[-1].done == seen[-1].planned == world.planned

    cases = case_sets(world.url)
    assert cases.get("confirmed", set()) == world.expected_confirmed()
    assert cases.get("cleared", set()) == world.expected_cleared()
    assert not cases.get("suspected")

    with session_scope(world.url) as session:
        per_account = session.execute(
            select(func.count())
            .select_from(BalanceSnapshot)
            .where(BalanceSnapshot.run_id == run.id)
        ).scalar_one()
        confirm_runs = session.scalars(select(Run).where(Run.kind == "confirm")).all()
    assert per_account == world.planned
    assert [r.status for r in confirm_runs] == ["complete"]
    assert confirm_runs[0].planned == len(world.mismatched) + len(world.in_flight)
    assert sim.stats()["by_errcode"].get(-1, 0) >= 20


def test_a_second_embedded_run_of_the_date_fetches_nothing(sqlite_url: str, sim: Simulator) -> None:
    world = plant(sim, world_env(sqlite_url, None, sim.base_url), 60, in_flight=0, mismatched=0)
    first = run_embedded(world.settings, trigger="test", confirm_wait_s=0)
    requests = sim.stats()["requests"]
    again = run_embedded(world.settings, trigger="test", confirm_wait_s=0)
    assert again.id == first.id and again.status == "complete"
    assert sim.stats()["requests"] == requests
