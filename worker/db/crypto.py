"""Session keys sealed with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`), with rotation.

Two key lists, each one or more Fernet keys, comma-separated, newest first:
- SESSION_KEY_ENCRYPTION_KEY: at rest (the accounts table) and the access token cached in
  Redis; held by the worker only.
- SESSION_KEY_TRANSPORT_KEY: in transit; the game server seals each session key with the
  first before sending `record_login` (worker/intake.py), the worker opens it with any.
New ciphertexts always use the newest key; every listed key can still decrypt, so an operator
rotates by prepending a new key, running `midas-recon accounts rekey` (at rest) or updating
the game server (in transit), then dropping the old one. Neither keys nor plaintexts ever
appear in an exception message.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from worker.config import ConfigError, Settings

VARIABLE = "SESSION_KEY_ENCRYPTION_KEY"
TRANSPORT_VARIABLE = "SESSION_KEY_TRANSPORT_KEY"


class UndecryptableSessionKey(Exception):
    """A stored ciphertext opens with none of the configured keys (or was tampered with)."""


class SessionKeyCipher:
    """Encrypts with the newest key, decrypts with any configured key."""

    def __init__(self, keys: Sequence[str], variable: str = VARIABLE) -> None:
        self._variable = variable
        if not keys:
            raise ConfigError(f"{variable} is not set")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip().encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                # Say which key is wrong by position only: the value is a secret.
                raise ConfigError(
                    f"{variable}: key {position} of {len(keys)} is not a Fernet key"
                    " (url-safe base64 of 32 bytes)"
                ) from None
        self._newest = fernets[0]
        self._all = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings, variable: str = VARIABLE) -> SessionKeyCipher:
        """The cipher of `variable` (at rest by default); ConfigError when it is unset or wrong."""
        settings.require(variable)  # unset, or a placeholder in production
        secret = getattr(settings, variable)
        raw = secret.get_secret_value() if secret is not None else ""
        return cls([k for k in raw.split(",") if k.strip()], variable)

    def encrypt(self, plaintext: str) -> str:
        return self._newest.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._all.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise UndecryptableSessionKey(
                f"a session key cannot be decrypted with any key in {self._variable}"
            ) from None

    def is_current(self, token: str) -> bool:
        """True when `token` is already encrypted with the newest key."""
        try:
            self._newest.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return False
        return True

    def rotate(self, token: str) -> str:
        """Re-encrypt `token` with the newest key (whichever configured key made it)."""
        try:
            return self._all.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise UndecryptableSessionKey(
                f"a session key cannot be decrypted with any key in {self._variable}"
            ) from None


def required(cipher: SessionKeyCipher | None) -> SessionKeyCipher:
    """The cipher, or a ConfigError: a session key arrived and there is no key to encrypt it."""
    if cipher is None:
        raise ConfigError(f"{VARIABLE} is not set; it is needed to store session keys")
    return cipher
