"""`midas-recon report daily` in each format, on the hand-made history of conftest.py."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.reports.conftest import EXPECTED
from worker.cli.base import cli
from worker.db.models import Run
from worker.db.session import session_scope
from worker.reports.render import SECTIONS
from worker.reports.statement import FIGURE_FIELDS

pytestmark = pytest.mark.integration

LABELS = {name: label for _, items in SECTIONS for name, label in items}


def report(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> Result:
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("RECON_TIMEZONE", "Asia/Shanghai")
    monkeypatch.delenv("REDIS_URL", raising=False)
    return CliRunner().invoke(cli, ["report", "daily", "--date", "2026-11-20", *args])


def number(cell: str) -> int | None:
    return None if cell in ("", "n/a") else int(cell.replace(",", ""))


def test_table(monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]]) -> None:
    url, ids = seeded
    result = report(monkeypatch, url)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"From nightly run #{ids['r2']} of 2026-11-20 (complete" in lines[1]
    assert f"Opening side: nightly run #{ids['r1']} of 2026-11-19" in lines[2]
    header = next(line for line in lines if line.strip().startswith("zone 1"))
    assert header.split() == ["zone", "1", "zone", "2", "total"]
    rows: dict[str, list[int | None]] = {}
    for line in lines:
        for name, label in LABELS.items():
            if line.startswith("  " + label + " "):
                rows[name] = [number(c) for c in line[len(label) + 2 :].split()]
    assert set(rows) == set(FIGURE_FIELDS)
    for name in FIGURE_FIELDS:
        assert rows[name] == [EXPECTED["1"][name], EXPECTED["2"][name], EXPECTED[None][name]]
    # Columns line up: every figure row has the same length as the header.
    assert {len(line) for line in lines if line.startswith("  ")} == {len(header)}


def test_csv(monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]]) -> None:
    url, ids = seeded
    result = report(monkeypatch, url, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    raw = result.stdout_bytes.decode("utf-8")  # UTF-8, RFC 4180 line ends
    assert raw.count("\r\n") == 4 and raw.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(raw, newline="")))
    assert [(r["scope"], r["zone_id"]) for r in rows] == [
        ("zone", "1"),
        ("zone", "2"),
        ("total", ""),
    ]
    for row, key in zip(rows, ["1", "2", None], strict=True):
        assert row["business_date"] == "2026-11-20" and row["timezone"] == "Asia/Shanghai"
        assert row["run_id"] == str(ids["r2"]) and row["previous_run_id"] == str(ids["r1"])
        assert {f: number(row[f]) for f in FIGURE_FIELDS} == EXPECTED[key]


def test_json(monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]]) -> None:
    url, ids = seeded
    result = report(monkeypatch, url, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["report"] == "daily_coin_statement" and doc["version"] == 1
    assert doc["business_date"] == "2026-11-20" and doc["timezone"] == "Asia/Shanghai"
    assert doc["day_start"] == "2026-11-20T00:00:00+08:00"
    assert doc["run"]["id"] == ids["r2"] and doc["run"]["status"] == "complete"
    assert doc["previous_run"]["id"] == ids["r1"]
    assert [z["zone_id"] for z in doc["zones"]] == ["1", "2"]
    for line, key in [*zip(doc["zones"], ["1", "2"], strict=True), (doc["total"], None)]:
        assert {f: line[f] for f in FIGURE_FIELDS} == EXPECTED[key]
    assert doc["total"]["zone_id"] is None


class _Page(HTMLParser):
    """Collects the statement table, the images and anything that would load from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag in ("link", "script", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_html(
    monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    url, ids = seeded
    out = tmp_path / "statement.html"
    result = report(monkeypatch, url, "--format", "html", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert page.external == []  # one self-contained file
    assert len(page.images) == 2
    for img in page.images:
        assert img["src"].startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert svg.startswith(b"<svg") and svg.count(b"<text") > 5  # a title, axes, dates
        assert img["alt"]
    labels = {label: name for name, label in LABELS.items()}
    table: dict[str, list[int | None]] = {
        labels[r[0]]: [number(c) for c in r[1:]] for r in page.rows if r and r[0] in labels
    }
    assert set(table) == set(FIGURE_FIELDS)
    for name in FIGURE_FIELDS:
        assert table[name] == [EXPECTED["1"][name], EXPECTED["2"][name], EXPECTED[None][name]]
    text = out.read_text(encoding="utf-8")
    assert f"nightly run #{ids['r2']} of 2026-11-20" in text


def test_zone_option(monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    result = report(monkeypatch, url, "--zone-id", "2", "--format", "json")
    doc = json.loads(result.stdout)
    assert [z["zone_id"] for z in doc["zones"]] == ["2"] and doc["zone_filter"] == "2"
    assert doc["total"]["balance"] == EXPECTED["2"]["balance"]
    table = report(monkeypatch, url, "--zone-id", "2").stdout
    assert "Zone 2 only" in table and "total" not in table.splitlines()[5]


@pytest.mark.parametrize("date", ["2026-11-22"])
@pytest.mark.parametrize("fmt", ["table", "csv", "json", "html"])
def test_no_finished_run_exits_1_and_prints_no_figures(
    monkeypatch: pytest.MonkeyPatch,
    seeded: tuple[str, dict[str, int]],
    tmp_path: Path,
    date: str,
    fmt: str,
) -> None:
    url, _ = seeded
    out = tmp_path / f"r.{fmt}"
    monkeypatch.setenv("DATABASE_URL", url)
    result = CliRunner().invoke(
        cli, ["report", "daily", "--date", date, "--format", fmt, "--output", str(out)]
    )
    assert result.exit_code == 1
    assert result.stdout == "" and not out.exists() and list(tmp_path.iterdir()) == []
    assert result.stderr.startswith("midas-recon: ") and len(result.stderr.splitlines()) == 1
    assert "no nightly run" in result.stderr


def test_an_incomplete_run_prints_its_statement_with_the_errors(
    monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]]
) -> None:
    url, ids = seeded
    table = report(monkeypatch, url, "--date", "2026-11-21").stdout
    assert f"nightly run #{ids['r4']} of 2026-11-21 (incomplete" in table
    assert "3 accounts got no answer (error)" in table
    rows = list(
        csv.DictReader(
            io.StringIO(report(monkeypatch, url, "--date", "2026-11-21", "--format", "csv").stdout)
        )
    )
    assert {r["run_status"] for r in rows} == {"incomplete"}


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "html"])
def test_a_day_not_over_is_marked_partial_in_every_format(
    monkeypatch: pytest.MonkeyPatch, seeded: tuple[str, dict[str, int]], fmt: str
) -> None:
    """The same run at 09:00 and at 23:00 gives different day figures: say which it is."""
    import worker.business_calendar as bc

    url, _ = seeded
    inside = dt.datetime(2026, 11, 20, 1, 0, tzinfo=dt.UTC)  # 09:00 on the 20th in Shanghai
    monkeypatch.setattr(bc, "utcnow", lambda: inside)
    text = report(monkeypatch, url, "--format", fmt).stdout
    if fmt == "csv":
        [first, *_] = csv.DictReader(io.StringIO(text))
        assert first["partial"] == "true" and first["generated_at"].startswith("2026-11-20T09:00")
    elif fmt == "json":
        body = json.loads(text)
        assert body["partial"] is True and body["generated_at"].startswith("2026-11-20T09:00")
    else:
        assert "PARTIAL: generated 2026-11-20 09:00:00+08:00" in text
    monkeypatch.setattr(bc, "utcnow", lambda: inside + dt.timedelta(days=1))
    later = report(monkeypatch, url, "--date", "2026-11-20", "--format", fmt).stdout
    assert "PARTIAL" not in later and '"partial": true' not in later and ",true," not in later


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--zone-id", "9"], "zone '9' is unknown"),
        (["--date", "2099-01-01"], "2099-01-01 has not begun"),
    ],
)
def test_an_unknown_zone_or_a_future_date_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    seeded: tuple[str, dict[str, int]],
    args: list[str],
    message: str,
) -> None:
    url, _ = seeded
    monkeypatch.setenv("DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["report", "daily", "--date", "2026-11-20", *args])
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_bad_date_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    result = CliRunner().invoke(cli, ["report", "daily", "--date", "20/11/2026"])
    assert result.exit_code == 2 and "is not a date (YYYY-MM-DD)" in result.stderr


@pytest.mark.parametrize("day", ["0001-01-01", "9999-12-31"])
def test_a_date_out_of_the_calendar_is_one_line(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, day: str
) -> None:
    """A run dated year 1 made the statement look for the day before: OverflowError."""
    with session_scope(sqlite_url) as session:
        session.add(
            Run(business_date=dt.date.fromisoformat(day), kind="nightly", trigger="cli",
                status="complete", api_version="v1")
        )  # fmt: skip
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    result = CliRunner().invoke(cli, ["report", "daily", "--date", day])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"midas-recon: --date must be between 2000-01-01 and 2999-12-31, got {day}"
    )


def test_unmigrated_database_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    result = CliRunner().invoke(cli, ["report", "daily", "--date", "2026-11-20"])
    assert result.exit_code == 2
    assert "midas-recon db upgrade" in result.stderr and "Traceback" not in result.stderr


def test_help_explains_the_command() -> None:
    result = CliRunner().invoke(cli, ["report", "daily", "--help"])
    assert result.exit_code == 0
    for word in ("--date", "--zone-id", "--format", "--output", "table|csv|json|html", "Exits 1"):
        assert word in result.stdout, word
