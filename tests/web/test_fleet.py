"""The console in production shape: Postgres, Redis and a real Celery worker process. The
recheck button sends the batch to the workers' recheck queue; the page shows the answer when
the worker has stored it, and /health names the worker that answered its ping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from sqlalchemy import select

from tests.orchestration.conftest import Procs
from tests.web.conftest import LiveConsole, Seeded, start_console
from tests.web.test_browser import log_in, wait
from worker.db.models import Run
from worker.db.session import session_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def fleet(seeded: Seeded, redis_url: str, tmp_path: Path) -> Iterator[LiveConsole]:
    env = {**seeded.env, "REDIS_URL": redis_url}
    procs = Procs(env, tmp_path)
    try:
        procs.worker("w1", concurrency=1)
        yield from start_console(env, tmp_path)
    finally:
        procs.stop_all()
    log = procs.log("w1")
    assert "Traceback" not in log, log[-3000:]


def test_recheck_through_a_celery_worker(
    browser: Any, fleet: LiveConsole, seeded: Seeded, tmp_path: Path
) -> None:
    assert "REDIS_URL" in fleet.env
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser
    log_in(driver, fleet, shots)
    driver.get(f"{fleet.base}/health")
    wait(driver, 30).until(lambda d: "w1@" in d.find_element(By.ID, "h-workers").text)
    assert "ok" in driver.find_element(By.ID, "h-redis").text
    driver.save_screenshot(str(shots / "health-fleet.png"))

    openid, zone = seeded.world.ordinary()[0]
    driver.get(f"{fleet.base}/accounts/{openid}?zone_id={zone}")
    before = len(driver.find_elements(By.CSS_SELECTOR, "#timeline tr.fetch"))
    driver.find_element(By.ID, "recheck").click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "recheck-result"))
    wait(driver, 60).until(
        lambda d: d.find_element(By.ID, "recheck-result").get_attribute("data-status") == "complete"
    )
    answer = driver.find_element(By.ID, "recheck-result").text
    assert "ok" in answer and "mismatches opened 0" in answer, answer
    assert len(driver.find_elements(By.CSS_SELECTOR, "#timeline tr.fetch")) == before + 1
    driver.save_screenshot(str(shots / "recheck-fleet.png"))
    with session_scope(seeded.url) as session:
        run = session.scalars(select(Run).where(Run.kind == "recheck")).one()
        assert (run.trigger, run.status, run.ok) == ("console", "complete", 1)
