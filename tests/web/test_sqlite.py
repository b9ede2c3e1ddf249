"""The console on the embedded default: a SQLite file, no Redis, in a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from sqlalchemy import func, select

from tests.orchestration.conftest import plant
from tests.web.conftest import (
    LiveConsole,
    add_operator,
    console_env,
    reconcile_nights,
    start_console,
)
from tests.web.test_browser import log_in, rows, wait
from worker.db.models import MismatchCase
from worker.db.session import session_scope
from worker.simulator import Simulator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def embedded(sqlite_url: str, sim: Simulator, tmp_path: Path) -> Iterator[LiveConsole]:
    env = console_env(sqlite_url, sim)
    world = plant(
        sim, env, 40, mismatched=4, in_flight=2, expired=2, no_session=1, inactive=1, paying=0
    )
    reconcile_nights(world)
    add_operator(sqlite_url)
    yield from start_console(env, tmp_path)


def test_login_cases_and_account_on_sqlite(
    browser: Any, embedded: LiveConsole, sqlite_url: str, tmp_path: Path
) -> None:
    assert "REDIS_URL" not in embedded.env and embedded.env["DATABASE_URL"] == sqlite_url
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser
    log_in(driver, embedded, shots)
    with session_scope(sqlite_url) as session:
        open_cases = session.scalar(
            select(func.count())
            .select_from(MismatchCase)
            .where(MismatchCase.status.in_(("suspected", "confirmed", "acknowledged")))
        )
    assert open_cases and len(rows(driver)) == open_cases
    driver.get(f"{embedded.base}/cases?status=all&sort=age&per_page=3")
    assert len(rows(driver)) == 3
    assert driver.find_elements(By.ID, "next-page")
    driver.save_screenshot(str(shots / "cases-sqlite.png"))

    driver.find_element(By.CSS_SELECTOR, "#cases tr.case td.openid a").click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "account-openid"))
    charts = driver.find_elements(By.CSS_SELECTOR, "#charts figure.chart polyline.midas")
    assert len(charts) == 4
    assert all(len((c.get_attribute("points") or "").split()) >= 2 for c in charts)
    assert driver.find_elements(By.CSS_SELECTOR, "#timeline tr.fetch")
    driver.save_screenshot(str(shots / "account-sqlite.png"))
