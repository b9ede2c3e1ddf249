"""The stored figures of closed nights (worker/db/night_figures.py): the statement and the
trend read from them are the statement and the trend computed from the snapshots, through
late ledger rows, a backfilled previous date, a previous night resumed, zone filters; and
while they hold, the night's snapshots are not aggregated again."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, event, select, text, update
from sqlalchemy.orm import Session

from tests.reports.conftest import CAL, T0, T1, ZONE, D, _run, _snapshots, local, seed
from worker.cli.base import cli
from worker.db import night_figures
from worker.db import runs as runs_repo
from worker.db.models import LedgerEntry, NightFigures, Run
from worker.db.session import engine_for, session_scope
from worker.recon.runs import finalize
from worker.reports.statement import as_dict, build_statement, build_trend

pytestmark = pytest.mark.integration

NOW = local(25, 12)
DATES = (dt.date(2026, 11, 19), D, dt.date(2026, 11, 21))


@pytest.fixture(params=["postgres", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    name = "db_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def history(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return seed(session)


def store_all(url: str) -> None:
    with session_scope(url) as session:
        for run in session.scalars(select(Run).where(Run.kind == "nightly")):
            night_figures.store(session, run, now=NOW)


@contextmanager
def statements_sent(session: Session) -> Iterator[list[str]]:
    """The statements `session` sends. Listened for on the session's own engine: the
    suite's long-lived `db_url` may have a session factory whose engine is no longer the one
    `engine_for` returns now (both are LRU caches of 8 URLs, evicting at different times)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def report(session: Session, day: dt.date, zone: str | None) -> dict[str, Any]:
    statement = as_dict(build_statement(session, day, calendar=CAL, zone_id=zone, now=NOW))
    return {"statement": statement, "trend": dataclasses.asdict(trend(session, day, zone))}


def trend(session: Session, day: dt.date, zone: str | None) -> Any:
    return build_trend(session, day, calendar=CAL, zone_id=zone, days=5)


def live(url: str, day: dt.date, zone: str | None = None) -> dict[str, Any]:
    """The figures computed from the snapshots: the stored rows hidden, then put back."""
    with Session(engine_for(url)) as session:
        session.execute(delete(NightFigures))
        figures = report(session, day, zone)
        session.rollback()
    return figures


def from_store(url: str, day: dt.date, zone: str | None = None) -> tuple[dict[str, Any], bool]:
    """The figures as the statement reads them now, and whether it aggregated the night's
    snapshots again (the coverage's count, the movement's pairing) to get them."""
    with session_scope(url) as session, statements_sent(session) as sent:
        figures = report(session, day, zone)
    aggregates = (
        "AS accounts",
        "pairs",
        "sum(balance_snapshots.balance)",
    )  # coverage, movement, trend
    recomputed = any(a in s for s in sent for a in aggregates)
    return figures, recomputed


