"""A real headless Chromium against a real `midas-recon web` process on a seeded Postgres: an
operator's morning, end to end. Screenshots of each page go to the test's temporary folder."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import select

from tests.web.conftest import OPERATOR, PASSWORD, LiveConsole, Seeded, cli
from worker.config import load_settings
from worker.db.models import MismatchCase, Run
from worker.db.session import session_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def log_in(driver: Any, live: LiveConsole, shots: Path) -> None:
    driver.get(f"{live.base}/cases")
    assert "/login" in driver.current_url, "an anonymous visitor is sent to the login page"
    driver.find_element(By.ID, "name").send_keys(OPERATOR)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.save_screenshot(str(shots / "login.png"))
    driver.find_element(By.ID, "login").click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "operator-name"))
    assert driver.find_element(By.ID, "operator-name").text == OPERATOR
    assert driver.current_url.endswith("/cases")


def wait(driver: Any, timeout: float = 20) -> WebDriverWait:  # type: ignore[type-arg]
    # A click that submits a form replaces the page, and a run's page reloads itself when the
    # run ends. An element read meanwhile fails: a stale element, or chromedriver's "Node with
    # given id does not belong to the document" (a plain WebDriverException). Both only mean
    # "not there yet"; a real failure still ends in the timeout, with its stack trace.
    return WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)
    )


def read(driver: Any, element_id: str, attribute: str | None = None) -> str | None:
    """One element's text or attribute, read inside the page in one step (no element handle to
    go stale between finding and reading)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const e = document.getElementById(arguments[0]);"
        "if (!e) return null;"
        "return arguments[1] === null ? e.textContent : e.getAttribute(arguments[1]);",
        element_id,
        attribute,
    )


def rows(driver: Any) -> list[list[str]]:
    out = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#cases tr.case"):
        out.append([td.text for td in tr.find_elements(By.TAG_NAME, "td")])
    return out


