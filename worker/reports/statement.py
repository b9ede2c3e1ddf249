"""The daily coin statement (PRODUCT.md §8): every figure comes from SQL aggregates.

One business date, its nightly run, per zone and in total:
- coverage of the run (accounts, ok, unobservable, error) and Midas totals over the ok ones;
- the coin statement over the accounts observed ok both in this run and in the previous date's
  nightly run: opening + top-ups + gifts - spends + cancels = expected closing, against the
  closing Midas shows, the residual being the unexplained difference. The ledger is taken per
  account between its two fetches (occurred_at in (t0, t1]), the reconciliation's own window, so
  the residual is exactly the change in the accounts' disagreement. When the previous date's
  run was a backfill that fetched after this one, the window is (t1, t0] taken negatively:
  the order of the runs on the calendar, not on the clock, decides opening and closing;
- the ledger of the business day (local midnight to midnight in RECON_TIMEZONE), per kind;
- mismatch cases opened, confirmed, cleared, resolved, acknowledged that day, and open at its end.

Figures that cannot be known are None (no previous run, no account observed), never zero.
A statement made before its business day is over says so (`partial`): the day's ledger and
case figures then cover the day up to `generated_at` only. An incomplete run (accounts left
in error) still has a statement: its error column counts them and the totals leave them out.
The SQL views of migration 20261124_0002 compute the same numbers for BI tools.
The coverage, totals and coin statement of a closed night are stored when it closes
(worker/db/night_figures.py) and read from there while they still hold: the same numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from worker.db import night_figures
from worker.db import statement as q
from worker.db.models import Run
from worker.db.statement import EVENT_COLUMNS
from worker.vocabulary import RunStatus

if TYPE_CHECKING:
    from worker.business_calendar import BusinessCalendar

TREND_DAYS = 30
TREND_TOTALS = ("balance", "save_sum", "cost_sum", "present_sum")
# Runs a statement can be made from: every account answered, or some left in error (counted).
STATEMENT_RUN_STATUSES = (RunStatus.COMPLETE, RunStatus.INCOMPLETE)


class StatementUnavailable(Exception):
    """The date has no finished nightly run: there is nothing truthful to print."""


class UnknownZone(ValueError):
    """A zone no account, snapshot or ledger row has ever named (a typo, most likely)."""


@dataclass(frozen=True)
class RunInfo:
    """The run a statement came from, named in every output."""

    id: int
    business_date: dt.date
    kind: str
    trigger: str
    status: str
    api_version: str
    planned: int
    ok: int
    unobservable: int
    error: int
    mismatches_opened: int
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    # The night's coverage (worker.recon.coverage): what it could hold, what it left, and
    # what the active accounts' observations looked like when it closed; None before issue 14.
    capacity: int | None = None
    deferred: int = 0
    coverage_verdict: str | None = None
    coverage: dict[str, Any] | None = None

    @classmethod
    def of(cls, run: Run, tz: ZoneInfo) -> RunInfo:
        """The run's figures, its times shown in the business time zone."""
        values = {f.name: getattr(run, f.name) for f in dataclasses.fields(cls)}
        for name in ("started_at", "finished_at"):
            if values[name] is not None:
                values[name] = values[name].astimezone(tz)
        return cls(**values)


@dataclass
class ZoneFigures:
    """One statement line per zone (zone_id None is the total). None means "not known"."""

    zone_id: str | None
    # coverage of the run
    accounts: int = 0
    ok: int = 0
    unobservable: int = 0
    error: int = 0
    # Midas totals over the accounts observed ok in the run
    balance: int | None = None
    save_sum: int | None = None
    cost_sum: int | None = None
    present_sum: int | None = None
    # coin statement over the accounts observed ok in this run and the previous date's run
    compared: int | None = None
    opening_balance: int | None = None
    top_ups: int | None = None
    gifts: int | None = None
    spends: int | None = None
    cancels: int | None = None
    expected_closing: int | None = None
    closing_balance: int | None = None
    residual: int | None = None
    midas_save_sum_change: int | None = None
    midas_cost_sum_change: int | None = None
    midas_present_sum_change: int | None = None
    unexplained_save_sum: int | None = None
    unexplained_cost_sum: int | None = None
    unexplained_present_sum: int | None = None
    # the ledger of the business day, all accounts of the zone
    day_save: int = 0
    day_cost: int = 0
    day_cancel: int = 0
    day_present: int = 0
    day_net: int = 0
    # mismatch cases during the business day
    cases_opened: int = 0
    cases_confirmed: int = 0
    cases_cleared: int = 0
    cases_resolved: int = 0
    cases_acknowledged: int = 0
    cases_open_at_end: int = 0


