"""`midas-recon report daily` (the coin statement) and `midas-recon demo`."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import click
from sqlalchemy.exc import OperationalError, ProgrammingError

from worker.cli.base import (
    JobFailed,
    UsageError,
    cli,
    format_option,
    handle_errors,
    parse_date,
    settings,
)
from worker.reports.render import FORMATS


@cli.group()
def report() -> None:
    """Finance reports built from the snapshot tables, the ledger and the cases."""


@report.command("daily")
@click.option(
    "--date",
    "date_text",
    metavar="YYYY-MM-DD",
    help="Business date (default: today in RECON_TIMEZONE, marked partial until the day is "
    "over). Its nightly run must have finished (complete, or incomplete with its errors).",
)
@click.option("--zone-id", help="Only this zone (default: every zone and a total).")
@format_option(
    "table for the terminal, csv for a spreadsheet, json for programs, html with charts.",
    choices=FORMATS,
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write to this file instead of standard output (written whole or not at all).",
)
@handle_errors
def daily(date_text: str | None, zone_id: str | None, fmt: str, output: Path | None) -> None:
    """The daily coin statement of a business date.

    Per zone and in total: coverage of the date's nightly run, Midas totals, the coin
    statement against the previous date's run (opening + top-ups + gifts - spends + cancels =
    closing, the residual shown), the ledger of the day and the mismatch cases. Every figure is
    integer coins; n/a (empty in CSV, null in JSON) means not known. A day that is not over
    yet is marked partial, with the time the statement was made. Exits 1 when the date has no
    finished nightly run, 2 for a date that has not begun or a zone nothing names.
    Columns: docs/finance.md.
    """
    from worker.business_calendar import FutureDate
    from worker.db.session import session_scope
    from worker.reports.render import render
    from worker.reports.statement import (
        StatementUnavailable,
        UnknownZone,
        build_statement,
        build_trend,
    )

    cfg = settings()
    calendar = cfg.calendar
    business_date = parse_date(date_text) if date_text else calendar.today()
    if not FIRST_DATE <= business_date <= LAST_DATE:
        raise UsageError(
            f"--date must be between {FIRST_DATE} and {LAST_DATE}, got {business_date}"
        )
    try:
        with session_scope(cfg.DATABASE_URL) as session:
            statement = build_statement(session, business_date, calendar=calendar, zone_id=zone_id)
            trend = None
            if fmt == "html":
                trend = build_trend(session, business_date, calendar=calendar, zone_id=zone_id)
    except (FutureDate, UnknownZone) as exc:
        raise UsageError(str(exc)) from None
    except StatementUnavailable as exc:
        raise JobFailed(str(exc)) from None
    except (OperationalError, ProgrammingError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise UsageError(
            f"cannot read the report tables ({reason}); check DATABASE_URL and run "
            "`midas-recon db upgrade`"
        ) from None
    text = render(statement, fmt, trend)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomically(output, text)
        click.echo(f"wrote {output}", err=True)


@report.command("refresh")
@click.option(
    "--date",
    "date_text",
    metavar="YYYY-MM-DD",
    help="Only this business date's nightly run, stored anew whatever its state.",
)
@handle_errors
def refresh(date_text: str | None) -> None:
    """Store the statement figures of finished nights that lack them.

    A nightly run stores its coverage, totals and movement when it closes, and the statement
    and its trend read them instead of aggregating every snapshot again. Runs closed before
    `db upgrade` added them (revision 20261204_0011), or whose figures no longer hold (the
    previous date backfilled, a run resumed, a ledger insert open when the run closed), are
    computed afresh by each statement until this command stores them. The figures are the
    same either way; this only makes the statement fast. One transaction per run.
    """
    from worker.business_calendar import utcnow
    from worker.db import night_figures
    from worker.db.session import session_scope

    cfg = settings()
    if date_text:
        dates = [parse_date(date_text)]
    else:
        with session_scope(cfg.DATABASE_URL) as session:
            dates = night_figures.stale_dates(session)
    for day in dates:
        with session_scope(cfg.DATABASE_URL) as session:
            stored = night_figures.refresh(session, day, now=utcnow())
        if not stored and date_text:
            raise JobFailed(f"no finished nightly run for {day}: nothing to store")
        click.echo(f"{day}: {'stored' if stored else 'nothing to store'}")
    if not dates:
        click.echo("every finished nightly run has its figures stored")


@cli.command()
@click.option(
    "--players",
    type=click.IntRange(50, 100_000),
    default=2500,
    show_default=True,
    help="Synthetic players the simulator serves.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the demo database and report (default: a new temporary folder).",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed of the demo.")
@handle_errors
def demo(players: int, output_dir: Path | None, seed: int) -> None:
    """Run the whole thing end to end on the embedded default, in well under a minute.

    Starts the Midas simulator on a loopback port with synthetic players (some mismatched,
    some with payments in flight, some with expired sessions), imports accounts and ledger,
    runs one nightly reconciliation through the production task code on a fresh SQLite file,
    waits for the confirm pass, prints a summary and writes the HTML coin statement. Needs no
    Postgres, Redis or network; ignores DATABASE_URL, REDIS_URL and MIDAS_* settings.
    """
    from worker.demo import DemoError, run_demo

    folder = output_dir or Path(tempfile.mkdtemp(prefix="midas-recon-demo-"))
    try:
        result = run_demo(folder, players=players, seed=seed, echo=click.echo)
    except DemoError as exc:
        raise JobFailed(str(exc)) from None
    click.echo(result.summary())
    if not result.as_planted:
        raise JobFailed("the demo found something other than what it planted (summary above)")


# A statement reads the day before and the 30 days before its date; dates near year 1 or
# 9999 overflow Python's calendar, and no Midas data is that old (or that far ahead).
FIRST_DATE, LAST_DATE = dt.date(2000, 1, 1), dt.date(2999, 12, 31)


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a report."""
    path = path.expanduser()
    if not path.parent.is_dir():
        raise UsageError(f"--output: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
