"""`mismatches` (list), `mismatches show|ack|resolve ID`: the cases finance and operators read.

Exit codes: 0 done; 2 for anything the person typed that cannot be done: an unknown case id,
a case already closed (or already acknowledged), an empty note, a bad option.
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import io
import json
from collections.abc import Sequence
from typing import Any

import click

from worker.cli.base import (
    UsageError,
    cli,
    database_errors,
    format_option,
    handle_errors,
    parse_date,
    settings,
    table,
)
from worker.db.models import MismatchCase, MismatchEvent
from worker.fields import CASE_FIELDS
from worker.metrics import OPERATOR_ACTIONS
from worker.recon.console import STATUS_CHOICES
from worker.text import spreadsheet_cell


@cli.group("mismatches", invoke_without_command=True)
@click.option(
    "--status",
    type=click.Choice(STATUS_CHOICES),
    default="open",
    show_default=True,
    help="Which cases: open (suspected, confirmed, acknowledged), all, or one status.",
)
@format_option(
    "json: a list of objects; csv: with a header row. Timestamps are UTC ISO 8601.",
    choices=["table", "json", "csv"],
)
@click.option("--check", "check_name", metavar="NAME", help="Only this check (e.g. balance).")
@click.option("--zone-id", help="Only this zone.")
@click.option("--openid", help="Only this player's cases.")
@click.option(
    "--opened-from",
    metavar="YYYY-MM-DD",
    help="First seen on or after this business date (RECON_TIMEZONE).",
)
@click.option(
    "--opened-to",
    metavar="YYYY-MM-DD",
    help="First seen on or before this business date (RECON_TIMEZONE).",
)
@click.option("--min-delta", type=click.IntRange(0), metavar="COINS", help="Only |delta| >= COINS.")
@click.option(
    "--sort",
    type=click.Choice(["delta", "age"]),
    default="delta",
    show_default=True,
    help="delta: largest |delta| first; age: oldest first.",
)
@click.option("--limit", type=click.IntRange(1), help="At most this many cases.")
@click.pass_context
@handle_errors
def mismatches(
    ctx: click.Context,
    status: str,
    fmt: str,
    check_name: str | None,
    zone_id: str | None,
    openid: str | None,
    opened_from: str | None,
    opened_to: str | None,
    min_delta: int | None,
    sort: str,
    limit: int | None,
) -> None:
    """List mismatch cases (by default the open ones), largest difference first.

    delta is midas_value - ledger_value as last seen. The filters are the console's (/cases).
    Subcommands show one case's history and let an operator acknowledge or resolve it with
    a note.
    """
    if ctx.invoked_subcommand is not None:
        return
    from worker.db.console import CaseQuery, search_cases
    from worker.db.session import session_scope
    from worker.recon.console import opened_between, statuses_of

    s = settings()
    statuses: Sequence[str] | None
    statuses = statuses_of(status)
    start, end = opened_between(
        _date(opened_from, "--opened-from"), _date(opened_to, "--opened-to"), s.calendar
    )
    query = CaseQuery(
        statuses=statuses,
        check=check_name,
        zone_id=zone_id,
        openid=openid,
        opened_from=start,
        opened_before=end,
        min_abs_delta=min_delta,
        sort=sort,
        limit=limit,
    )
    with database_errors(), session_scope(s.DATABASE_URL) as session:
        rows = [_case_row(c) for c in search_cases(session, query)]
    if fmt == "json":
        click.echo(json.dumps([_jsonable(r) for r in rows], indent=2))
    elif fmt == "csv":
        click.echo(_csv(rows), nl=False)
    elif not rows:
        click.echo(f"no mismatch cases ({status})")
    else:
        click.echo(table(CASE_FIELDS, [[_text(r[f]) for f in CASE_FIELDS] for r in rows]))


@mismatches.command("show")
@click.argument("case_id", metavar="ID", type=int)
@format_option("json: the case's fields plus an `events` list.")
@handle_errors
def show(case_id: int, fmt: str) -> None:
    """Show case ID and its event history.

    One line per transition: when, who (system or operator:NAME), from and to, the Midas and
    ledger values seen, the snapshot and run that moved it, and the operator's note.
    """
    from worker.db.cases import case_events, get_case
    from worker.db.session import session_scope

    with database_errors(), session_scope(settings().DATABASE_URL) as session:
        case = get_case(session, case_id)
        if case is None:
            raise UsageError(f"no mismatch case {case_id}")
        row = _case_row(case)
        events = [_event_row(e) for e in case_events(session, case_id)]
    if fmt == "json":
        click.echo(json.dumps(_jsonable({**row, "events": events}), indent=2))
        return
    for name in CASE_FIELDS:
        click.echo(f"{name:>13}  {_text(row[name])}")
    click.echo("")
    columns = ("at", "actor", "from", "to", "midas", "ledger", "snapshot", "run", "note")
    click.echo(
        table(
            columns,
            [
                [
                    _text(e["at"]),
                    e["actor"],
                    _text(e["from_status"]),
                    e["to_status"],
                    _text(e["midas_value"]),
                    _text(e["ledger_value"]),
                    _text(e["snapshot_id"]),
                    _text(e["run_id"]),
                    _text(e["note"]),
                ]
                for e in events
            ],
        )
    )


_NOTE = click.option(
    "--note", required=True, help="Why (a ticket, a finding); stored in the case's history."
)
_ACTOR = click.option(
    "--actor",
    metavar="NAME",
    default=None,
    help="Who is acting, recorded as operator:NAME.  [default: your OS user name]",
)


@mismatches.command("ack")
@click.argument("case_id", metavar="ID", type=int)
@_NOTE
@_ACTOR
@handle_errors
def ack(case_id: int, note: str, actor: str | None) -> None:
    """Acknowledge case ID with a note; it stays open.

    For a suspected or confirmed case that someone is handling. It is resolved automatically
    when a later snapshot agrees, or by `mismatches resolve`.
    """
    from worker.recon.cases import acknowledge

    _act(acknowledge, case_id, note, actor)


@mismatches.command("resolve")
@click.argument("case_id", metavar="ID", type=int)
@_NOTE
@_ACTOR
@handle_errors
def resolve_cmd(case_id: int, note: str, actor: str | None) -> None:
    """Resolve open case ID by hand, with a note.

    For a difference settled outside this tool (e.g. corrected in the ledger or with Midas).
    A later difference on the same check opens a new case.
    """
    from worker.recon.cases import resolve

    _act(resolve, case_id, note, actor)


def _act(action: Any, case_id: int, note: str, actor: str | None) -> None:
    from worker.db.session import session_scope
    from worker.recon.cases import CaseError

    who = actor if actor is not None else _os_user()
    with database_errors():
        try:
            with session_scope(settings().DATABASE_URL) as session:
                case = action(session, case_id, note, who)
                status = case.status
        except CaseError as exc:
            raise UsageError(str(exc)) from None
    # Counted after the commit: an operator's change is what the counter shows.
    OPERATOR_ACTIONS.labels(f"case_{status}").inc()
    click.echo(f"case {case_id} {status}")


def _date(value: str | None, option: str) -> dt.date | None:
    return None if value is None else parse_date(value, option)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        raise UsageError("cannot tell who you are; pass --actor NAME") from None


# -- rendering -------------------------------------------------------------------------------


def _case_row(case: MismatchCase) -> dict[str, Any]:
    return {name: getattr(case, name) for name in CASE_FIELDS}


def _event_row(event: MismatchEvent) -> dict[str, Any]:
    names = ("at", "actor", "from_status", "to_status", "midas_value", "ledger_value")
    return {name: getattr(event, name) for name in (*names, "snapshot_id", "run_id", "note")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return _stamp(value)
    return value


def _stamp(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat()


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):  # whole seconds for people; JSON keeps the precision
        return value.astimezone(dt.UTC).isoformat(timespec="seconds")
    return " ".join(str(value).split())  # one line per row, whatever a note holds


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CASE_FIELDS)
    for row in rows:
        writer.writerow(
            ["" if row[f] is None else spreadsheet_cell(_jsonable(row[f])) for f in CASE_FIELDS]
        )
    return out.getvalue()