FIGURE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ZoneFigures) if f.name != "zone_id"
)
MOVEMENT_FIELDS = (
    "compared",
    "opening_balance",
    "top_ups",
    "gifts",
    "spends",
    "cancels",
    "expected_closing",
    "closing_balance",
    "residual",
    "midas_save_sum_change",
    "midas_cost_sum_change",
    "midas_present_sum_change",
    "unexplained_save_sum",
    "unexplained_cost_sum",
    "unexplained_present_sum",
)


@dataclass
class Statement:
    business_date: dt.date
    timezone: str
    day_start: dt.datetime
    day_end: dt.datetime
    zone_filter: str | None
    run: RunInfo
    previous_run: RunInfo | None
    zones: list[ZoneFigures]
    total: ZoneFigures
    generated_at: dt.datetime
    # The business day was not over at generated_at: its day figures cover part of it.
    partial: bool = False


@dataclass
class Trend:
    """Daily points for the charts; None where that date has no complete nightly run."""

    dates: list[dt.date]
    balance: list[int | None] = field(default_factory=list)
    save_sum: list[int | None] = field(default_factory=list)
    cost_sum: list[int | None] = field(default_factory=list)
    present_sum: list[int | None] = field(default_factory=list)
    open_cases: list[int] = field(default_factory=list)


def build_statement(
    session: Session,
    business_date: dt.date,
    *,
    calendar: BusinessCalendar,
    zone_id: str | None = None,
    now: dt.datetime | None = None,
) -> Statement:
    """The statement of `business_date`; StatementUnavailable unless its nightly run has
    finished (complete, or incomplete with its errors counted), FutureDate for a date that
    has not begun, UnknownZone for a zone nothing has named."""
    from worker.business_calendar import utcnow

    now = now or utcnow()
    calendar.require_begun(business_date, now)
    q.tune_for_reporting(session)
    if zone_id is not None and not q.zone_exists(session, zone_id):
        raise UnknownZone(f"zone {zone_id!r} is unknown: no account or ledger row names it")
    tz = calendar.tz
    run = q.nightly_run(session, business_date)
    if run is None:
        raise StatementUnavailable(
            f"no nightly run for {business_date}; start one with `midas-recon run --date "
            f"{business_date}`"
        )
    if run.status not in STATEMENT_RUN_STATUSES:
        detail = f"planned {run.planned}, ok {run.ok}, unobservable {run.unobservable}, "
        detail += f"error {run.error}"
        if run.failure_reason:
            detail += f"; reason: {run.failure_reason}"
        raise StatementUnavailable(
            f"the nightly run #{run.id} for {business_date} is {run.status} ({detail}); "
            "the statement needs a finished run (complete or incomplete)"
        )
    # Any status will do for the opening side: its ok snapshots are true observations, and
    # only accounts observed in both runs are compared ("compared" says how many).
    previous = q.nightly_run(session, business_date - dt.timedelta(days=1))
    start, end = calendar.day_bounds(business_date)

    zones: dict[str, ZoneFigures] = {}

    def line(zone: str) -> ZoneFigures:
        return zones.setdefault(zone, ZoneFigures(zone_id=zone))

    # Figures stored when the run closed, while still true (worker/db/night_figures.py);
    # otherwise the same figures from the snapshots.
    stored = night_figures.stored(session, run, previous, zone_id)
    coverage: Iterable[Any] = stored.coverage if stored else q.coverage(session, run.id, zone_id)
    for row in coverage:
        z = line(row.zone_id)
        z.accounts, z.ok, z.unobservable, z.error = (
            row.accounts,
            row.ok,
            row.unobservable,
            row.error,
        )
        if row.ok:  # a sum over no observed account is unknown, not zero
            z.balance, z.save_sum = int(row.balance), int(row.save_sum)
            z.cost_sum, z.present_sum = int(row.cost_sum), int(row.present_sum)

    if previous is not None and stored and stored.movement:
        for row in stored.coverage:
            if row.compared is None:  # no account of the zone ok in both runs
                continue
            moved = {name: getattr(row, name) for name in night_figures.MOVEMENT_FIELDS}
            for name, late in stored.late.get(row.zone_id, {}).items():
                moved[name] += late  # ledger rows recorded after the figures were stored
            _set_movement(line(row.zone_id), moved)
    elif previous is not None:
        for row in q.movement(session, run.id, previous.id, zone_id):
            _set_movement(line(row.zone_id), row._mapping)

    for row in q.day_ledger(session, start, end, zone_id):
        z = line(row.zone_id)
        setattr(z, f"day_{row.kind}", int(row.amount))
    for z in zones.values():
        z.day_net = z.day_save + z.day_present - z.day_cost + z.day_cancel

    for row in q.day_case_events(session, start, end, zone_id):
        z = line(row.zone_id)
        z.cases_opened = row.opened
        for status, column in EVENT_COLUMNS.items():
            setattr(z, column, getattr(row, status))
    for zone, counts in q.open_cases_at(session, [end], zone_id).items():
        line(zone).cases_open_at_end = counts[0]
    if previous is not None:
        for z in zones.values():
            if z.compared is None:  # the zone had no account observed in both runs
                z.compared = 0

    ordered = [zones[k] for k in sorted(zones, key=zone_sort_key)]
    return Statement(
        business_date=business_date,
        timezone=tz.key,
        day_start=start.astimezone(tz),
        day_end=end.astimezone(tz),
        zone_filter=zone_id,
        run=RunInfo.of(run, tz),
        previous_run=RunInfo.of(previous, tz) if previous is not None else None,
        zones=ordered,
        total=total_of(ordered),
        generated_at=now.astimezone(tz),
        partial=not calendar.is_over(business_date, now),
    )


