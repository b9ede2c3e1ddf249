"""Accounts upsert, import and rekey on a real database; session keys never stored in clear."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from worker.db.accounts import AccountRow, UpsertResult, rekey_session_keys, upsert_accounts
from worker.db.crypto import SessionKeyCipher
from worker.db.models import Account
from worker.db.session import session_scope
from worker.recon.intake import IntakeError, read_accounts_csv

pytestmark = pytest.mark.integration

T0 = dt.datetime(2024, 11, 20, 10, 0, tzinfo=dt.UTC)
NOW = dt.datetime(2024, 11, 24, 12, 0, tzinfo=dt.UTC)
KEY_A = "HyVFkGl5F5OQWJZZaNzBBg=="
KEY_B = "tiihtNczf5v6AKRyjwEUhQ=="

WriteCsv = Callable[..., Path]


def upsert(url: str, *rows: AccountRow, batch_size: int = 2000) -> UpsertResult:
    with session_scope(url) as session:
        return upsert_accounts(session, rows, now=NOW, batch_size=batch_size)


def account(url: str, openid: str = "o1", zone_id: str = "1") -> Account:
    with session_scope(url) as session:
        found = session.scalars(
            select(Account).where(Account.openid == openid, Account.zone_id == zone_id)
        ).one()
        session.expunge(found)
        return found


def keyed(cipher: SessionKeyCipher, key: str, at: dt.datetime, **kw: object) -> AccountRow:
    return AccountRow(
        openid="o1",
        zone_id="1",
        last_active_at=at,
        session_key_enc=cipher.encrypt(key),
        session_key_at=at,
        **kw,  # type: ignore[arg-type]
    )


def test_upsert_inserts_then_merges(any_db_url: str, cipher: SessionKeyCipher) -> None:
    assert upsert(any_db_url, keyed(cipher, KEY_A, T0)) == UpsertResult(new=1, updated=0)
    first = account(any_db_url)
    assert first.last_active_at == T0
    assert first.session_key_enc is not None
    assert cipher.decrypt(first.session_key_enc) == KEY_A
    assert first.session_key_updated_at == T0

    later = T0 + dt.timedelta(days=1)
    assert upsert(any_db_url, keyed(cipher, KEY_B, later)) == UpsertResult(new=0, updated=1)
    second = account(any_db_url)
    assert second.id == first.id
    assert second.last_active_at == later
    assert cipher.decrypt(second.session_key_enc or "") == KEY_B
    assert second.session_key_updated_at == later


def test_activity_never_moves_backwards_and_stale_keys_lose(
    any_db_url: str, cipher: SessionKeyCipher
) -> None:
    upsert(any_db_url, keyed(cipher, KEY_A, T0))
    # An older export: neither the activity nor the key goes back.
    upsert(any_db_url, keyed(cipher, KEY_B, T0 - dt.timedelta(hours=1)))
    # The same time again: the stored key stays (only a strictly newer key replaces it).
    upsert(any_db_url, keyed(cipher, KEY_B, T0))
    # Nothing supplied: nothing changes, and in particular nothing is cleared.
    upsert(any_db_url, AccountRow(openid="o1", zone_id="1"))
    stored = account(any_db_url)
    assert stored.last_active_at == T0
    assert cipher.decrypt(stored.session_key_enc or "") == KEY_A
    assert stored.session_key_updated_at == T0


def test_activity_alone_does_not_touch_the_key(any_db_url: str, cipher: SessionKeyCipher) -> None:
    upsert(any_db_url, keyed(cipher, KEY_A, T0))
    later = T0 + dt.timedelta(days=2)
    upsert(any_db_url, AccountRow(openid="o1", zone_id="1", last_active_at=later))
    stored = account(any_db_url)
    assert stored.last_active_at == later
    assert cipher.decrypt(stored.session_key_enc or "") == KEY_A
    assert stored.session_key_updated_at == T0


def test_accounts_are_keyed_by_openid_and_zone(any_db_url: str) -> None:
    result = upsert(
        any_db_url,
        AccountRow(openid="o1", zone_id="1"),
        AccountRow(openid="o1", zone_id="2"),
        AccountRow(openid="o2", zone_id="1"),
        batch_size=2,
    )
    assert result == UpsertResult(new=3, updated=0)
    assert upsert(any_db_url, AccountRow(openid="o1", zone_id="2")) == UpsertResult(0, 1)


def test_session_keys_are_not_in_clear_in_the_database(
    any_db_url: str, cipher: SessionKeyCipher, write_csv: WriteCsv
) -> None:
    path = write_csv(
        "a.csv",
        f"openid,zone_id,session_key,last_active_at\no1,1,{KEY_A},\no2,1,{KEY_B},\n",
    )
    with session_scope(any_db_url) as session:
        upsert_accounts(session, read_accounts_csv(path, cipher=cipher))
    with session_scope(any_db_url) as session:
        # Every column of every row, as raw text: neither key appears anywhere.
        raw = [str(tuple(r)) for r in session.execute(text("SELECT * FROM accounts"))]
    assert len(raw) == 2
    for row in raw:
        assert KEY_A not in row and KEY_B not in row
        assert KEY_A.rstrip("=") not in row and KEY_B.rstrip("=") not in row


def test_import_counts_and_is_idempotent(
    any_db_url: str, cipher: SessionKeyCipher, write_csv: WriteCsv
) -> None:
    path = write_csv(
        "a.csv",
        "openid,zone_id,session_key,last_active_at\n"
        f"o1,1,{KEY_A},2024-11-20T18:00:00+08:00\n"
        "o2,1,,2024-11-21T10:00:00Z\n"
        "o3,1,,\n",
    )
    with session_scope(any_db_url) as session:
        assert upsert_accounts(session, read_accounts_csv(path, cipher=cipher)) == UpsertResult(
            3, 0
        )
    before = account(any_db_url)
    with session_scope(any_db_url) as session:
        assert upsert_accounts(session, read_accounts_csv(path, cipher=cipher)) == UpsertResult(
            0, 3
        )
    after = account(any_db_url)
    assert after.session_key_enc == before.session_key_enc  # not even re-encrypted
    assert after.last_active_at == before.last_active_at == T0


def test_a_bad_account_row_stores_nothing(
    any_db_url: str, cipher: SessionKeyCipher, write_csv: WriteCsv
) -> None:
    good = "".join(f"o{i},1,{KEY_A},\n" for i in range(5))
    path = write_csv(
        "a.csv", "openid,zone_id,session_key,last_active_at\n" + good + "o9,1,,2024-11-24\n"
    )
    with pytest.raises(IntakeError, match=r"^row 7: last_active_at '2024-11-24' is not an ISO"):
        with session_scope(any_db_url) as session:
            upsert_accounts(session, read_accounts_csv(path, cipher=cipher), batch_size=2)
    with session_scope(any_db_url) as session:
        assert session.execute(select(Account.id)).all() == []


# -- rotation ------------------------------------------------------------------------------


def test_rekey_moves_every_key_to_the_newest_and_is_resumable(
    any_db_url: str, fernet_keys: tuple[str, str]
) -> None:
    new, old = fernet_keys
    before = SessionKeyCipher([old])
    upsert(
        any_db_url,
        *(
            AccountRow(
                openid=f"o{i}",
                zone_id="1",
                session_key_enc=before.encrypt(f"key{i}"),
                session_key_at=T0,
            )
            for i in range(5)
        ),
        AccountRow(openid="nokey", zone_id="1"),
    )
    rotating = SessionKeyCipher([new, old])
    upsert(  # one account already logged in again since the new key went live
        any_db_url,
        AccountRow(
            openid="o4",
            zone_id="1",
            session_key_enc=rotating.encrypt("key4b"),
            session_key_at=T0 + dt.timedelta(hours=1),
        ),
    )

    batches = []
    last_id = 0
    while True:
        with session_scope(any_db_url) as session:
            batch = rekey_session_keys(session, rotating, after_id=last_id, limit=2)
        batches.append(batch)
        last_id = batch.last_id
        if batch.finished:
            break
    assert sum(b.rekeyed for b in batches) == 4
    assert sum(b.current for b in batches) == 1
    assert all(not b.undecryptable for b in batches)

    only_new = SessionKeyCipher([new])  # the old key can now be dropped
    with session_scope(any_db_url) as session:
        tokens = dict(session.execute(select(Account.openid, Account.session_key_enc)).all())
    assert tokens.pop("nokey") is None
    assert {k: only_new.decrypt(v or "") for k, v in tokens.items()} == {
        "o0": "key0",
        "o1": "key1",
        "o2": "key2",
        "o3": "key3",
        "o4": "key4b",
    }

    with session_scope(any_db_url) as session:  # a second run finds nothing to do
        again = rekey_session_keys(session, rotating)
    assert (again.rekeyed, again.current, again.finished) == (0, 5, True)


def test_rekey_reports_keys_no_configured_key_opens(
    any_db_url: str, fernet_keys: tuple[str, str]
) -> None:
    new, lost = fernet_keys
    upsert(
        any_db_url,
        AccountRow(
            openid="o1",
            zone_id="1",
            session_key_enc=SessionKeyCipher([lost]).encrypt(KEY_A),
            session_key_at=T0,
        ),
    )
    before = account(any_db_url).session_key_enc
    with session_scope(any_db_url) as session:
        batch = rekey_session_keys(session, SessionKeyCipher([new]))
    assert batch.undecryptable == [account(any_db_url).id]
    assert batch.rekeyed == 0
    assert account(any_db_url).session_key_enc == before  # left alone, not destroyed


def test_rekey_never_overwrites_a_key_stored_meanwhile(
    any_db_url: str, fernet_keys: tuple[str, str]
) -> None:
    new, old = fernet_keys
    rotating = SessionKeyCipher([new, old])
    upsert(any_db_url, keyed(SessionKeyCipher([old]), KEY_A, T0))
    # Simulate a login landing between rekey's read and its write: the write is a
    # compare-and-set on the old ciphertext, so it must not undo the login.
    fresh = rotating.encrypt(KEY_B)
    with session_scope(any_db_url) as session:
        original = session.execute
        calls = 0

        def login_in_between(statement, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 2:  # after the SELECT, before the UPDATE
                original(update(Account).values(session_key_enc=fresh))
            return original(statement, *args, **kwargs)

        session.execute = login_in_between  # type: ignore[method-assign]
        rekey_session_keys(session, rotating)
    assert rotating.decrypt(account(any_db_url).session_key_enc or "") == KEY_B
