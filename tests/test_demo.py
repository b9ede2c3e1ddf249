"""`midas-recon demo` from a fresh virtual environment: nothing but the installed package.

The package is installed the way a newcomer would (`pip install .`, not editable) into a new
venv, and the demo runs there with no DATABASE_URL, no REDIS_URL and no services. Its summary
must show exactly what it planted: 2,500 players, of whom 3 % inactive (not planned), 2 % never
logged in and 4 % with an expired session (unobservable), 2 % mismatched (two checks each:
their counter and balance, confirmed) and 1 % with a payment in flight (two checks, cleared).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAYERS = 2500
INACTIVE, NEVER, EXPIRED, MISMATCHED, IN_FLIGHT = 75, 50, 100, 50, 25


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv with the project installed from its source tree (measured: ~40 s here)."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=120)
    started = time.monotonic()
    install = subprocess.run(
        [str(home / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    print(f"pip install took {time.monotonic() - started:.0f} s")
    yield home


def clean_env(tmp: Path) -> dict[str, str]:
    """No project settings at all, as on a newcomer's machine."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PIP_")}
    env["HOME"] = env["TMPDIR"] = str(tmp)
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"  # must be ignored: the demo is embedded
    env["DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # ditto
    return env


def demo(venv: Path, tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    out = subprocess.run(
        [str(venv / "bin" / "midas-recon"), "demo", *args],
        cwd=tmp,
        env=clean_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out, time.monotonic() - started


def test_installed_package_is_the_venvs(venv: Path, tmp_path: Path) -> None:
    code = "import worker, worker.migrations; print(worker.__file__)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(venv)), out.stdout


def test_demo_finds_exactly_what_it_planted(venv: Path, tmp_path: Path) -> None:
    out, took = demo(venv, tmp_path, "--output-dir", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    print(text)
    assert f"{PLAYERS} players in zones 1 and 2" in text
    assert (
        f"Planted: {MISMATCHED} mismatched, {IN_FLIGHT} payments in flight, {EXPIRED} expired "
        f"sessions, {NEVER} never logged in, {INACTIVE} inactive"
    ) in text
    planned = PLAYERS - INACTIVE
    unobservable = NEVER + EXPIRED
    # Two nights: yesterday's (a backfill), a day's payments, then today's.
    assert re.search(r"Nightly run #1 for the day before, then \d+ payments booked", text)
    assert re.search(r"nightly run #\d+ for \d{4}-\d\d-\d\d: complete in ", text)
    assert (
        f"planned {planned}, ok {planned - unobservable}, unobservable {unobservable}, error 0"
    ) in text
    assert (
        f"Mismatch cases: opened {2 * (MISMATCHED + IN_FLIGHT)}, confirmed {2 * MISMATCHED} "
        f"({MISMATCHED} accounts), cleared {2 * IN_FLIGHT} ({IN_FLIGHT} accounts), "
        "still suspected 0"
    ) in text
    assert re.search(r"residual [\d,]+ coins, the \d+ top-ups in flight", text)
    assert "Found exactly what was planted: yes" in text
    assert took < 60, f"the demo took {took:.0f} s"

    report = Path(re.search(r"^Report: (.+)$", text, re.M)[1])  # type: ignore[index]
    database = Path(re.search(r"^Database: (.+)$", text, re.M)[1])  # type: ignore[index]
    assert report.parent.parent == tmp_path / "demo" and database.exists()
    _assert_self_contained_html_with_charts(report.read_text(encoding="utf-8"))


def test_running_twice_works(venv: Path, tmp_path: Path) -> None:
    first, _ = demo(venv, tmp_path, "--players", "200", "--output-dir", "out")
    second, _ = demo(venv, tmp_path, "--players", "200", "--output-dir", "out")
    assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    reports = [re.search(r"^Report: (.+)$", o.stdout, re.M)[1] for o in (first, second)]  # type: ignore[index]
    assert reports[0] != reports[1] and all(Path(r).exists() for r in reports)
    assert len(list((tmp_path / "out").iterdir())) == 2
    assert "Found exactly what was planted: yes" in second.stdout


def test_without_output_dir_it_says_where_it_wrote(venv: Path, tmp_path: Path) -> None:
    out, _ = demo(venv, tmp_path, "--players", "100")
    assert out.returncode == 0, out.stdout + out.stderr
    report = Path(re.search(r"^Report: (.+)$", out.stdout, re.M)[1])  # type: ignore[index]
    assert report.exists() and report.suffix == ".html"


def _assert_self_contained_html_with_charts(html: str) -> None:
    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[str] = []
            self.external: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = {k: v or "" for k, v in attrs}
            if tag == "img":
                self.images.append(a["src"])
            for key in ("src", "href"):
                if key in a and not a[key].startswith("data:"):
                    self.external.append(a[key])

    page = Page()
    page.feed(html)
    assert page.external == [] and len(page.images) == 2
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"<svg")