def build_trend(
    session: Session,
    business_date: dt.date,
    *,
    calendar: BusinessCalendar,
    zone_id: str | None = None,
    days: int = TREND_DAYS,
) -> Trend:
    """Totals of each day's complete nightly run and the cases open at each day's end."""
    q.tune_for_reporting(session)
    dates = [business_date - dt.timedelta(days=n) for n in range(days - 1, -1, -1)]
    runs = q.nightly_runs(session, dates[0], dates[-1], status=RunStatus.COMPLETE)
    # Stored totals where still true (one row per zone), the snapshots for the other runs.
    by_date: dict[dt.date, dict[str, int]] = {}
    stored = night_figures.complete_totals(session, runs, zone_id)
    for run in runs:
        observed = [r for r in stored.get(run.id, ()) if r.ok]
        if observed:  # a total over no observed account is unknown: the date stays None
            by_date[run.business_date] = {
                name: sum(int(getattr(r, name)) for r in observed) for name in TREND_TOTALS
            }
    live = [run.id for run in runs if run.id not in stored]
    if live:
        for row in q.trend_totals(session, live, zone_id):
            by_date[row.business_date] = {name: int(getattr(row, name)) for name in TREND_TOTALS}
    trend = Trend(dates=dates)
    for d in dates:
        totals = by_date.get(d)
        for name in TREND_TOTALS:
            getattr(trend, name).append(None if totals is None else totals[name])
    ends = [calendar.day_bounds(d)[1] for d in dates]
    per_zone = q.open_cases_at(session, ends, zone_id)
    trend.open_cases = [sum(counts[i] for counts in per_zone.values()) for i in range(len(ends))]
    return trend


def total_of(zones: Iterable[ZoneFigures]) -> ZoneFigures:
    """Sum the zone lines; a figure no zone knows stays unknown."""
    total = ZoneFigures(zone_id=None)
    zones = list(zones)
    for name in FIGURE_FIELDS:
        known = [v for z in zones if (v := getattr(z, name)) is not None]
        default = getattr(total, name)
        setattr(total, name, sum(known) if known else default)
    return total


def zone_sort_key(zone: str) -> tuple[int, int, str]:
    """Numeric zone ids in numeric order ("2" before "10"), then the others."""
    return (0, int(zone), zone) if zone.isdigit() else (1, 0, zone)


def as_dict(statement: Statement) -> dict[str, Any]:
    """The JSON object of docs/finance.md: dates ISO 8601, coins as integers, unknown as null."""

    def convert(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return value.isoformat()
        if isinstance(value, dt.date):
            return value.isoformat()
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    body = dataclasses.asdict(statement)
    out: dict[str, Any] = {"report": "daily_coin_statement", "version": 1}
    out.update(convert(body))
    return out


def _set_movement(z: ZoneFigures, row: Any) -> None:
    for name in night_figures.MOVEMENT_FIELDS:  # the movement's figures, stored or live
        setattr(z, name, int(row[name]))
    assert z.opening_balance is not None and z.closing_balance is not None  # set just above
    assert z.top_ups is not None and z.gifts is not None
    assert z.spends is not None and z.cancels is not None
    assert z.midas_save_sum_change is not None and z.midas_cost_sum_change is not None
    assert z.midas_present_sum_change is not None
    z.expected_closing = z.opening_balance + z.top_ups + z.gifts - z.spends + z.cancels
    z.residual = z.closing_balance - z.expected_closing
    z.unexplained_save_sum = z.midas_save_sum_change - z.top_ups
    z.unexplained_cost_sum = z.midas_cost_sum_change - (z.spends - z.cancels)
    z.unexplained_present_sum = z.midas_present_sum_change - z.gifts
