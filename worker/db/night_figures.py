"""The stored figures of closed nightly runs (`night_figures`): written when a run closes,
read by the daily statement and its trend while they are still true.

A closed run's snapshots never change, so its coverage and totals are fixed; its movement
also depends on the previous date's run and on the ledger. The stored rows are used only
while what they were computed from is unchanged:
- the run and the previous date's run are in the state they were (`run_state`: a run resumed,
  given more snapshots and closed again no longer matches), and the previous date's run is
  the same one (a backfill made after the row was written is not);
- ledger rows recorded since (a late file) are added from the ledger ids above the row's
  watermark: ledger rows are only ever inserted, under ids from one sequence.

Ids grow in the order they are drawn, not in the order their transactions commit: an id
below the highest one seen may still become visible later. The watermark is therefore taken
only once every ledger insert that was open when the highest id was read has ended (waited
for, briefly); if one stays open, the row keeps no watermark and the statement computes that
movement afresh.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, delete, func, insert, select, text
from sqlalchemy.orm import Session

from worker.db import statement as q
from worker.db.models import LedgerEntry, NightFigures, Run
from worker.vocabulary import RunKind, RunStatus

log = logging.getLogger(__name__)

_figures = cast(Table, NightFigures.__table__)
_ledger = cast(Table, LedgerEntry.__table__)

# Runs whose statement can be made (worker.reports.statement): only their figures are stored.
STORED_STATUSES = (RunStatus.COMPLETE, RunStatus.INCOMPLETE)
COVERAGE_FIELDS = (
    "accounts",
    "ok",
    "unobservable",
    "error",
    "balance",
    "save_sum",
    "cost_sum",
    "present_sum",
)
MOVEMENT_FIELDS = (
    "compared",
    "opening_balance",
    "closing_balance",
    "midas_save_sum_change",
    "midas_cost_sum_change",
    "midas_present_sum_change",
    *q.FLOW_KINDS.values(),
)
# How long a close waits for the ledger inserts that were open when it read the highest
# ledger id: the game's inserts are single rows (milliseconds); a `ledger import` of a big
# file is not waited for.
SETTLE_WAIT_S = 2.0
_SETTLE_POLL_S = 0.05


def run_state(run: Run) -> str:
    """What a run's snapshots are as of now: its status, when it closed and its counts."""
    closed = run.finished_at.astimezone(dt.UTC).isoformat() if run.finished_at else "-"
    return f"{run.status} {closed} ok={run.ok} unobs={run.unobservable} error={run.error}"


def store_after_close(session: Session, run: Run, *, now: dt.datetime) -> None:
    """Store a nightly run's figures as it closes, and again those of the next date's run,
    whose movement compares with this one (a backfill, or a failed night resumed)."""
    if run.kind != RunKind.NIGHTLY:
        return
    store(session, run, now=now)
    later = q.nightly_run(session, run.business_date + dt.timedelta(days=1))
    if later is not None:
        store(session, later, now=now)


def store(session: Session, run: Run, *, now: dt.datetime) -> bool:
    """(Re)compute and store the figures of a finished nightly run; False for a run whose
    statement cannot be made (not complete or incomplete), which keeps no rows.

    The rows are derived figures, recomputable at any time from the snapshots and the ledger:
    replacing them loses nothing.
    """
    session.execute(delete(_figures).where(_figures.c.run_id == run.id))
    if run.kind != RunKind.NIGHTLY or run.status not in STORED_STATUSES:
        return False
    q.tune_for_reporting(session)
    previous = q.nightly_run(session, run.business_date - dt.timedelta(days=1))
    zones: dict[str, dict[str, Any]] = {}
    # Every zone's row names every column (null where the zone had no pair): one INSERT
    # statement serves them all.
    unmoved = dict.fromkeys((*MOVEMENT_FIELDS, "first_fetch_at", "last_fetch_at"))
    for row in q.coverage(session, run.id, None):
        zones[row.zone_id] = {name: getattr(row, name) for name in COVERAGE_FIELDS} | unmoved
    watermark = settled_ledger_id(session) if previous is not None and zones else None
    if previous is not None and watermark is not None:
        for row in q.movement(session, run.id, previous.id, None, ledger_upto=watermark):
            figures = zones[row.zone_id]
            figures.update({name: getattr(row, name) for name in MOVEMENT_FIELDS})
            figures["first_fetch_at"] = row.first_fetch_at
            figures["last_fetch_at"] = row.last_fetch_at
    common = {
        "run_id": run.id,
        "previous_run_id": previous.id if previous else None,
        "ledger_watermark": watermark,
        "run_state": run_state(run),
        "previous_state": run_state(previous) if previous else None,
        "computed_at": now,
    }
    if zones:
        session.execute(
            insert(_figures),
            [{**common, "zone_id": zone, **figures} for zone, figures in zones.items()],
        )
    log.info(
        "night_figures_stored",
        extra={"run_id": run.id, "zones": len(zones), "ledger_watermark": watermark},
    )
    return True


