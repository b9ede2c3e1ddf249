"""`balance OPENID`: ask Midas now, with the configured credentials ("what does Midas say?")."""

from __future__ import annotations

import json
import sys

import click

from worker.cli.base import JobFailed, UsageError, cli, format_option, handle_errors, settings
from worker.config import Settings
from worker.midas.types import Balance

# API.md §1: the v1 names, in the order of the documentation table.
_V1_FIELDS = (
    "balance",
    "gen_balance",
    "first_save",
    "save_amt",
    "save_sum",
    "cost_sum",
    "present_sum",
)


@cli.command("balance")
@click.argument("openid")
@click.option("--zone-id", default="1", show_default=True, help="Zone of the account.")
@click.option(
    "--session-key-from-db/--no-session-key-from-db",
    default=True,
    show_default=True,
    help="Use the session_key stored for the account (decrypted with "
    "SESSION_KEY_ENCRYPTION_KEY). Only read when needed: v2, or v1 with MIDAS_SEND_MP_SIG.",
)
@click.option(
    "--session-key-stdin",
    is_flag=True,
    help="Read the session_key from the first line of stdin instead (never pass a key as an "
    "argument: it would show in the process list and the shell history).",
)
@format_option(
    "json prints one object with the v1 field names of the Midas docs, whatever "
    "MIDAS_API_VERSION is."
)
@handle_errors
def balance_command(
    openid: str, zone_id: str, session_key_from_db: bool, session_key_stdin: bool, fmt: str
) -> None:
    """Fetch one account's Midas balance and counters now and print them.

    Uses MIDAS_API_VERSION, MIDAS_ENV and the configured credentials; the request goes
    through the same rate limiter as the workers. Exit 0 with the answer; 1 when Midas
    answers an error (one line with the code and its meaning) or cannot be reached; 2 for
    bad configuration or usage.
    """
    import redis

    from worker.logs import configure_logging
    from worker.midas.client import MidasClient
    from worker.midas.limiter import make_limiter

    s = settings()
    configure_logging(s, level="ERROR")  # the answer or one error line, no log chatter
    if not openid.strip() or not zone_id.strip():
        raise UsageError("OPENID and --zone-id must not be empty")
    needs_key = s.MIDAS_API_VERSION == "v2" or s.MIDAS_SEND_MP_SIG
    session_key: str | None = None
    if needs_key and session_key_stdin:
        session_key = sys.stdin.readline().strip() or None
    elif needs_key and session_key_from_db:
        session_key = _stored_session_key(s, openid, zone_id)
    try:
        with MidasClient.from_settings(s, limiter=make_limiter(s)) as client:
            result = client.get_balance(openid, zone_id, session_key)
    except redis.RedisError as exc:
        raise JobFailed(f"Redis unavailable ({type(exc).__name__}); check REDIS_URL") from None
    click.echo(_render(s, openid, zone_id, result, fmt))


def _stored_session_key(s: Settings, openid: str, zone_id: str) -> str | None:
    """The account's session_key in clear, or None when none is stored."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db.accounts import stored_session_key
    from worker.db.crypto import SessionKeyCipher, UndecryptableSessionKey
    from worker.db.session import session_scope

    cipher = SessionKeyCipher.from_settings(s)  # ConfigError (exit 2) when the key is unset
    try:
        with session_scope(s.DATABASE_URL) as db:
            stored = stored_session_key(db, openid, zone_id)
    except SQLAlchemyError as exc:
        raise UsageError(
            f"cannot read the session_key from DATABASE_URL ({type(exc).__name__}); run "
            "`midas-recon db upgrade`, or use --no-session-key-from-db / --session-key-stdin"
        ) from None
    if stored is None:
        return None
    try:
        return cipher.decrypt(stored)
    except UndecryptableSessionKey as exc:
        raise UsageError(str(exc)) from None


def _render(s: Settings, openid: str, zone_id: str, result: Balance, fmt: str) -> str:
    values = result.as_v1_dict()
    if fmt == "json":
        out: dict[str, object] = {
            "openid": openid,
            "zone_id": zone_id,
            "api_version": result.api_version,
            "env": s.MIDAS_ENV,
        }
        out.update({name: values[name] for name in _V1_FIELDS})
        return json.dumps(out)
    rows = [
        ("openid", openid),
        ("zone_id", zone_id),
        ("api", f"{result.api_version} {s.MIDAS_ENV}"),
    ]
    rows += [(name, _cell(values[name])) for name in _V1_FIELDS]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)
