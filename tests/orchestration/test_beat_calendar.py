"""The real `celery beat` fires the nightly at RECON_NIGHTLY_AT in RECON_TIMEZONE, and the run
it starts is the one of the business date the fire time falls on there.

Pacific/Kiritimati is UTC+14: its date is ahead of UTC's for most of the day, so a run made
for the UTC date, or at the UTC hour, is told apart from the right one.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from tests.orchestration.conftest import Procs, nightly_run, plant, wait_for, world_env
from worker.simulator import Simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ZONE = "Pacific/Kiritimati"


def test_beat_starts_the_nightly_of_the_local_date_at_the_local_minute(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    tz = ZoneInfo(ZONE)
    now = dt.datetime.now(tz)
    # The next local minute, with room for beat to start before it.
    fire = (now + dt.timedelta(minutes=2 if now.second > 40 else 1)).replace(
        second=0, microsecond=0
    )
    env = world_env(
        db_url,
        redis_url,
        sim.base_url,
        RECON_TIMEZONE=ZONE,
        RECON_NIGHTLY_AT=fire.strftime("%H:%M"),
    )
    world = plant(sim, env, 40, mismatched=0, in_flight=0, expired=0, no_session=0, paying=0)
    procs.configure(world.env)
    procs.worker("w1")
    procs.beat()
    assert nightly_run(world.url) is None
    wait = (fire - dt.datetime.now(tz)).total_seconds() + 45
    run = wait_for(lambda: nightly_run(world.url), wait, "beat to start the nightly run")
    started = run.created_at.astimezone(tz)
    assert fire <= started < fire + dt.timedelta(seconds=30), started
    assert run.trigger == "beat"
    assert run.business_date == fire.date()  # the local date, not UTC's
