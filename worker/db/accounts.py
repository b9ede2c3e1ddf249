"""Accounts repository: every SQL statement that writes `accounts` (imports, logins, rekey).

Upserts are keyed by (openid, zone_id) and merge rather than overwrite:
- `last_active_at` never moves backwards (the later of stored and supplied wins);
- a session key replaces the stored one only when it is strictly newer (its `as of` time is
  later than `session_key_updated_at`), so a stale export cannot undo a fresh login;
- an absent value (None) leaves the stored one alone; nothing here ever clears a key.
Rows go to the database in batches through executemany: neither one statement per row nor one
giant statement for a million-row file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.config import ConfigError, Settings
from worker.db.crypto import SessionKeyCipher, UndecryptableSessionKey
from worker.db.models import Account
from worker.db.session import dialect_insert, session_scope

BATCH_SIZE = 2000

_accounts = cast(Table, Account.__table__)


@dataclass(frozen=True, slots=True)
class AccountRow:
    """One account as supplied by the game; the session key is already encrypted."""

    openid: str
    zone_id: str
    last_active_at: dt.datetime | None = None
    session_key_enc: str | None = field(default=None, repr=False)
    # When the supplied session key was current (the login time); required with a key.
    session_key_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class UpsertResult:
    new: int
    updated: int

    @property
    def total(self) -> int:
        return self.new + self.updated


def upsert_accounts(
    session: Session,
    rows: Iterable[AccountRow],
    *,
    now: dt.datetime | None = None,
    batch_size: int = BATCH_SIZE,
) -> UpsertResult:
    """Insert or merge `rows` (each account at most once); the caller's transaction commits."""
    now = now or clock.utcnow()
    new = updated = 0
    source = iter(rows)
    for batch in iter(lambda: list(islice(source, batch_size)), []):
        known = _known_keys(session, batch)
        session.execute(_upsert_statement(session), [_params(row, now) for row in batch])
        fresh = sum(1 for row in batch if (row.openid, row.zone_id) not in known)
        new += fresh
        updated += len(batch) - fresh
    return UpsertResult(new=new, updated=updated)


def _upsert_statement(session: Session) -> Any:
    stmt = dialect_insert(session, _accounts)
    incoming, stored = stmt.excluded, _accounts.c
    newer_key = and_(
        incoming.session_key_enc.is_not(None),
        or_(
            stored.session_key_updated_at.is_(None),
            incoming.session_key_updated_at > stored.session_key_updated_at,
        ),
    )
    # GREATEST() ignores NULLs on Postgres but SQLite's max() returns NULL: spell it out.
    later_activity = case(
        (incoming.last_active_at.is_(None), stored.last_active_at),
        (stored.last_active_at.is_(None), incoming.last_active_at),
        (incoming.last_active_at > stored.last_active_at, incoming.last_active_at),
        else_=stored.last_active_at,
    )
    return stmt.on_conflict_do_update(
        index_elements=[stored.openid, stored.zone_id],
        set_={
            "last_active_at": later_activity,
            "session_key_enc": case(
                (newer_key, incoming.session_key_enc), else_=stored.session_key_enc
            ),
            "session_key_updated_at": case(
                (newer_key, incoming.session_key_updated_at), else_=stored.session_key_updated_at
            ),
            "updated_at": incoming.updated_at,
        },
    )


def _params(row: AccountRow, now: dt.datetime) -> dict[str, Any]:
    if row.session_key_enc is not None and row.session_key_at is None:
        raise ValueError("a session key needs the time it was current (session_key_at)")
    return {
        "openid": row.openid,
        "zone_id": row.zone_id,
        "last_active_at": row.last_active_at,
        "session_key_enc": row.session_key_enc,
        "session_key_updated_at": row.session_key_at if row.session_key_enc else None,
        "updated_at": now,
    }


def _known_keys(session: Session, batch: list[AccountRow]) -> set[tuple[str, str]]:
    # `openid IN (...)` walks the (openid, zone_id) unique index; a row-value IN over both
    # columns made Postgres scan the whole table once per batch.
    found = session.execute(
        select(_accounts.c.openid, _accounts.c.zone_id).where(
            _accounts.c.openid.in_({row.openid for row in batch})
        )
    )
    return {(openid, zone_id) for openid, zone_id in found}


