"""The statement's figures on the hand-made history of conftest.py."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from tests.reports.conftest import CAL, EXPECTED, T1, TREND_OPEN, TREND_TOTALS, Z2, D
from worker.db.models import BalanceSnapshot
from worker.db.session import session_scope
from worker.reports.statement import (
    FIGURE_FIELDS,
    MOVEMENT_FIELDS,
    StatementUnavailable,
    build_statement,
    build_trend,
    zone_sort_key,
)

pytestmark = pytest.mark.integration


def figures(line: object) -> dict[str, object]:
    return {f: getattr(line, f) for f in FIGURE_FIELDS}


def test_every_figure_matches_the_hand_computed_statement(
    seeded: tuple[str, dict[str, int]],
) -> None:
    url, ids = seeded
    with session_scope(url) as session:
        st = build_statement(session, D, calendar=CAL)
    assert st.run.id == ids["r2"] and st.run.status == "complete"
    assert st.previous_run is not None and st.previous_run.id == ids["r1"]
    assert [z.zone_id for z in st.zones] == ["1", "2"]
    assert figures(st.zones[0]) == EXPECTED["1"]
    assert figures(st.zones[1]) == EXPECTED["2"]
    assert figures(st.total) == EXPECTED[None]
    assert st.day_start == dt.datetime(2026, 11, 19, 16, tzinfo=dt.UTC)
    assert st.day_end == dt.datetime(2026, 11, 20, 16, tzinfo=dt.UTC)
    for line in [*st.zones, st.total]:  # the coin statement balances by construction
        assert line.expected_closing is not None and line.closing_balance is not None
        assert line.residual == line.closing_balance - line.expected_closing
        assert all(type(getattr(line, f)) is int for f in FIGURE_FIELDS)


def test_zone_filter_keeps_one_zone(seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    with session_scope(url) as session:
        st = build_statement(session, D, calendar=CAL, zone_id="2")
    assert [z.zone_id for z in st.zones] == ["2"]
    assert figures(st.total) == Z2 == figures(st.zones[0])
    assert st.zone_filter == "2"


def test_without_a_previous_run_the_movement_is_unknown_not_zero(
    seeded: tuple[str, dict[str, int]],
) -> None:
    url, ids = seeded
    with session_scope(url) as session:
        # Make run 1 belong to another date: D has no previous run any more.
        from worker.db.models import Run

        session.get(Run, ids["r1"]).business_date = dt.date(2026, 11, 1)  # type: ignore[union-attr]
    with session_scope(url) as session:
        st = build_statement(session, D, calendar=CAL)
    assert st.previous_run is None
    for line in [*st.zones, st.total]:
        assert all(getattr(line, f) is None for f in MOVEMENT_FIELDS)
    assert st.total.balance == 964 and st.total.day_net == 396  # the rest is still known


def test_after_a_backfill_the_ledger_window_runs_backwards(
    seeded: tuple[str, dict[str, int]],
) -> None:
    """The previous date's run fetched a day after this one (a backfill): the ledger between
    this fetch and that one is taken with a minus sign, its bounds as in the forward case."""
    url, ids = seeded
    with session_scope(url) as session:
        for snap in session.scalars(
            select(BalanceSnapshot).where(BalanceSnapshot.run_id == ids["r1"])
        ):
            snap.fetched_at = T1[snap.openid] + dt.timedelta(days=1)
    with session_scope(url) as session:
        st = build_statement(session, D, calendar=CAL)
    z1, z2 = st.zones
    # a1: (t1, t1 + 1 day]: L06 sits exactly at t1 (outside), L11 (save 999) inside;
    # a2: L08 (cost 15). b1: L13 (cost 100); L12 is before its t1.
    assert (z1.top_ups, z1.gifts, z1.spends, z1.cancels) == (-999, 0, -15, 0)
    assert (z2.top_ups, z2.gifts, z2.spends, z2.cancels) == (0, 0, -100, 0)
    # The counters do not depend on the order of the fetches.
    assert (z1.compared, z1.opening_balance, z1.closing_balance) == (2, 300, 394)
    assert z1.expected_closing == 300 - 999 + 15


def test_a_zone_with_no_observed_account_has_unknown_totals(
    seeded: tuple[str, dict[str, int]],
) -> None:
    url, ids = seeded
    with session_scope(url) as session:
        session.add(
            BalanceSnapshot(
                run_id=ids["r2"],
                business_date=D,
                openid="c1",
                zone_id="3",
                fetched_at=dt.datetime.now(dt.UTC),
                status="unobservable",
                errcode=90016,
                errmsg="x",
                api_version="v1",
            )
        )
    with session_scope(url) as session:
        st = build_statement(session, D, calendar=CAL)
    z3 = st.zones[2]
    assert (z3.zone_id, z3.accounts, z3.unobservable) == ("3", 1, 1)
    assert z3.balance is None and z3.save_sum is None
    assert z3.compared == 0 and z3.opening_balance is None and z3.residual is None
    assert st.total.balance == 964 and st.total.unobservable == 2


def test_no_run_means_no_statement(seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    with (
        session_scope(url) as session,
        pytest.raises(StatementUnavailable, match="no nightly run for 2026-11-22"),
    ):
        build_statement(session, dt.date(2026, 11, 22), calendar=CAL)


def test_an_incomplete_run_still_has_its_statement(seeded: tuple[str, dict[str, int]]) -> None:
    """Accounts left in error are counted, not a reason to print nothing (PRODUCT.md §8)."""
    url, ids = seeded
    with session_scope(url) as session:
        st = build_statement(session, dt.date(2026, 11, 21), calendar=CAL)
    assert st.run.id == ids["r4"] and st.run.status == "incomplete" and st.run.error == 3
    assert st.total.ok == 1 and st.total.balance == 134  # the observed account only


def test_trend_has_thirty_days_with_gaps_for_missing_runs(
    seeded: tuple[str, dict[str, int]],
) -> None:
    url, _ = seeded
    with session_scope(url) as session:
        trend = build_trend(session, D, calendar=CAL)
    assert len(trend.dates) == 30 and trend.dates[-1] == D
    assert trend.dates[0] == D - dt.timedelta(days=29)
    for i, day in enumerate(trend.dates):
        totals = TREND_TOTALS.get(day)
        got = (trend.balance[i], trend.save_sum[i], trend.cost_sum[i], trend.present_sum[i])
        assert got == (totals or (None, None, None, None)), day
        assert trend.open_cases[i] == TREND_OPEN.get(day, 0), day


def test_trend_of_one_zone(seeded: tuple[str, dict[str, int]]) -> None:
    url, _ = seeded
    with session_scope(url) as session:
        trend = build_trend(session, D, calendar=CAL, zone_id="2")
    assert trend.balance[-2:] == [300, 500]
    assert trend.open_cases[-3:] == [0, 2, 2]  # c5 and c7 opened on the 19th


def test_business_day_follows_the_time_zone_across_dst() -> None:
    from worker.config import load_settings

    calendar = load_settings({"RECON_TIMEZONE": "America/New_York"}).calendar
    start, end = calendar.day_bounds(dt.date(2026, 3, 8))
    assert end.astimezone(dt.UTC) - start.astimezone(dt.UTC) == dt.timedelta(hours=23)


def test_zones_sort_numerically() -> None:
    assert sorted(["10", "2", "b", "1", "a"], key=zone_sort_key) == ["1", "2", "10", "a", "b"]


def test_statement_fields_are_documented() -> None:
    """Every column of the CSV/JSON is explained in docs/finance.md."""
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "finance.md").read_text(encoding="utf-8")
    missing = [f for f in FIGURE_FIELDS if f"`{f}`" not in text]
    assert not missing, f"docs/finance.md does not explain: {missing}"
