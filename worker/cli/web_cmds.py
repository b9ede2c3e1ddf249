"""`web` (the operators' console), `operators add|list|disable`, and `account OPENID` (one
account's history on the command line, as the console's account page shows it)."""

from __future__ import annotations

import datetime as dt
import json
import sys

import click

from worker import business_calendar as clock
from worker.cli.base import (
    UsageError,
    cli,
    database_errors,
    format_option,
    handle_errors,
    limit_option,
    settings,
    table,
)


@cli.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@handle_errors
def web(host: str, port: int) -> None:
    """Serve the operators' console (cases, accounts, runs, statements, health, /api/...).

    Operators log in with a name and password from `midas-recon operators add`, or through a
    single sign-on proxy that sets RECON_WEB_AUTH_HEADER (trusted only from
    RECON_WEB_TRUSTED_PROXIES). Put it behind TLS: cookies are Secure over https.
    """
    from worker.web.server import make_server

    s = settings()
    if s.RECON_WEB_SESSION_SECRET is not None:
        s.require("RECON_WEB_SESSION_SECRET")  # in production: no placeholder, no short key
    server = make_server(s, host, port)
    click.echo(f"midas-recon console on http://{host}:{server.effective_port}/", err=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


# -- operators ----------------------------------------------------------------------------------


@cli.group("operators")
def operators() -> None:
    """People who may log in to the console (Argon2 password hashes, never passwords)."""


@operators.command("add")
@click.argument("name")
@handle_errors
def operators_add(name: str) -> None:
    """Add operator NAME; the password is read from standard input.

    At a terminal it is asked for twice without echo; from a pipe the first line is the
    password (`printf '%s\\n' "$PW" | midas-recon operators add alice`). At least 12 characters.
    """
    from worker.db.session import session_scope
    from worker.web.operators import OperatorError, add_operator

    password = _read_password()
    with database_errors():
        try:
            with session_scope(settings().DATABASE_URL) as session:
                add_operator(session, name, password, now=clock.utcnow())
        except OperatorError as exc:
            raise UsageError(str(exc)) from None
    click.echo(f"operator {name} added")


@operators.command("list")
@format_option("json: one object per operator.")
@handle_errors
def operators_list(fmt: str) -> None:
    """Every operator: name, created, last login, disabled."""
    from worker.db.session import session_scope
    from worker.web.operators import list_operators

    with database_errors(), session_scope(settings().DATABASE_URL) as session:
        rows = list_operators(session)
    data = [
        {
            "name": o.name,
            "created_at": _stamp(o.created_at),
            "last_login_at": _stamp(o.last_login_at),
            "disabled_at": _stamp(o.disabled_at),
        }
        for o in rows
    ]
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif not data:
        click.echo("no operators yet: midas-recon operators add NAME")
    else:
        header = ("name", "created_at", "last_login_at", "disabled_at")
        click.echo(table(header, [[d[h] or "-" for h in header] for d in data]))


@operators.command("disable")
@click.argument("name")
@handle_errors
def operators_disable(name: str) -> None:
    """Disable operator NAME: no more logins, and open sessions end at their next request."""
    from worker.db.session import session_scope
    from worker.web.operators import OperatorError, disable_operator

    with database_errors():
        try:
            with session_scope(settings().DATABASE_URL) as session:
                disable_operator(session, name, now=clock.utcnow())
        except OperatorError as exc:
            raise UsageError(str(exc)) from None
    click.echo(f"operator {name} disabled")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = click.prompt("Password", hide_input=True, err=True)
        again = click.prompt("Again", hide_input=True, err=True)
        if first != again:
            raise UsageError("the two passwords differ")
        return str(first)
    line = sys.stdin.readline()
    if not line:
        raise UsageError("no password on standard input")
    return line.rstrip("\r\n")


# -- account ------------------------------------------------------------------------------------


@cli.command("account")
@click.argument("openid")
@click.option("--zone-id", default="1", show_default=True, help="The account's zone.")
@format_option("json: the console's /api/accounts document.")
@limit_option(400, most=5000, help="Newest snapshots to show.")
@handle_errors
def account_cmd(openid: str, zone_id: str, fmt: str, limit: int) -> None:
    """One account's history: login state, every snapshot against the ledger's running sums
    check by check, the ledger entries each fetch saw, and its cases with every event."""
    from worker.db.session import session_scope
    from worker.recon.console import account_history
    from worker.recon.rules import checks_from_settings
    from worker.web import present

    s = settings()
    with database_errors(), session_scope(s.DATABASE_URL) as session:
        h = account_history(session, openid, zone_id, checks_from_settings(s), limit=limit)
        doc = present.history(h)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    login = doc["login"]
    click.echo(f"account {openid} (zone {zone_id})")
    click.echo(f"  known: {'yes' if login['known'] else 'no'}")
    click.echo(f"  last active: {login['last_active_at'] or '-'}")
    key = (
        f"stored, updated {login['session_key_updated_at']}" if login["has_session_key"] else "none"
    )
    click.echo(f"  session key: {key}")
    click.echo("")
    if not doc["fetches"]:
        click.echo("no snapshots")
    else:
        header = ["fetched_at", "run", "status", *(f"{c} midas/ledger" for c in doc["checks"])]
        rows = []
        for f in doc["fetches"]:
            cells = [f"{p['midas_value']}/{p['ledger_value']}" for p in f["checks"]]
            if not cells:
                cells = ["-"] * len(doc["checks"])
            status = f["status"] if f["errcode"] is None else f"{f['status']} ({f['errcode']})"
            rows.append([f["fetched_at"], str(f["run_id"]), status, *cells])
        click.echo(table(header, rows))
        if doc["truncated"]:
            click.echo(f"(older snapshots exist; --limit {limit} shown)")
    click.echo("")
    if not doc["cases"]:
        click.echo("no cases")
    for case in doc["cases"]:
        click.echo(
            f"case {case['id']} {case['check']} {case['status']}: midas {case['midas_value']}, "
            f"ledger {case['ledger_value']}, delta {case['delta']}"
        )
        for e in case["events"]:
            note = " ".join((e["note"] or "").split())
            click.echo(
                f"  {e['at']}  {e['actor']}  {e['from_status'] or '-'} -> {e['to_status']}"
                + (f"  {note}" if note else "")
            )


def _stamp(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat(timespec="seconds")
