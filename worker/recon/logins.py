"""A player logged in: remember the account, its activity and its session key (encrypted).

Called by the Celery task `midas_recon.record_login`, which the game's login handler sends
after `jscode2session`. Task arguments come from outside, so every one is validated here.
The session key arrives sealed with SESSION_KEY_TRANSPORT_KEY (worker/intake.py); a key in
clear is refused: it has crossed the broker already, and accepting it would make that normal.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.config import ConfigError
from worker.db import crypto
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.crypto import TRANSPORT_VARIABLE, SessionKeyCipher, UndecryptableSessionKey
from worker.logs import register_secret
from worker.recon.intake import check_openid, check_session_key, check_timestamp, check_zone_id

log = logging.getLogger(__name__)


class LoginRejected(ValueError):
    """The login's arguments are malformed; retrying cannot help. Never holds the key."""


def record_login(
    session: Session,
    cipher: SessionKeyCipher | None,
    openid: object,
    zone_id: object = "1",
    session_key: object = None,
    at: object = None,
    *,
    transport: SessionKeyCipher | None = None,
) -> None:
    """Upsert the account: activity moves forward only; a newer session key replaces the old.

    `session_key` is sealed with `transport` (SESSION_KEY_TRANSPORT_KEY). `at` is the login time
    (ISO 8601 with offset, or an aware datetime), default now. An empty or absent session_key
    leaves the stored one alone. The ciphers may be None only when no session key is sent.
    """
    now = clock.utcnow()
    try:
        openid = check_openid(openid)
        zone_id = check_zone_id(zone_id)
        sealed = session_key not in (None, "")
        key = check_session_key(unseal(transport, session_key)) if sealed else None
        when = now if at is None else check_timestamp(at, "at", now=now)
    except ValueError as exc:
        raise LoginRejected(str(exc)) from None
    encrypted = crypto.required(cipher).encrypt(key) if key is not None else None
    upsert_accounts(
        session,
        [
            AccountRow(
                openid=openid,
                zone_id=zone_id,
                last_active_at=when,
                session_key_enc=encrypted,
                session_key_at=when if encrypted else None,
            )
        ],
        now=now,
    )
    log.info(
        "login_recorded",
        extra={"openid": openid, "zone_id": zone_id, "with_session_key": encrypted is not None},
    )


def unseal(transport: SessionKeyCipher | None, sealed: object) -> str:
    """The session key inside a sealed value, or ValueError (never quoting the value)."""
    if transport is None:
        raise ConfigError(f"{TRANSPORT_VARIABLE} is not set; it opens the sealed session keys")
    if not isinstance(sealed, str):
        raise ValueError("session_key must be text")
    try:
        key = transport.decrypt(sealed)
    except UndecryptableSessionKey:
        raise ValueError(
            f"session_key is not sealed with a key of {TRANSPORT_VARIABLE} (the game must send "
            "worker.intake.seal_session_key(key, transport_key), never the key itself)"
        ) from None
    register_secret(key)
    return key
