"""Free text from outside is harmless where it lands: CSV cells that a spreadsheet would run as
formulas are neutralised (mismatches and the report share one function), and control
characters (terminal escapes, bidi overrides) never reach the database from a trigger, a note
or an operator name.
"""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.recon.conftest import SETTLE, T0, Books
from worker.cli.base import cli
from worker.config import get_settings
from worker.db.models import MismatchCase, MismatchEvent, Run
from worker.db.session import engine_for, session_scope
from worker.recon.cases import acknowledge, reconcile_snapshots
from worker.recon.rules import DEFAULT_CHECKS
from worker.text import spreadsheet_cell, strip_controls

ESCAPES = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202e\r"


def test_spreadsheet_cell_quotes_formula_text_only() -> None:
    for text in ("=HYPERLINK(1)", "+1", "-1+2", "@SUM(A1)", "\tx", "\rx"):
        assert spreadsheet_cell(text) == "'" + text
    assert spreadsheet_cell("o1") == "o1" and spreadsheet_cell("") == ""
    assert spreadsheet_cell(-5) == -5  # a negative number stays a number


def test_strip_controls_keeps_lines_and_tabs() -> None:
    assert strip_controls(f"a{ESCAPES}b\tc\nd") == "a[2J]0;owned31mb\tc\nd"


@pytest.mark.integration
def test_mismatches_csv_neutralises_formula_cells(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    with Session(engine_for(db_url)) as session:
        books = Books(session)
        for openid in ("-1+2", "@SUM"):  # allowed openid characters, formulas in a spreadsheet
            books.ledger(openid, "save", 600, T0 - dt.timedelta(minutes=1))
        snaps = [books.snapshot(o, T0, off={"balance": -5}) for o in ("-1+2", "@SUM")]
        reconcile_snapshots(
            session, [s.id for s in snaps], checks=DEFAULT_CHECKS, settle_seconds=SETTLE, now=T0
        )
        session.commit()
    result = CliRunner().invoke(cli, ["mismatches", "--format", "csv"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert sorted(r["openid"] for r in rows) == ["'-1+2", "'@SUM"]
    assert {r["delta"] for r in rows} == {"-5"}  # numbers are left as numbers


@pytest.mark.integration
def test_notes_and_operator_names_are_stored_without_controls(db_url: str) -> None:
    with Session(engine_for(db_url)) as session:
        books = Books(session)
        books.ledger("o1", "save", 600, T0 - dt.timedelta(minutes=1))
        snap = books.snapshot("o1", T0, off={"balance": 10})
        reconcile_snapshots(
            session, [snap.id], checks=DEFAULT_CHECKS, settle_seconds=SETTLE, now=T0
        )
        case_id = session.scalars(select(MismatchCase.id)).one()
        acknowledge(session, case_id, f"ticket 42{ESCAPES}", f"ann\u202e{ESCAPES[:4]}")
        session.commit()
        event = session.scalars(select(MismatchEvent).where(MismatchEvent.note.is_not(None))).one()
    assert event.note == "ticket 42[2J]0;owned31m"
    assert event.actor == "operator:ann[2J"


@pytest.mark.integration
def test_a_run_trigger_is_stored_without_controls(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    tasks.start_nightly.run("2026-11-24", "\x1b[31mops\x1b[0m")
    with session_scope(db_url) as session:
        assert session.scalars(select(Run.trigger)).one() == "[31mops[0m"
