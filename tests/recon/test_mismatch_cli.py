"""`midas-recon mismatches`: formats, the JSON fields of PRODUCT.md §7, operator actions and
their exit codes (0 done; 2 for an unknown id, a closed case, a missing or empty note).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.recon.conftest import SETTLE, T0, Books
from worker.cli.base import cli
from worker.config import get_settings
from worker.db.models import BalanceSnapshot, MismatchCase, MismatchEvent
from worker.db.session import engine_for
from worker.recon.cases import reconcile_snapshots
from worker.recon.rules import DEFAULT_CHECKS

pytestmark = pytest.mark.integration

MIN = dt.timedelta(minutes=1)
FIELDS = [
    "id",
    "openid",
    "zone_id",
    "check",
    "status",
    "midas_value",
    "ledger_value",
    "delta",
    "first_seen_at",
    "last_seen_at",
]


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    return db_url


@pytest.fixture
def seeded(env: str) -> dict[str, int]:
    """Case ids: o1 balance +10 suspected, o2 save_sum -50 confirmed, o3 balance +1 cleared."""
    with Session(engine_for(env)) as session:
        books = Books(session)
        for openid in ("o1", "o2", "o3"):
            books.ledger(openid, "save", 600, T0 - MIN)
        due = T0 + dt.timedelta(seconds=SETTLE)

        def reconcile(*snapshots: BalanceSnapshot) -> None:
            ids = [s.id for s in snapshots]
            reconcile_snapshots(session, ids, checks=DEFAULT_CHECKS, settle_seconds=SETTLE, now=due)

        reconcile(
            books.snapshot("o1", T0, off={"balance": 10}),
            books.snapshot("o2", T0, off={"save_sum": -50}),
            books.snapshot("o3", T0, off={"balance": 1}),
        )
        reconcile(
            books.snapshot("o2", due, off={"save_sum": -50}),
            books.snapshot("o3", T0 + MIN),
        )
        session.commit()
        ids = {c.openid: c.id for c in session.scalars(select(MismatchCase))}
    return {"suspected": ids["o1"], "confirmed": ids["o2"], "cleared": ids["o3"]}


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result: Result) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def events(url: str, case_id: int) -> list[MismatchEvent]:
    with Session(engine_for(url)) as session:
        query = select(MismatchEvent).where(MismatchEvent.case_id == case_id)
        return list(session.scalars(query.order_by(MismatchEvent.id)))


def test_default_lists_the_open_cases_as_a_table(seeded: dict[str, int]) -> None:
    result = run("mismatches")
    assert result.exit_code == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == FIELDS
    assert [line.split()[:5] for line in lines] == [  # largest difference first
        [str(seeded["confirmed"]), "o2", "1", "save_sum", "confirmed"],
        [str(seeded["suspected"]), "o1", "1", "balance", "suspected"],
    ]


def test_json_has_the_documented_fields(seeded: dict[str, int]) -> None:
    result = run("mismatches", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [list(item) for item in doc] == [FIELDS, FIELDS]
    confirmed = doc[0]
    assert confirmed == {
        "id": seeded["confirmed"],
        "openid": "o2",
        "zone_id": "1",
        "check": "save_sum",
        "status": "confirmed",
        "midas_value": 550,
        "ledger_value": 600,
        "delta": -50,
        "first_seen_at": "2026-11-24T18:30:00+00:00",
        "last_seen_at": "2026-11-24T18:35:00+00:00",
    }
    assert dt.datetime.fromisoformat(confirmed["first_seen_at"]) == T0


def test_csv_has_a_header_and_filters_by_status(seeded: dict[str, int]) -> None:
    # Largest difference first, whatever its sign (o2 -50, o1 +10, o3 +1).
    result = run("mismatches", "--status", "all", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == FIELDS
    assert [(r["openid"], r["status"], r["delta"]) for r in reader] == [
        ("o2", "confirmed", "-50"),
        ("o1", "suspected", "10"),
        ("o3", "cleared", "1"),
    ]
    cleared = run("mismatches", "--status", "cleared", "--format", "json")
    assert [c["id"] for c in json.loads(cleared.stdout)] == [seeded["cleared"]]


def test_empty_lists(env: str) -> None:
    assert run("mismatches").stdout == "no mismatch cases (open)\n"
    assert json.loads(run("mismatches", "--format", "json").stdout) == []
    assert run("mismatches", "--format", "csv").stdout == ",".join(FIELDS) + "\n"


def test_ack_records_the_operator_and_the_note(
    seeded: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "carol")
    case_id = seeded["confirmed"]
    result = run("mismatches", "ack", str(case_id), "--note", "FIN-12: refund pending")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"case {case_id} acknowledged\n"
    last = events(seeded_url(), case_id)[-1]
    assert (last.from_status, last.to_status, last.actor, last.note) == (
        "confirmed",
        "acknowledged",
        "operator:carol",
        "FIN-12: refund pending",
    )
    assert "acknowledged" in run("mismatches").stdout


def test_resolve_with_an_explicit_actor(seeded: dict[str, int]) -> None:
    case_id = seeded["suspected"]
    result = run("mismatches", "resolve", str(case_id), "--note", "fixed", "--actor", "dave")
    assert result.exit_code == 0, result.stderr
    last = events(seeded_url(), case_id)[-1]
    assert (last.to_status, last.actor, last.note) == ("resolved", "operator:dave", "fixed")
    assert str(case_id) not in [line.split()[0] for line in run("mismatches").stdout.splitlines()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ack", "{confirmed}"], "Missing option '--note'"),
        (["ack", "{confirmed}", "--note", "  "], "a note is required"),
        (["resolve", "999999", "--note", "x"], "no mismatch case 999999"),
        (["resolve", "{cleared}", "--note", "x"], "is already cleared"),
        (["ack", "{cleared}", "--note", "x"], "is cleared"),
        (["ack", "not-a-number", "--note", "x"], "not a valid integer"),
        (["--status", "closed"], "Invalid value for '--status'"),
    ],
)
def test_bad_operator_input_exits_2_and_changes_nothing(
    seeded: dict[str, int], args: list[str], message: str
) -> None:
    before = {k: len(events(seeded_url(), v)) for k, v in seeded.items()}
    result = run("mismatches", *(a.format(**seeded) for a in args))
    assert result.exit_code == 2
    assert message in result.stderr
    if "Missing" not in message and "Invalid" not in message and "valid integer" not in message:
        assert one_line_error(result).startswith("midas-recon: ")
    assert {k: len(events(seeded_url(), v)) for k, v in seeded.items()} == before


def test_show_prints_the_history(seeded: dict[str, int]) -> None:
    case_id = seeded["confirmed"]
    run("mismatches", "ack", str(case_id), "--note", "looking\ninto it", "--actor", "erin")
    result = run("mismatches", "show", str(case_id))
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "save_sum" in text and "confirmed" in text
    history = [line.split()[1:4] for line in text.splitlines() if line.startswith("2026-")]
    assert history[0] == ["system", "-", "suspected"]
    assert history[1] == ["system", "suspected", "confirmed"]
    assert history[2][:3] == ["operator:erin", "confirmed", "acknowledged"]
    assert text.rstrip().endswith("looking into it")  # one line per event, whatever the note

    doc = json.loads(run("mismatches", "show", str(case_id), "--format", "json").stdout)
    assert doc["status"] == "acknowledged"
    assert [(e["from_status"], e["to_status"]) for e in doc["events"]] == [
        (None, "suspected"),
        ("suspected", "confirmed"),
        ("confirmed", "acknowledged"),
    ]
    assert doc["events"][2]["note"] == "looking\ninto it"
    missing = run("mismatches", "show", "424242")
    assert missing.exit_code == 2
    assert one_line_error(missing) == "midas-recon: no mismatch case 424242"


def test_an_unreachable_database_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    get_settings.cache_clear()
    result = run("mismatches")
    assert result.exit_code == 2
    assert "database unavailable" in one_line_error(result)


@pytest.mark.parametrize("command", [[], ["ack"], ["resolve"], ["show"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run("mismatches", *command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def seeded_url() -> str:
    return get_settings().DATABASE_URL
