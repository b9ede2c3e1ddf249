"""The console under test: a planted world reconciled for real (simulator, embedded runs on the
test Postgres), an operator, the console as a real `midas-recon web` process or as a Flask test
client, and a headless Debian Chromium driven through its chromedriver.

Nothing is downloaded: a missing chromium or chromedriver fails the test with a line saying
what to install, it is never skipped.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.orchestration.conftest import World, plant, world_env
from worker.config import load_settings
from worker.db.session import session_scope
from worker.simulator import SimConfig, Simulator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MIDAS_RECON = str(Path(sys.executable).with_name("midas-recon"))
OPERATOR, PASSWORD = "alice", "correct horse battery staple"
SESSION_SECRET = "test-console-session-secret-0123456789"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(SimConfig(rate_limit=400, latency_ms=2.0))
    simulator.start()
    yield simulator
    simulator.stop()


def console_env(db_url: str, sim: Simulator, **extra: str) -> dict[str, str]:
    """Embedded mode (no REDIS_URL) on the given database: the console fetches rechecks."""
    return world_env(
        db_url,
        None,
        sim.base_url,
        MIDAS_RATE_LIMIT="400",
        RECON_SETTLE_SECONDS="1",
        RECON_WEB_SESSION_SECRET=SESSION_SECRET,
        **extra,
    )


def add_operator(url: str, name: str = OPERATOR, password: str = PASSWORD) -> None:
    from worker.web.operators import add_operator as add

    with session_scope(url) as session:
        add(session, name, password, now=dt.datetime.now(dt.UTC))


def reconcile_nights(world: World, days: int = 2) -> list[int]:
    """Nightly runs of the last `days` business dates through the production code, each with
    its confirm pass, so cases exist in several statuses and accounts have a history."""
    from worker.recon.runs import run_embedded

    settings = world.settings
    today = settings.calendar.today()
    ids = []
    for back in range(days, 0, -1):
        run = run_embedded(settings, today - dt.timedelta(days=back), confirm_wait_s=3)
        ids.append(run.id)
    return ids


@dataclass
class Seeded:
    world: World
    env: dict[str, str]
    run_ids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.env["DATABASE_URL"]


@pytest.fixture
def seeded(db_url: str, sim: Simulator) -> Seeded:
    """60 players, some mismatched, some unobservable, two nights reconciled, one operator."""
    env = console_env(db_url, sim)
    world = plant(
        sim, env, 60, mismatched=6, in_flight=3, expired=3, no_session=2, inactive=2, paying=0
    )
    ids = reconcile_nights(world)
    add_operator(db_url)
    return Seeded(world, env, ids)


# -- the console as a real process --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveConsole:
    base: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def login(self, name: str = OPERATOR, password: str = PASSWORD) -> requests.Session:
        http = requests.Session()
        page = http.get(f"{self.base}/login", timeout=10)
        token = CSRF.search(page.text)
        assert token, "the login form carries a CSRF token"
        answer = http.post(
            f"{self.base}/login",
            data={"csrf_token": token.group(1), "name": name, "password": password},
            timeout=10,
        )
        assert answer.ok and "operator-name" in answer.text, "logged in"
        return http


def start_console(env: dict[str, str], tmp_path: Path) -> Iterator[LiveConsole]:
    port = free_port()
    log = tmp_path / "web.log"
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [MIDAS_RECON, "web", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(f"{base}/login", timeout=1)
            break
        except requests.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"midas-recon web did not start: {log.read_text()}", pytrace=False)
            time.sleep(0.1)
    try:
        yield LiveConsole(base, full_env, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text


@pytest.fixture
def live(seeded: Seeded, tmp_path: Path) -> Iterator[LiveConsole]:
    yield from start_console(seeded.env, tmp_path)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.run(
        [MIDAS_RECON, *args], env=full, capture_output=True, text=True, timeout=60, check=False
    )


# -- a headless Chromium ------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: apt-get install -y {package}", pytrace=False)
    os.environ["SE_OFFLINE"] = "true"  # selenium must never fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


# -- the console in this process (security tests) -----------------------------------------------


@pytest.fixture
def app_env(db_url: str, sim: Simulator) -> dict[str, str]:
    env = console_env(db_url, sim)
    add_operator(db_url)
    return env


def make_client(env: dict[str, str], **app_kwargs: Any) -> Any:
    from worker.web.app import create_app

    app = create_app(load_settings(env), **app_kwargs)
    app.config["TESTING"] = True
    return app.test_client()


def csrf_of(client: Any, path: str = "/login") -> str:
    page = client.get(path)
    match = CSRF.search(page.get_data(as_text=True))
    assert match, f"{path} carries a CSRF token"
    return match.group(1)


def log_in(client: Any, name: str = OPERATOR, password: str = PASSWORD) -> Any:
    token = csrf_of(client)
    return client.post("/login", data={"csrf_token": token, "name": name, "password": password})