def flat(value: Any, key: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` as `{"a.b": 1}`: a difference names its figure."""
    if isinstance(value, dict):
        return {
            k: v for name, item in value.items() for k, v in flat(item, f"{key}.{name}").items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}.{i}").items()}
    return {key: value}


def assert_same(url: str, *, dates: tuple[dt.date, ...] = DATES, used: bool = True) -> None:
    for day in dates:
        for zone in (None, "1", "2"):
            stored, recomputed = from_store(url, day, zone)
            assert flat(stored) == flat(live(url, day, zone)), (day, zone)
            if used:
                assert not recomputed, (day, zone)


def test_stored_figures_are_the_live_ones_and_spare_the_snapshots(
    url: str, history: dict[str, int]
) -> None:
    before = {day: live(url, day) for day in DATES}
    for day in DATES:
        assert from_store(url, day)[1], "no rows stored yet: computed from the snapshots"
    store_all(url)
    assert_same(url)
    assert {day: live(url, day) for day in DATES} == before
    top_ups = before[D]["statement"]["total"]["top_ups"]
    assert top_ups == 550  # conftest's hand-computed figure, from the stored rows too
    assert from_store(url, D)[0]["statement"]["total"]["top_ups"] == top_ups


def test_late_ledger_rows_are_added_from_above_the_watermark(
    url: str, history: dict[str, int]
) -> None:
    store_all(url)
    with session_scope(url) as session:
        session.add_all(
            [
                # inside a1's window (t0, t1] of D: a top-up and a cancel booked late
                LedgerEntry(
                    bill_no="late1",
                    openid="a1",
                    zone_id=ZONE["a1"],
                    kind="save",
                    amount=7,
                    occurred_at=T0["a1"] + dt.timedelta(hours=3),
                ),
                LedgerEntry(
                    bill_no="late2",
                    openid="b1",
                    zone_id=ZONE["b1"],
                    kind="cancel",
                    amount=2,
                    occurred_at=T1["b1"],
                ),
                # outside every window: after this night's fetch
                LedgerEntry(
                    bill_no="late3",
                    openid="a2",
                    zone_id=ZONE["a2"],
                    kind="save",
                    amount=1000,
                    occurred_at=T1["a2"] + dt.timedelta(minutes=1),
                ),
            ]
        )
    assert_same(url)
    figures, _ = from_store(url, D)
    assert figures["statement"]["total"]["top_ups"] == 550 + 7
    assert figures["statement"]["total"]["cancels"] == 10 + 2


def test_a_backfill_of_the_previous_date_is_compared_signed_once_stored(
    url: str, history: dict[str, int]
) -> None:
    store_all(url)
    # Date 23 closes first, with no run for 22: its rows say "no previous run".
    with session_scope(url) as session:
        late = _run(session, 23, "nightly", "complete", planned=2, ok=2)
        _snapshots(
            session,
            late,
            [("a1", "ok", 150, 170, 20, 4), ("b1", "ok", 520, 520, 0, 0)],
            {"a1": local(23, 2, 30), "b1": local(23, 2, 31)},
        )
        night_figures.store(session, late, now=NOW)
    day23 = dt.date(2026, 11, 23)
    assert live(url, day23)["statement"]["previous_run"] is None
    # Then 22 is backfilled: fetched after 23's run, so its window is taken negatively.
    with session_scope(url) as session:
        backfill = _run(session, 22, "nightly", "complete", planned=2, ok=2)
        backfill.finished_at = local(24, 9)
        _snapshots(
            session,
            backfill,
            [("a1", "ok", 140, 160, 20, 4), ("b1", "ok", 510, 510, 0, 0)],
            {"a1": local(24, 8), "b1": local(24, 8, 1)},
        )
        for bill, at in (("bf1", local(23, 9)), ("bf2", local(24, 7))):
            session.add(
                LedgerEntry(
                    bill_no=bill, openid="a1", zone_id="1", kind="save", amount=10, occurred_at=at
                )
            )
    # Stored rows that no longer hold: the statement computes, and says the same.
    assert_same(url, dates=(day23,), used=False)
    assert live(url, day23)["statement"]["total"]["top_ups"] == -20
    with session_scope(url) as session:
        night_figures.store_after_close(
            session, runs_repo.get_run(session, backfill.id) or backfill, now=NOW
        )
    assert_same(url, dates=(dt.date(2026, 11, 22), day23))


def test_a_previous_night_resumed_with_more_snapshots_is_recomputed(
    url: str, history: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r1, r2 = history["r1"], history["r2"]
    monkeypatch.setitem(ZONE, "a7", "1")
    with session_scope(url) as session:
        # D-1 failed with a7 not yet fetched; D observed it; D's figures were stored then.
        session.execute(update(Run).where(Run.id == r1).values(status="failed"))
        _snapshots(session, session.get(Run, r2), [("a7", "ok", 90, 90, 0, 0)], {"a7": T1["a1"]})
    store_all(url)
    assert_same(url, dates=(D,))
    with session_scope(url) as session:  # resumed: it may take more snapshots
        assert runs_repo.resume_failed(session, r1) is not None
    assert_same(url, dates=(D,), used=False)
    with session_scope(url) as session:
        _snapshots(session, session.get(Run, r1), [("a7", "ok", 80, 80, 0, 0)], {"a7": T0["a1"]})
        # failed again at the very same moment: only its counts tell the two states apart
        counts = runs_repo.ItemCounts(ok=6, unobservable=1)
        runs_repo.close_run(session, r1, status="failed", counts=counts, now=local(19, 2, 40))
    assert_same(url, dates=(D,), used=False)
    assert live(url, D)["statement"]["total"]["compared"] == 4  # a7 joined the comparison
    with session_scope(url) as session:
        run = session.get(Run, r1)
        assert run is not None
        night_figures.store_after_close(session, run, now=NOW)
    assert_same(url, dates=(D,))


def test_finalize_stores_the_night_and_report_refresh_the_older_ones(
    url: str, history: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    with session_scope(url) as session:
        closing = _run(session, 22, "nightly", "running")
        _snapshots(session, closing, [("a1", "ok", 140, 160, 20, 4)], {"a1": local(22, 3)})
    with session_scope(url) as session:
        finalize(session, closing.id, now=local(22, 4))
    with session_scope(url) as session:
        stored = session.scalars(select(NightFigures).where(NightFigures.run_id == closing.id))
        assert [(r.zone_id, r.previous_run_id, r.compared) for r in stored] == [
            ("1", history["r4"], 1)
        ]
        # The seeded runs closed before the table existed: refresh stores them.
        assert night_figures.stale_dates(session) == list(DATES)
    monkeypatch.setenv("DATABASE_URL", url)
    runner = CliRunner()
    first = runner.invoke(cli, ["report", "refresh"])
    assert first.exit_code == 0, first.output
    assert first.output.splitlines() == [f"{d}: stored" for d in DATES]
    again = runner.invoke(cli, ["report", "refresh"])
    assert again.output == "every finished nightly run has its figures stored\n"
    assert_same(url)
    missing = runner.invoke(cli, ["report", "refresh", "--date", "2026-11-30"])
    assert missing.exit_code == 1 and "nothing to store" in missing.output


def test_a_ledger_insert_open_at_the_close_keeps_no_watermark(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ledger ids commit out of order: an id below the highest one seen may become visible
    after the close. The close waits for such an insert; one that stays open leaves the
    movement to be computed afresh, so its row still counts once it commits."""
    with session_scope(db_url) as session:
        seed(session)
    monkeypatch.setattr(night_figures, "SETTLE_WAIT_S", 0.2)
    engine = engine_for(db_url)
    with engine.connect() as game:
        game.begin()
        # Draws its id now (below the rows committed next), commits after the close.
        game.execute(
            text(
                "INSERT INTO ledger_entries (bill_no, openid, zone_id, kind, amount, occurred_at)"
                " VALUES ('slow', 'a1', '1', 'save', 9, :at)"
            ),
            {"at": T0["a1"] + dt.timedelta(hours=4)},
        )
        with session_scope(db_url) as session:
            session.add(
                LedgerEntry(
                    bill_no="quick",
                    openid="b1",
                    zone_id="2",
                    kind="save",
                    amount=1,
                    occurred_at=T1["b1"],
                )
            )
        store_all(db_url)
        with session_scope(db_url) as session:
            marks = {r.run_id: r.ledger_watermark for r in session.scalars(select(NightFigures))}
        assert marks and all(m is None for run_id, m in marks.items() if run_id != 1)
        game.commit()
    assert_same(db_url, dates=(D,), used=False)
    assert live(db_url, D)["statement"]["total"]["top_ups"] == 550 + 9 + 1
    store_all(db_url)  # nothing open now: a watermark, and the stored rows serve
    assert_same(db_url, dates=(D,))
