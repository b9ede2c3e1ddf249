"""Session key encryption: authenticated, rotatable, and silent about keys and plaintexts."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from worker.config import ConfigError, load_settings
from worker.db.crypto import SessionKeyCipher, UndecryptableSessionKey

PLAIN = "HyVFkGl5F5OQWJZZaNzBBg=="


def test_round_trip_and_no_plaintext_in_the_ciphertext(cipher: SessionKeyCipher) -> None:
    token = cipher.encrypt(PLAIN)
    assert PLAIN not in token
    assert cipher.decrypt(token) == PLAIN
    assert cipher.encrypt(PLAIN) != token  # a fresh IV each time


def test_a_tampered_token_is_refused_without_echoing_it(cipher: SessionKeyCipher) -> None:
    token = cipher.encrypt(PLAIN)
    tampered = token[:-6] + ("A" if token[-6] != "A" else "B") + token[-5:]
    with pytest.raises(UndecryptableSessionKey) as caught:
        cipher.decrypt(tampered)
    assert tampered not in str(caught.value)
    assert "SESSION_KEY_ENCRYPTION_KEY" in str(caught.value)


def test_rotation_old_tokens_stay_readable_and_rotate_to_the_newest_key(
    fernet_keys: tuple[str, str],
) -> None:
    new, old = fernet_keys
    before = SessionKeyCipher([old])
    token = before.encrypt(PLAIN)

    after = SessionKeyCipher([new, old])
    assert after.decrypt(token) == PLAIN  # readable while both keys are configured
    assert not after.is_current(token)
    assert after.is_current(after.encrypt(PLAIN))  # new tokens use the newest key

    rotated = after.rotate(token)
    assert after.is_current(rotated)
    assert SessionKeyCipher([new]).decrypt(rotated) == PLAIN  # the old key can now go
    with pytest.raises(UndecryptableSessionKey):
        SessionKeyCipher([new]).decrypt(token)
    with pytest.raises(UndecryptableSessionKey):
        SessionKeyCipher([new]).rotate(token)


def test_from_settings_reads_a_comma_separated_list_newest_first(
    fernet_keys: tuple[str, str],
) -> None:
    new, old = fernet_keys
    old_token = SessionKeyCipher([old]).encrypt(PLAIN)
    cipher = SessionKeyCipher.from_settings(
        load_settings({"SESSION_KEY_ENCRYPTION_KEY": f" {new} , {old} ,"})
    )
    assert cipher.decrypt(old_token) == PLAIN
    assert SessionKeyCipher([new]).decrypt(cipher.encrypt(PLAIN)) == PLAIN


def test_a_missing_key_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^SESSION_KEY_ENCRYPTION_KEY is not set$"):
        SessionKeyCipher.from_settings(load_settings({}))
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY is not set"):
        SessionKeyCipher.from_settings(load_settings({"SESSION_KEY_ENCRYPTION_KEY": " , "}))


def test_an_invalid_key_is_named_by_position_and_never_echoed() -> None:
    good = Fernet.generate_key().decode()
    bad = "not-a-fernet-key-but-a-secret-anyway"
    with pytest.raises(ConfigError) as caught:
        SessionKeyCipher.from_settings(
            load_settings({"SESSION_KEY_ENCRYPTION_KEY": f"{good},{bad}"})
        )
    message = str(caught.value)
    assert message.startswith("SESSION_KEY_ENCRYPTION_KEY: key 2 of 2 is not a Fernet key")
    assert bad not in message and good not in message


def test_a_placeholder_key_is_refused_in_production() -> None:
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY holds a placeholder"):
        SessionKeyCipher.from_settings(
            load_settings({"SESSION_KEY_ENCRYPTION_KEY": "changeme", "MIDAS_ENV": "production"})
        )