def test_an_operators_morning(
    browser: Any, live: LiveConsole, seeded: Seeded, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser
    log_in(driver, live, shots)

    # -- the open cases, then filtered ---------------------------------------------------------
    with session_scope(seeded.url) as session:
        open_cases = session.scalars(
            select(MismatchCase).where(
                MismatchCase.status.in_(("suspected", "confirmed", "acknowledged"))
            )
        ).all()
        expected_balance = sorted(c.id for c in open_cases if c.check == "balance")
    assert expected_balance, "the planted mismatches opened balance cases"
    assert len(rows(driver)) == len(open_cases)
    Select(driver.find_element(By.ID, "f-check")).select_by_value("balance")
    driver.find_element(By.ID, "apply-filters").click()
    wait(driver).until(lambda d: "check=balance" in d.current_url)
    shown = rows(driver)
    assert sorted(int(r[1]) for r in shown) == expected_balance
    assert {r[4] for r in shown} == {"balance"}
    deltas = [abs(int(r[8].replace(",", ""))) for r in shown]
    assert deltas == sorted(deltas, reverse=True), "largest |delta| first"
    driver.save_screenshot(str(shots / "cases.png"))

    # -- one account and its chart ---------------------------------------------------------------
    first = driver.find_element(By.CSS_SELECTOR, "#cases tr.case td.openid a")
    openid = first.text
    first.click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "account-openid"))
    assert driver.find_element(By.ID, "account-openid").text == openid
    charts = driver.find_elements(By.CSS_SELECTOR, "#charts figure.chart")
    assert [c.get_attribute("data-check") for c in charts] == [
        "save_sum",
        "cost_sum",
        "present_sum",
        "balance",
    ]
    for chart in charts:
        for line in ("polyline.midas", "polyline.ledger"):
            points = chart.find_element(By.CSS_SELECTOR, line).get_attribute("points") or ""
            assert len(points.split()) >= 2, "one point per night at least"
        assert chart.find_element(By.TAG_NAME, "svg").size["height"] > 50, "drawn, visibly"
    assert driver.find_elements(By.CSS_SELECTOR, "section.account-case"), "its cases are listed"
    driver.save_screenshot(str(shots / "account.png"))

    # -- acknowledge a case with a note ----------------------------------------------------------
    case_link = driver.find_element(By.CSS_SELECTOR, "section.account-case h3 a")
    case_id = int(case_link.text.split()[-1])
    case_link.click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "case-status"))
    assert driver.find_element(By.ID, "case-status").text == "confirmed"
    note = "ticket <b>OPS-7</b>: finance checks the top-up"
    driver.find_element(By.ID, "ack-note").send_keys(note)
    driver.find_element(By.ID, "ack").click()
    wait(driver).until(lambda d: d.find_element(By.ID, "case-status").text == "acknowledged")
    last = driver.find_elements(By.CSS_SELECTOR, "table.events tr.event")[-1]
    assert last.find_element(By.CSS_SELECTOR, ".actor").text == f"operator:{OPERATOR}"
    assert last.find_element(By.CSS_SELECTOR, ".note").text == note, "the note, as text"
    assert not driver.find_elements(By.CSS_SELECTOR, "td.note b"), "no markup from a note"
    driver.save_screenshot(str(shots / "case.png"))

    shown_cli = cli(seeded.env, "mismatches", "show", str(case_id), "--format", "json")
    assert shown_cli.returncode == 0, shown_cli.stderr
    event = json.loads(shown_cli.stdout)["events"][-1]
    assert (event["actor"], event["to_status"], event["note"]) == (
        f"operator:{OPERATOR}",
        "acknowledged",
        note,
    )
    listed = cli(seeded.env, "mismatches", "--status", "acknowledged", "--format", "json")
    assert [c["id"] for c in json.loads(listed.stdout)] == [case_id]

    # -- recheck the account now and see the answer arrive ------------------------------------
    driver.find_element(By.ID, "case-account").click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "recheck"))
    fetches_before = len(driver.find_elements(By.CSS_SELECTOR, "#timeline tr.fetch"))
    driver.find_element(By.ID, "recheck").click()
    wait(driver).until(lambda d: d.find_elements(By.ID, "recheck-result"))
    wait(driver, 30).until(lambda d: read(d, "recheck-result", "data-status") == "complete")
    answer = driver.find_element(By.ID, "recheck-result").text
    assert "complete" in answer and "ok" in answer and "balance" in answer, answer
    assert len(driver.find_elements(By.CSS_SELECTOR, "#timeline tr.fetch")) == fetches_before + 1
    driver.save_screenshot(str(shots / "recheck.png"))
    run_id = int(driver.find_element(By.ID, "recheck-result").get_attribute("data-run-id") or 0)
    with session_scope(seeded.url) as session:
        run = session.get(Run, run_id)
        assert run is not None and (run.kind, run.status, run.ok) == ("recheck", "complete", 1)

    # -- runs, statement, health -------------------------------------------------------------------
    driver.get(f"{live.base}/runs")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#runs tr.run")) == 2
    driver.save_screenshot(str(shots / "runs.png"))
    driver.get(f"{live.base}/statements")
    wait(driver).until(lambda d: d.find_elements(By.ID, "statement"))
    day = driver.current_url.rsplit("/", 1)[-1]
    report = cli(seeded.env, "report", "daily", "--date", day, "--format", "json")
    assert report.returncode == 0, report.stderr
    total = json.loads(report.stdout)["total"]
    cells = driver.find_elements(By.CSS_SELECTOR, "tr[data-figure='balance'] td.num")
    assert cells[-1].text == f"{total['balance']:,}", "the same numbers as report daily"
    driver.save_screenshot(str(shots / "statement.png"))
    driver.get(f"{live.base}/health")
    assert "ok" in driver.find_element(By.ID, "h-database").text
    assert driver.find_element(By.ID, "h-last").text.startswith("#")
    driver.save_screenshot(str(shots / "health.png"))

    for name in ("login", "cases", "account", "case", "recheck", "runs", "statement", "health"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def test_a_runs_progress_advances(
    browser: Any, live: LiveConsole, seeded: Seeded, tmp_path: Path
) -> None:
    from worker.recon.runs import run_embedded

    shots = tmp_path / "screenshots"
    shots.mkdir()
    driver = browser
    log_in(driver, live, shots)
    # A slow night: 6 requests a second, so the page sees it move for about ten seconds.
    settings = load_settings({**seeded.env, "MIDAS_RATE_LIMIT": "6"})
    night = threading.Thread(
        target=run_embedded,
        args=(settings, settings.calendar.today()),
        kwargs={"confirm_wait_s": 0},
        daemon=True,
    )
    night.start()

    def running_id() -> int | None:
        with session_scope(seeded.url) as session:
            return session.scalars(
                select(Run.id).where(Run.kind == "nightly", Run.status == "running")
            ).first()

    wait(driver, 20).until(lambda _d: running_id())
    driver.get(f"{live.base}/runs/{running_id()}")
    first = int(driver.find_element(By.ID, "done").text)
    planned = int(driver.find_element(By.ID, "planned").text)
    assert planned == seeded.world.planned
    # The page updates in place (no reload) while the run moves.
    wait(driver, 20).until(lambda d: int(d.find_element(By.ID, "done").text) > first)
    assert driver.find_element(By.ID, "run-status").text == "running"
    assert driver.find_element(By.ID, "rate").text != "-"
    assert driver.find_element(By.ID, "eta").text != "-"
    driver.save_screenshot(str(shots / "run-progress.png"))
    wait(driver, 60).until(lambda d: read(d, "run-status") == "complete")
    assert int(driver.find_element(By.ID, "done").text) == planned
    driver.save_screenshot(str(shots / "run-complete.png"))
    night.join(timeout=30)