def settled_ledger_id(session: Session) -> int | None:
    """The highest ledger id, once no ledger insert that could hold a lower id is open
    (every id up to it is then final: visible, or never to be); None if one stays open."""
    highest = int(session.execute(select(func.coalesce(func.max(_ledger.c.id), 0))).scalar_one())
    if session.get_bind().dialect.name != "postgresql":
        return highest  # SQLite has one writer at a time: this transaction, if any
    # An insert holds ROW EXCLUSIVE on the table from before it draws its id to its end: the
    # ones open now are the only ones that can still make an id <= `highest` visible. Any
    # insert starting later draws ids above it. Prepared transactions have no pid.
    open_inserts = text(
        "SELECT virtualtransaction FROM pg_locks WHERE locktype = 'relation'"
        " AND relation = 'ledger_entries'::regclass AND mode = 'RowExclusiveLock'"
        " AND pid IS DISTINCT FROM pg_backend_pid()"
    )
    # The movement is read after this returns, by a later statement: under READ COMMITTED
    # (the sessions' level) it sees every insert that has committed by then.
    waiting_for = set(session.execute(open_inserts).scalars())
    deadline = time.monotonic() + SETTLE_WAIT_S
    while waiting_for:
        if time.monotonic() >= deadline:
            log.warning("night_figures_ledger_unsettled", extra={"open": len(waiting_for)})
            return None
        time.sleep(_SETTLE_POLL_S)
        waiting_for &= set(session.execute(open_inserts).scalars())
    return highest


@dataclass(frozen=True)
class Stored:
    """A run's stored figures that are still true: coverage always, movement when usable."""

    coverage: list[NightFigures]  # the zone filter applied
    movement: bool  # the movement columns hold the statement's figures once `late` is added
    late: dict[str, dict[str, int]]  # per zone, flows of ledger rows recorded since


def stored(session: Session, run: Run, previous: Run | None, zone_id: str | None) -> Stored | None:
    """The run's stored figures still true now, or None when there are none (compute live)."""
    rows = list(session.scalars(select(NightFigures).where(NightFigures.run_id == run.id)))
    if not rows or not _coverage_true(rows[0], run):
        return None
    first = rows[0]
    movement = _movement_true(first, previous)
    late: dict[str, dict[str, int]] = {}
    window = _window(rows)
    if movement and previous is not None and window is not None:
        assert first.ledger_watermark is not None  # _movement_true
        for row in q.late_flows(
            session,
            run,
            previous,
            above_id=first.ledger_watermark,
            window=window,
            zone_id=zone_id,
        ):
            late[row.zone_id] = {name: int(getattr(row, name)) for name in q.FLOW_KINDS.values()}
    mine = [r for r in rows if zone_id is None or r.zone_id == zone_id]
    return Stored(coverage=mine, movement=movement, late=late)


def _coverage_true(head: Any, run: Run) -> bool:
    return bool(head.run_state == run_state(run))


def _movement_true(head: Any, previous: Run | None) -> bool:
    if previous is None:
        return head.previous_run_id is None
    return bool(
        head.previous_run_id == previous.id
        and head.previous_state == run_state(previous)
        # Snapshots may still come into a running run: nothing about it is settled.
        and previous.status != RunStatus.RUNNING
        and head.ledger_watermark is not None
    )


def _window(rows: Sequence[NightFigures]) -> tuple[dt.datetime, dt.datetime] | None:
    """The first and last fetch of the two runs (the same on every zone row)."""
    first = rows[0]
    if first.first_fetch_at is None or first.last_fetch_at is None:
        return None
    return first.first_fetch_at, first.last_fetch_at


def complete_totals(session: Session, runs: Sequence[Run], zone_id: str | None) -> dict[int, Any]:
    """Per run, the stored Midas totals summed over zones (or the zone), for the runs whose
    stored figures are still true; the others are left out."""
    states = {r.id: run_state(r) for r in runs}
    query = select(
        _figures.c.run_id,
        _figures.c.run_state,
        *(_figures.c[name] for name in ("ok", "balance", "save_sum", "cost_sum", "present_sum")),
    ).where(_figures.c.run_id.in_(list(states)))
    if zone_id is not None:
        query = query.where(_figures.c.zone_id == zone_id)
    found: dict[int, list[Any]] = {}
    for row in session.execute(query):
        found.setdefault(row.run_id, []).append(row)
    return {
        run_id: rows
        for run_id, rows in found.items()
        if all(r.run_state == states[run_id] for r in rows)
    }


def refresh(session: Session, business_date: dt.date, *, now: dt.datetime) -> bool:
    """Store the figures of a date's nightly run anew (`report refresh`); False when it has
    none that can be stored."""
    run = q.nightly_run(session, business_date)
    return run is not None and store(session, run, now=now)


def stale_dates(session: Session) -> list[dt.date]:
    """Dates of finished nightly runs whose stored figures are missing or no longer true
    (a run closed before migration 20261204_0011, or what it was computed from changed)."""
    nightly = {
        r.business_date: r for r in session.scalars(select(Run).where(Run.kind == RunKind.NIGHTLY))
    }
    heads = {
        row.run_id: row
        for row in session.execute(
            select(
                _figures.c.run_id,
                _figures.c.run_state,
                _figures.c.previous_run_id,
                _figures.c.previous_state,
                _figures.c.ledger_watermark,
            ).distinct()
        )
    }
    stale = []
    for day, run in sorted(nightly.items()):
        if run.status not in STORED_STATUSES or run.ok + run.unobservable + run.error == 0:
            continue  # no statement, or no snapshot: nothing to store
        head = heads.get(run.id)
        previous = nightly.get(day - dt.timedelta(days=1))
        if head is None or not (_coverage_true(head, run) and _movement_true(head, previous)):
            stale.append(day)
    return stale
