"""The embedded mode: no Redis, SQLite, the same service code in one process (PRODUCT.md §10)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from tests.orchestration.conftest import Settler, case_sets, plant, world_env
from tests.orchestration.test_nightly import GETBALANCE
from worker.config import load_settings
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


def test_a_wrong_encryption_key_makes_errors_not_a_clean_run(
    sqlite_url: str, sim: Simulator
) -> None:
    """Keys stored under one key, another configured: every account was fetched without its
    session key and the run ended `complete` with all of them "unobservable"."""
    world = plant(
        sim, world_env(sqlite_url, None, sim.base_url), 30, mismatched=0, in_flight=0,
        expired=0, inactive=0, paying=0, no_session=0,
    )  # fmt: skip
    wrong = {**world.env, "SESSION_KEY_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    run = run_embedded(load_settings(wrong), trigger="test", confirm_wait_s=0)
    assert run.status == "incomplete" and run.error == run.planned == 30
    assert run.unobservable == 0 and run.ok == 0
    with session_scope(world.url) as session:
        errmsgs = set(session.scalars(select(BalanceSnapshot.errmsg)))
    assert errmsgs == {
        "a session key cannot be decrypted with any key in SESSION_KEY_ENCRYPTION_KEY"
    }
    assert sim.stats()["by_path"].get(GETBALANCE, 0) == 0  # no quota spent on certain failures
