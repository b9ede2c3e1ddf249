"""`run`, `runs`, `recheck`: start and watch reconciliation runs.

With REDIS_URL set the work is done by the Celery workers and these commands plan it and
read its progress from Postgres; without it (the embedded mode) they do the work in this
process with the same service functions.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import deque
from typing import Any

import click

from worker.business_calendar import FutureDate
from worker.cli.base import (
    JobFailed,
    UsageError,
    broker,
    cli,
    database_errors,
    format_option,
    handle_errors,
    limit_option,
    parse_date,
    settings,
    table,
)
from worker.config import Settings
from worker.db.models import Run
from worker.fields import RUN_FIELDS
from worker.vocabulary import RUN_KINDS, RunKind, RunStatus, SnapshotStatus

TABLE_FIELDS = RUN_FIELDS[:-1]
# --wait: a run that moved nothing for this long is probably missing its workers.
STALL_HINT_S = 60.0
STALL_GIVE_UP_S = 600.0
RECHECK_WAIT_S = 120.0


# -- run ----------------------------------------------------------------------------------------


@cli.command("run")
@click.option(
    "--date",
    "day",
    metavar="YYYY-MM-DD",
    help="Business date of the run (default: today in RECON_TIMEZONE). A past date is a "
    "backfill; a date that has not begun is refused.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Show progress (done/planned, rate, ETA) until the run ends; exit 0 only if complete.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="With --wait: give up (exit 1) after this long; the run goes on. By default --wait "
    f"gives up only when nothing moved for {STALL_GIVE_UP_S:.0f} s (no worker running?).",
)
@handle_errors
def run_cmd(day: str | None, wait: bool, timeout: float | None) -> None:
    """Start the nightly run of a business date, or join it if it exists.

    A run never fetches an account twice; a failed run (e.g. a wrong AppKey, the day's quota
    used up) is resumed from where it stopped. With REDIS_URL the workers do the fetching;
    without it (embedded mode) this command does, and always waits.

    A run for an earlier date than an existing one (a backfill) observes balances now: the
    later date's statement then compares against them with a signed ledger window
    (docs/finance.md, "Backfills").

    Exit status: 0 started (or, with --wait, complete); 1 the run is incomplete or failed,
    or --wait gave up; 2 a bad date (not YYYY-MM-DD, or not begun).
    """
    s = settings()
    business_date = parse_date(day) if day is not None else None
    try:
        if business_date is not None:
            s.calendar.require_begun(business_date)  # before any work, in either mode
            _say_backfill(s, business_date)
        if s.embedded:
            _run_embedded(s, business_date)
            return
        from worker import dispatch
        from worker.db.session import after_commit, session_scope
        from worker.recon.runs import start_nightly

        with database_errors(), session_scope(s.DATABASE_URL) as session:
            started = start_nightly(
                session,
                s,
                business_date=business_date or s.calendar.today(),
                trigger="cli",
                resume_failed=True,
            )
            if started.status in (RunStatus.RUNNING, RunStatus.PLANNING):
                after_commit(session, broker(lambda: dispatch.request_pump(started.run_id)))
    except FutureDate as exc:
        raise UsageError(str(exc)) from None
    verb = "started" if started.created else "resumed" if started.resumed_from else "joined"
    click.echo(
        f"run #{started.run_id} for {started.business_date}: {verb}, "
        f"{started.planned} accounts planned, {started.status}"
    )
    if started.closed:
        click.echo(
            f"one night at a time: closed the unfinished nightly run "
            f"{', '.join(f'#{i}' for i in started.closed)}; its accounts not yet fetched are "
            "deferred (tonight's plan ranks them by risk)"
        )
    if started.waiting_for and started.status == RunStatus.FAILED:
        click.echo(
            f"run #{started.run_id} stays failed while nightly run "
            f"{', '.join(f'#{i}' for i in started.waiting_for)} is open (one night at a "
            "time): resume it once that one has finished"
        )
    elif started.waiting_for:
        click.echo(
            f"run #{started.run_id} waits for run "
            f"{', '.join(f'#{i}' for i in started.waiting_for)} to store its batches in "
            "flight, then plans"
        )
    if wait:
        final = _watch(s, started.run_id, timeout=timeout)
    else:
        with session_scope(s.DATABASE_URL) as session:
            final = _get(session, started.run_id)
        if final.status in (RunStatus.PLANNING, RunStatus.RUNNING):
            return
    _conclude(final)


def _run_embedded(s: Settings, business_date: dt.date | None) -> None:
    from worker.recon.runs import run_embedded

    bar = _ProgressLine(sys.stderr.isatty())
    click.echo("embedded mode (no REDIS_URL): fetching in this process", err=True)
    with database_errors():
        final = run_embedded(
            s, business_date or s.calendar.today(), trigger="cli", progress=bar.update
        )
    bar.close()
    _conclude(final)


def _say_backfill(s: Settings, day: dt.date) -> None:
    from worker.db.session import session_scope
    from worker.recon.runs import later_nightly_dates

    with database_errors(), session_scope(s.DATABASE_URL) as session:
        later = later_nightly_dates(session, day)
    if later:
        click.echo(
            f"backfill: {day} is earlier than the runs of {', '.join(map(str, later))}; its "
            f"balances are observed now, and the statement of {later[0]} compares against "
            "them with a signed ledger window",
            err=True,
        )


def _conclude(run: Run) -> None:
    summary = (
        f"run #{run.id} for {run.business_date}: {run.status}; planned {run.planned}, "
        f"ok {run.ok}, unobservable {run.unobservable}, error {run.error}, "
        f"mismatches opened {run.mismatches_opened}"
    )
    if run.kind == RunKind.NIGHTLY and run.capacity is not None:
        summary += (
            f"; capacity {run.capacity}, deferred {run.deferred}, "
            f"coverage {run.coverage_verdict or '-'}"
        )
        note = (run.coverage or {}).get("note")
        if note:
            summary += f" ({note})"
    if run.status == RunStatus.COMPLETE:
        click.echo(summary)
        return
    if run.status == RunStatus.FAILED:
        raise JobFailed(f"{summary}; failed: {run.failure_reason}")
    raise JobFailed(summary)


def _watch(s: Settings, run_id: int, *, timeout: float | None = None) -> Run:
    """Poll Postgres until the run ends, drawing the progress line; JobFailed after
    `timeout`, or when nothing moved for STALL_GIVE_UP_S (no worker is doing the run)."""
    from worker.db.session import session_scope
    from worker.recon.runs import read_progress

    bar = _ProgressLine(sys.stderr.isatty())
    started = time.monotonic()
    last_done, last_move, last_hint = -1, started, started
    while True:
        with database_errors(), session_scope(s.DATABASE_URL) as session:
            p = read_progress(session, run_id)
            if p.status not in (RunStatus.PLANNING, RunStatus.RUNNING):
                bar.update(p)
                bar.close()
                return _get(session, run_id)
        bar.update(p)
        now = time.monotonic()
        if p.done != last_done:
            last_done, last_move = p.done, now
        still = now - last_move
        if still > STALL_GIVE_UP_S or (timeout is not None and now - started > timeout):
            bar.close()
            why = (
                f"after {timeout:.0f} s"
                if timeout is not None and still <= STALL_GIVE_UP_S
                else (f"after {still:.0f} s without progress")
            )
            raise JobFailed(
                f"run #{run_id}: stopped waiting {why} at {p.done}/{p.planned}; the run goes "
                "on. Is a worker running (celery -A worker worker -Q recheck,nightly)?"
            )
        if still > STALL_HINT_S and now - last_hint > STALL_HINT_S:
            bar.note(
                f"no progress for {still:.0f} s: is a worker running "
                "(celery -A worker worker -Q recheck,nightly)?"
            )
            last_hint = now
        time.sleep(1.0)


class _ProgressLine:
    """done/planned, the rate over the last ~10 s, and the ETA; redrawn in place on a TTY,
    a line every 10 s otherwise (logs, CI)."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.samples: deque[tuple[float, int]] = deque()
        self.last_line = 0.0
        self.drawn = False

    def update(self, p: Any) -> None:
        now = time.monotonic()
        self.samples.append((now, p.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > 10:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        rate = (p.done - d0) / (now - t0) if now > t0 else 0.0
        left = max(0, p.planned - p.done)
        eta = _duration(left / rate) if rate > 0 and left else "-" if left else "0:00"
        share = f"{100 * p.done / p.planned:.0f}%" if p.planned else "-"
        line = (
            f"run #{p.run_id}: {p.done}/{p.planned} ({share})  {rate:.0f}/s  ETA {eta}"
            f"  [ok {p.ok}, unobservable {p.unobservable}, error {p.error}]"
        )
        if self.tty:
            click.echo("\r" + line.ljust(100), nl=False, err=True)
            self.drawn = True
        elif now - self.last_line >= 10 or p.done == p.planned:
            click.echo(line, err=True)
            self.last_line = now

    def note(self, text: str) -> None:
        self.close()
        click.echo(text, err=True)

    def close(self) -> None:
        if self.drawn:
            click.echo("", err=True)
            self.drawn = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# -- runs ---------------------------------------------------------------------------------------


@cli.command("runs")
@format_option("json: a list of objects (timestamps UTC ISO 8601).")
@limit_option(20, most=1000, help="How many runs, newest first.")
@click.option(
    "--kind",
    type=click.Choice([*RUN_KINDS, "all"]),
    default=RunKind.NIGHTLY.value,
    show_default=True,
    help="nightly runs, or the rechecks after payments, the confirm passes, or all.",
)
@handle_errors
def runs_cmd(fmt: str, limit: int, kind: str) -> None:
    """Recent runs with their status and coverage counts.

    A run's status speaks of coverage: complete (every account observed or unobservable),
    incomplete (some stayed error), failed (stopped: see failure_reason), running.
    """
    from worker.db.runs import recent_runs
    from worker.db.session import session_scope

    with database_errors(), session_scope(settings().DATABASE_URL) as session:
        rows = [
            _run_row(r)
            for r in recent_runs(session, limit=limit, kind=None if kind == "all" else kind)
        ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo("no runs yet")
    else:
        click.echo(table(TABLE_FIELDS, [[_cell(r[f]) for f in TABLE_FIELDS] for r in rows]))


def _run_row(run: Run) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in RUN_FIELDS:
        value = getattr(run, name)
        if isinstance(value, dt.datetime):
            value = value.astimezone(dt.UTC).isoformat()
        elif isinstance(value, dt.date):
            value = value.isoformat()
        row[name] = value
    return row


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


# -- recheck ------------------------------------------------------------------------------------


@cli.command("recheck")
@click.argument("openid")
@click.option("--zone-id", default="1", show_default=True, help="The account's zone.")
@click.option("--wait", is_flag=True, help="Wait for the answer and print it.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=RECHECK_WAIT_S,
    show_default=True,
    metavar="SECONDS",
    help="With --wait: give up (exit 1) when no worker answered within this long.",
)
@click.option(
    "--enroll",
    is_flag=True,
    help="Recheck an account not known yet, adding it to the accounts (and so to later "
    "nightly runs). Without it an unknown openid is refused: a typo must not become a player.",
)
@handle_errors
def recheck_cmd(openid: str, zone_id: str, wait: bool, timeout: float, enroll: bool) -> None:
    """Fetch one account's balance now and compare it with the ledger (a recheck run).

    Unlike the rechecks after payments this one is not delayed. Exit status with --wait (and
    always in embedded mode): 0 when Midas answered or the account is unobservable, 1 on an
    error answer or when no worker answered in time; 2 an unknown account (see --enroll).
    """
    from worker.db.session import after_commit, session_scope
    from worker.recon.rechecks import RecheckRejected, plan_recheck, validate_recheck

    s = settings()
    try:
        request = validate_recheck(openid, zone_id, "cli")
    except RecheckRejected as exc:
        raise UsageError(str(exc)) from None
    try:
        with database_errors(), session_scope(s.DATABASE_URL) as session:
            batch = plan_recheck(session, s, request, enroll=enroll)
            if not s.embedded:
                from worker import dispatch

                after_commit(session, broker(lambda: dispatch.send_batch(batch, RunKind.RECHECK)))
    except RecheckRejected as exc:
        raise UsageError(str(exc)) from None
    if s.embedded:
        _recheck_inline(s, batch)
    else:
        click.echo(
            f"recheck run #{batch.run_id} sent for {request.openid} (zone {request.zone_id})"
        )
        if not wait:
            return
        _wait_for(s, batch.run_id, timeout)
    _print_snapshot(s, batch.run_id)


def _recheck_inline(s: Settings, batch: Any) -> None:
    from functools import partial

    from worker.db.session import session_scope
    from worker.midas.limiter import make_limiter
    from worker.recon.runs import FetchDeps, batch_size, drive

    deps = FetchDeps.from_settings(s, limiter=make_limiter(s))
    with database_errors():
        drive(
            partial(session_scope, s.DATABASE_URL),
            deps,
            batch.run_id,
            size=batch_size(s),
            first=[batch],
        )


def _wait_for(s: Settings, run_id: int, timeout: float) -> None:
    from worker.db.session import session_scope

    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        with database_errors(), session_scope(s.DATABASE_URL) as session:
            if _get(session, run_id).status not in (RunStatus.PLANNING, RunStatus.RUNNING):
                return
        time.sleep(0.5)
    raise JobFailed(
        f"recheck run #{run_id} not done after {timeout:.0f} s: is a worker running "
        "(celery -A worker worker -Q recheck,nightly)?"
    )


def _print_snapshot(s: Settings, run_id: int) -> None:
    from worker.db.session import session_scope
    from worker.db.snapshots import VALUE_FIELDS, snapshots_of_run

    with database_errors(), session_scope(s.DATABASE_URL) as session:
        run = _get(session, run_id)
        snaps = snapshots_of_run(session, run_id)
    if not snaps:
        raise JobFailed(f"recheck run #{run_id} is {run.status} without an answer")
    snap = snaps[0]
    if snap.status == SnapshotStatus.OK:
        values = ", ".join(f"{name} {getattr(snap, name)}" for name in VALUE_FIELDS)
        click.echo(f"ok: {values}; mismatches opened {run.mismatches_opened}")
        return
    text = f"{snap.status}: errcode {snap.errcode} {snap.errmsg or ''}".rstrip()
    if snap.status == SnapshotStatus.ERROR:
        raise JobFailed(text)
    click.echo(text)


# -- helpers ------------------------------------------------------------------------------------


def _get(session: Any, run_id: int) -> Run:
    from worker.db.runs import get_run

    run = get_run(session, run_id)
    if run is None:
        raise JobFailed(f"run #{run_id} vanished")
    return run