@dataclass(frozen=True, slots=True)
class RekeyBatch:
    """What one `rekey_session_keys` call did; `last_id` is where the next call starts."""

    last_id: int
    rekeyed: int  # re-encrypted, less any a concurrent login replaced first (those are new)
    current: int
    undecryptable: list[int]  # account ids whose key no configured key opens
    finished: bool
    forgotten: int = 0  # undecryptable keys dropped (forget_lost)


def rekey_session_keys(
    session: Session,
    cipher: SessionKeyCipher,
    *,
    after_id: int = 0,
    limit: int = 1000,
    forget_lost: bool = False,
) -> RekeyBatch:
    """Re-encrypt with the newest key the stored session keys of accounts with id > after_id.

    Call it repeatedly (one transaction each) until `finished`, so that a rotation over
    millions of accounts never holds row locks for long. `forget_lost` drops the keys no
    configured key opens (the key that made them is gone for good): those accounts are
    fetched without a key until their players log in again, instead of as errors.
    """
    rows = session.execute(
        select(_accounts.c.id, _accounts.c.session_key_enc)
        .where(_accounts.c.id > after_id, _accounts.c.session_key_enc.is_not(None))
        .order_by(_accounts.c.id)
        .limit(limit)
    ).all()
    changes: list[dict[str, Any]] = []
    current = 0
    undecryptable: list[int] = []
    for account_id, token in rows:
        if cipher.is_current(token):
            current += 1
            continue
        try:
            changes.append({"b_id": account_id, "b_old": token, "b_new": cipher.rotate(token)})
        except UndecryptableSessionKey:
            undecryptable.append(account_id)
    # Compare-and-set on the old ciphertext: a login that stored a new key meanwhile wins.
    same_key = and_(
        _accounts.c.id == bindparam("b_id"), _accounts.c.session_key_enc == bindparam("b_old")
    )
    if changes:
        session.execute(
            update(_accounts).where(same_key).values(session_key_enc=bindparam("b_new")),
            changes,
        )
    gone = set(undecryptable) if forget_lost else set()
    lost = {account_id: token for account_id, token in rows if account_id in gone}
    if lost:
        session.execute(
            update(_accounts)
            .where(same_key)
            .values(session_key_enc=None, session_key_updated_at=None),
            [{"b_id": a, "b_old": t} for a, t in lost.items()],
        )
    return RekeyBatch(
        last_id=rows[-1][0] if rows else after_id,
        rekeyed=len(changes),
        current=current,
        undecryptable=[] if forget_lost else undecryptable,
        finished=len(rows) < limit,
        forgotten=len(lost),
    )


def check_a_stored_key_opens(settings: Settings) -> None:
    """ConfigError when the session key of the newest account with one opens with no
    SESSION_KEY_ENCRYPTION_KEY.

    For the production start check: with a wrong key every account would be an error. A
    database not reachable (or not migrated) yet is the tasks' business: they retry, and
    `midas-recon db upgrade` says what is wrong.
    """
    if settings.SESSION_KEY_ENCRYPTION_KEY is None:
        return
    cipher = SessionKeyCipher.from_settings(settings)
    try:
        with session_scope(settings.DATABASE_URL) as session:
            stored = session.scalar(
                select(_accounts.c.session_key_enc)
                .where(_accounts.c.session_key_enc.is_not(None))
                .order_by(_accounts.c.id.desc())
                .limit(1)
            )
    except SQLAlchemyError:
        return
    if stored is None:
        return
    try:
        cipher.decrypt(stored)
    except UndecryptableSessionKey:
        raise ConfigError(
            "SESSION_KEY_ENCRYPTION_KEY does not open the stored session keys; list the key "
            "that encrypted them (new,old) and run `midas-recon accounts rekey`"
        ) from None


def stored_session_key(session: Session, openid: str, zone_id: str) -> str | None:
    """The account's session key as stored (encrypted), None when none is or no account."""
    return session.scalar(
        select(Account.session_key_enc).where(Account.openid == openid, Account.zone_id == zone_id)
    )


def account_id(session: Session, openid: str, zone_id: str) -> int | None:
    return session.execute(
        select(_accounts.c.id).where(_accounts.c.openid == openid, _accounts.c.zone_id == zone_id)
    ).scalar_one_or_none()
