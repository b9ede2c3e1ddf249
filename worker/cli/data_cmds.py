"""`db upgrade|check|retention`, `accounts import|rekey`, `ledger import`: schema and data.

Imports are one transaction per file: a bad row rejects the whole file (exit 2) with its row
number and reason, and nothing is stored.
"""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy.engine import make_url

from worker.cli.base import (
    JobFailed,
    UsageError,
    broker,
    cli,
    database_errors,
    handle_errors,
    settings,
)
from worker.config import Settings
from worker.vocabulary import RunKind


def _where(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _input_file(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return path


# -- db -------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The database (DATABASE_URL): apply and check the migrations, drop old snapshot months."""


@db_group.command("upgrade")
@click.option(
    "--revision",
    default="head",
    show_default=True,
    help="Migrate up to this revision id (e.g. 20261124_0001).",
)
@handle_errors
def db_upgrade(revision: str) -> None:
    """Apply the migrations; safe to run again (and from several processes at once)."""
    from alembic.util.exc import CommandError

    from worker.db.migrate import current, upgrade

    url = settings().DATABASE_URL
    with database_errors():
        before = current(url)
        try:
            upgrade(url, revision)
        except CommandError as exc:  # an unknown revision id
            raise UsageError(str(exc)) from None
        after = current(url)
    if before == after:
        click.echo(f"database {_where(url)} already at {after}; nothing to do")
    else:
        click.echo(f"database {_where(url)} upgraded from {before or 'empty'} to {after}")


@db_group.command("check")
@handle_errors
def db_check() -> None:
    """Exit 0 when the database is at the newest migration and matches the models, else 1."""
    from worker.db.migrate import SchemaMismatch, check

    url = settings().DATABASE_URL
    with database_errors():
        try:
            check(url)
        except SchemaMismatch as exc:
            raise JobFailed(str(exc)) from None
    click.echo(f"database {_where(url)} matches the models")


@db_group.command("retention")
@click.option(
    "--keep-months",
    type=int,
    required=True,
    help="Months of snapshots to keep: the current one and the N-1 before it (at least 2).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be dropped; drop nothing.")
@click.option("--yes", is_flag=True, help="Drop without asking for confirmation.")
@handle_errors
def db_retention(keep_months: int, dry_run: bool, yes: bool) -> None:
    """Drop the monthly partitions of balance_snapshots older than --keep-months (Postgres).

    Lists each partition it would drop with its month and row count, then asks (unless --yes)
    and detaches and drops each one. Export the statements of those months first: their
    snapshots are gone for good (docs/finance.md). A month holding a snapshot that an event of
    a still open case points at is refused, and then nothing is dropped.

    Exit codes: 0 dropped what was listed (or nothing to drop, or --dry-run); 1 not
    confirmed, nothing dropped; 2 refused (an open case needs an old month, --keep-months
    below 2, a SQLite database), nothing dropped.
    """
    from worker import business_calendar as clock
    from worker.db.session import session_scope
    from worker.recon.retention import RetentionRefused, apply_retention, plan_retention

    cfg = settings()
    today = cfg.calendar.today(clock.utcnow())
    with database_errors():
        try:
            with session_scope(cfg.DATABASE_URL) as session:
                plan = plan_retention(session, today, keep_months)
        except RetentionRefused as exc:
            raise UsageError(str(exc)) from None
        click.echo(
            f"keeping {plan.first_kept:%Y-%m} and later (--keep-months {keep_months},"
            f" business date {today})"
        )
        if not plan.drop:
            click.echo("no partition older than that; nothing to drop")
            return
        verb = "would drop" if dry_run or plan.blocked else "to drop"
        click.echo(f"{verb} {len(plan.drop)} partition(s):")
        for p in plan.drop:
            click.echo(f"  {p.name}  {p.month:%Y-%m}  {p.rows} snapshots")
        if plan.blocked:
            held = "; ".join(
                f"{b.partition.name} holds {b.referenced} snapshot(s) events of open cases point at"
                for b in plan.blocked
            )
            raise UsageError(
                f"refused: {held}. Resolve those cases, or keep more months; nothing dropped"
            )
        if dry_run:
            click.echo("dry run: nothing dropped")
            return
        if not yes and not click.confirm("drop them for good?", default=False):
            raise JobFailed("not confirmed; nothing dropped")
        try:
            with session_scope(cfg.DATABASE_URL) as session:
                # Planned again under the drop's own transaction: what was listed, or nothing.
                again = plan_retention(session, today, keep_months)
                if [p.name for p in again.drop] != [p.name for p in plan.drop]:
                    raise RetentionRefused("the partitions changed while asking; run it again")
                dropped = apply_retention(session, again)
        except RetentionRefused as exc:
            raise UsageError(f"refused: {exc}; nothing dropped") from None
    for p in dropped:
        click.echo(f"dropped {p.name} ({p.month:%Y-%m}, {p.rows} snapshots)")


# -- accounts -------------------------------------------------------------------------------


@cli.group("accounts")
def accounts_group() -> None:
    """The accounts to reconcile and their session keys (encrypted at rest)."""


@accounts_group.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@handle_errors
def accounts_import(file: Path) -> None:
    """Upsert accounts from a CSV file with header openid,zone_id,session_key,last_active_at.

    session_key and last_active_at are optional (columns or cells). Timestamps are ISO 8601
    with a UTC offset, e.g. 2026-11-24T10:00:00+08:00. Re-importing is harmless: activity only
    moves forward and a stored session key is replaced only by a newer one (dated by the row's
    last_active_at, else by the import). Session keys need SESSION_KEY_ENCRYPTION_KEY.
    """
    from worker.db.accounts import upsert_accounts
    from worker.db.crypto import SessionKeyCipher
    from worker.db.session import session_scope
    from worker.recon.intake import IntakeError, read_accounts_csv

    cfg = settings()
    cipher = SessionKeyCipher.from_settings(cfg) if cfg.SESSION_KEY_ENCRYPTION_KEY else None
    try:
        rows = read_accounts_csv(_input_file(file), cipher=cipher)
        with database_errors(), session_scope(cfg.DATABASE_URL) as session:
            result = upsert_accounts(session, rows)
    except IntakeError as exc:
        raise UsageError(f"{file}: {exc}; nothing was imported") from None
    click.echo(f"{file}: {result.total} accounts, {result.new} new, {result.updated} updated")


@accounts_group.command("rekey")
@click.option(
    "--batch-size",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Accounts per transaction.",
)
@click.option(
    "--forget-lost",
    is_flag=True,
    help="Drop the session keys no configured key opens (their key is lost for good): those "
    "accounts wait for their players' next login instead of failing every run.",
)
@handle_errors
def accounts_rekey(batch_size: int, forget_lost: bool) -> None:
    """Re-encrypt every stored session key with the newest SESSION_KEY_ENCRYPTION_KEY.

    To rotate: put the new key first in SESSION_KEY_ENCRYPTION_KEY (new,old), run this, then
    remove the old key. Safe to interrupt and run again. Exits 1 if some keys open with none
    of the configured keys (their account ids are listed; the keys are left as they are,
    unless --forget-lost). Runs count such accounts as errors, and a production worker refuses
    to start while the newest stored key does not open.
    """
    from worker.db.accounts import rekey_session_keys
    from worker.db.crypto import SessionKeyCipher
    from worker.db.session import session_scope

    cfg = settings()
    cipher = SessionKeyCipher.from_settings(cfg)
    last_id = rekeyed = current = forgotten = 0
    undecryptable: list[int] = []
    with database_errors():
        while True:
            with session_scope(cfg.DATABASE_URL) as session:
                batch = rekey_session_keys(
                    session, cipher, after_id=last_id, limit=batch_size, forget_lost=forget_lost
                )
            last_id = batch.last_id
            rekeyed += batch.rekeyed
            current += batch.current
            forgotten += batch.forgotten
            undecryptable.extend(batch.undecryptable)
            if batch.finished:
                break
    dropped = f", {forgotten} lost keys forgotten" if forget_lost else ""
    click.echo(
        f"session keys: {rekeyed} re-encrypted, {current} already on the newest key{dropped}"
    )
    if undecryptable:
        shown = ", ".join(str(i) for i in undecryptable[:20])
        more = f" and {len(undecryptable) - 20} more" if len(undecryptable) > 20 else ""
        raise JobFailed(
            f"{len(undecryptable)} session keys open with no configured key (account ids "
            f"{shown}{more}); add the key that made them to SESSION_KEY_ENCRYPTION_KEY, or "
            "drop them with --forget-lost"
        )


# -- ledger ---------------------------------------------------------------------------------


@cli.group("ledger")
def ledger_group() -> None:
    """The game's own coin ledger, which the reconciliation compares Midas against."""


@ledger_group.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--recheck/--no-recheck",
    default=True,
    show_default=True,
    help="Re-fetch the accounts whose last comparison missed rows of this file (rows dated "
    "before a fetch already made): in this process without REDIS_URL, by the workers with it.",
)
@handle_errors
def ledger_import(file: Path, recheck: bool) -> None:
    """Import a CSV file with header bill_no,openid,zone_id,kind,amount,occurred_at.

    kind is save (top-up), cost (spend), cancel (reversal of a spend) or present (gift);
    amount is a positive whole number of coins; occurred_at is ISO 8601 with a UTC offset.
    One transaction: a bad row rejects the file. Rows already stored identically are skipped,
    so re-importing is harmless; a known bill_no with different content is an error. The game
    may also insert into the ledger_entries table directly (docs).

    A late file (rows dated before fetches already compared) makes those comparisons stale:
    the accounts concerned are fetched again, so their cases follow the complete ledger.
    """
    from worker.db.ledger import LedgerConflict, import_entries, last_id
    from worker.db.session import session_scope
    from worker.recon.intake import IntakeError, read_ledger_csv

    cfg = settings()
    try:
        rows = read_ledger_csv(_input_file(file), calendar=cfg.calendar)
        with database_errors(), session_scope(cfg.DATABASE_URL) as session:
            before = last_id(session)
            result = import_entries(session, rows)
    except (IntakeError, LedgerConflict) as exc:
        raise UsageError(f"{file}: {exc}; nothing was imported") from None
    click.echo(
        f"{file}: {result.inserted + result.already_present} entries, {result.inserted} new, "
        f"{result.already_present} already present"
    )
    if result.inserted and recheck:
        _recheck_late_accounts(cfg, before)


def _recheck_late_accounts(cfg: Settings, before: int) -> None:
    """Recheck the accounts a late file made stale (see ledger_import)."""
    from functools import partial

    from worker.db.session import after_commit, session_scope
    from worker.recon.rechecks import plan_late_ledger_rechecks
    from worker.recon.runs import batch_size

    with database_errors(), session_scope(cfg.DATABASE_URL) as session:
        batches = plan_late_ledger_rechecks(session, cfg, after_id=before, size=batch_size(cfg))
        if batches and not cfg.embedded:
            from worker import dispatch

            after_commit(session, broker(lambda: dispatch.send_batches(batches, RunKind.RECHECK)))
    if not batches:
        return
    planned = sum(len(b.account_ids) for b in batches)
    run_id = batches[0].run_id
    if not cfg.embedded:
        click.echo(f"recheck run #{run_id}: {planned} accounts compared before these rows, sent")
        return
    from worker.midas.limiter import make_limiter
    from worker.recon.runs import FetchDeps, drive

    click.echo(f"recheck run #{run_id}: {planned} accounts compared before these rows, fetching")
    deps = FetchDeps.from_settings(cfg, limiter=make_limiter(cfg))
    with database_errors():
        drive(
            partial(session_scope, cfg.DATABASE_URL),
            deps,
            run_id,
            size=batch_size(cfg),
            first=batches,
        )
