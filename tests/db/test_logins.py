"""record_login: the service behind the `midas_recon.record_login` task."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from worker.config import ConfigError
from worker.db.crypto import TRANSPORT_VARIABLE, SessionKeyCipher
from worker.db.models import Account
from worker.db.session import session_scope
from worker.intake import seal_session_key
from worker.logs import JsonFormatter, RedactionFilter
from worker.recon.logins import LoginRejected, record_login

pytestmark = pytest.mark.integration

KEY = "HyVFkGl5F5OQWJZZaNzBBg=="
# SESSION_KEY_TRANSPORT_KEY: the game seals session keys with it before sending them.
TRANSPORT_KEY = Fernet.generate_key().decode()
TRANSPORT = SessionKeyCipher([TRANSPORT_KEY], TRANSPORT_VARIABLE)


def sealed(key: str) -> str:
    return seal_session_key(key, TRANSPORT_KEY)


def stored(url: str) -> list[Account]:
    with session_scope(url) as session:
        found = list(session.scalars(select(Account).order_by(Account.id)))
        session.expunge_all()
        return found


def test_a_login_creates_the_account_with_its_key_encrypted(
    any_db_url: str, cipher: SessionKeyCipher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with session_scope(any_db_url) as session:
        record_login(
            session,
            cipher,
            "o6_bmjrPTlm6_2sgVt7hMZOPfL2M",
            "1",
            sealed(KEY),
            "2024-11-24T10:00:00+08:00",
            transport=TRANSPORT,
        )
    (account,) = stored(any_db_url)
    assert (account.openid, account.zone_id) == ("o6_bmjrPTlm6_2sgVt7hMZOPfL2M", "1")
    assert account.last_active_at == dt.datetime(2024, 11, 24, 2, 0, tzinfo=dt.UTC)
    assert account.session_key_enc is not None and KEY not in account.session_key_enc
    assert cipher.decrypt(account.session_key_enc) == KEY
    assert account.session_key_updated_at == account.last_active_at
    assert KEY not in caplog.text and account.session_key_enc not in caplog.text
    assert any(r.getMessage() == "login_recorded" for r in caplog.records)


def test_defaults_zone_1_and_now(any_db_url: str) -> None:
    before = dt.datetime.now(dt.UTC)
    with session_scope(any_db_url) as session:
        record_login(session, None, "o1")  # no key: no cipher needed
    (account,) = stored(any_db_url)
    assert account.zone_id == "1"
    assert account.session_key_enc is None
    assert account.last_active_at is not None
    assert before <= account.last_active_at <= dt.datetime.now(dt.UTC)


def test_later_logins_refresh_and_late_arrivals_do_not_undo(
    any_db_url: str, cipher: SessionKeyCipher
) -> None:
    aware = dt.datetime(2024, 11, 20, 10, 0, tzinfo=dt.UTC)
    with session_scope(any_db_url) as session:
        for key, at in (
            (KEY, aware),
            ("bmV3ZXJrZXk=", aware + dt.timedelta(hours=1)),
            # A task delayed in the queue arrives last with the oldest login.
            ("b2xkZXJrZXk=", aware - dt.timedelta(hours=1)),
        ):
            record_login(session, cipher, "o1", "1", sealed(key), at, transport=TRANSPORT)
        record_login(session, cipher, "o1", "1", "", aware + dt.timedelta(hours=2))  # no key
    (account,) = stored(any_db_url)
    assert account.last_active_at == aware + dt.timedelta(hours=2)
    assert cipher.decrypt(account.session_key_enc or "") == "bmV3ZXJrZXk="
    assert account.session_key_updated_at == aware + dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"openid": ""}, "openid is empty"),
        ({"openid": None}, "openid must be text"),
        ({"openid": 123}, "openid must be text"),
        ({"openid": "o" * 129}, "openid is longer than 128 characters"),
        ({"openid": "o1\nINFO forged"}, "contains characters that are not allowed"),
        ({"zone_id": 1}, "zone_id must be text"),
        ({"zone_id": ""}, "zone_id is empty"),
        ({"session_key": 42}, "session_key must be text"),
        ({"session_key": sealed("not base64!")}, "session_key is not base64 text"),
        ({"session_key": sealed("A" * 300)}, "session_key is longer than 256"),
        # A key in clear (or sealed with another key) is refused, never stored.
        ({"session_key": KEY}, "session_key is not sealed with a key of SESSION_KEY_TRANSPORT_KEY"),
        ({"session_key": seal_session_key(KEY, Fernet.generate_key())}, "is not sealed"),
        ({"at": "2024-11-24T10:00:00"}, "has no UTC offset"),
        ({"at": dt.datetime(2024, 11, 24, 10, 0)}, "has no UTC offset"),
        ({"at": "yesterday"}, "is not an ISO 8601 timestamp"),
        ({"at": 1732442400}, "at must be an ISO 8601 timestamp"),
        ({"at": "2099-01-01T00:00:00Z"}, "is in the future"),
    ],
)
def test_bad_arguments_are_rejected_and_store_nothing(
    sqlite_url: str, cipher: SessionKeyCipher, kwargs: dict[str, object], reason: str
) -> None:
    args: dict[str, object] = {"openid": "o1", "zone_id": "1", "session_key": sealed(KEY)}
    args.update(kwargs)
    with pytest.raises(LoginRejected) as caught, session_scope(sqlite_url) as session:
        record_login(session, cipher, **args, transport=TRANSPORT)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)
    assert KEY not in str(caught.value) and "not base64!" not in str(caught.value)
    assert stored(sqlite_url) == []


def test_a_key_without_a_cipher_is_a_config_error(
    sqlite_url: str, cipher: SessionKeyCipher
) -> None:
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY"):
        with session_scope(sqlite_url) as session:
            record_login(session, None, "o1", "1", sealed(KEY), transport=TRANSPORT)
    with pytest.raises(ConfigError, match="SESSION_KEY_TRANSPORT_KEY is not set"):
        with session_scope(sqlite_url) as session:
            record_login(session, cipher, "o1", "1", sealed(KEY), transport=None)
    assert stored(sqlite_url) == []


def test_the_login_line_is_valid_json_saying_a_key_came(
    sqlite_url: str, cipher: SessionKeyCipher
) -> None:
    """`"with_session_key": true` was redacted by name into `[REDACTED]`: broken JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    logger = logging.getLogger("worker.recon.logins")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with session_scope(sqlite_url) as session:
            record_login(session, cipher, "o1", "1", sealed(KEY), transport=TRANSPORT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (line,) = [json.loads(t) for t in stream.getvalue().splitlines() if "login_recorded" in t]
    assert line["with_session_key"] is True and line["openid"] == "o1"
