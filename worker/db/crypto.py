"""Session keys at rest: Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`), with rotation.

SESSION_KEY_ENCRYPTION_KEY holds one or more Fernet keys, comma-separated, newest first.
New ciphertexts always use the newest key; every listed key can still decrypt, so an operator
rotates by prepending a new key, running `midas-recon accounts rekey`, then dropping the old
one. Neither keys nor plaintexts ever appear in an exception message.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from worker.config import ConfigError, Settings

VARIABLE = "SESSION_KEY_ENCRYPTION_KEY"


class UndecryptableSessionKey(Exception):
    """A stored ciphertext opens with none of the configured keys (or was tampered with)."""


class SessionKeyCipher:
    """Encrypts with the newest key, decrypts with any configured key."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ConfigError(f"{VARIABLE} is not set")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip().encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                # Say which key is wrong by position only: the value is a secret.
                raise ConfigError(
                    f"{VARIABLE}: key {position} of {len(keys)} is not a Fernet key"
                    " (url-safe base64 of 32 bytes)"
                ) from None
        self._newest = fernets[0]
        self._all = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionKeyCipher:
        """The cipher for SESSION_KEY_ENCRYPTION_KEY; ConfigError when it is unset or wrong."""
        settings.require(VARIABLE)  # unset, or a placeholder in production
        secret = settings.SESSION_KEY_ENCRYPTION_KEY
        raw = secret.get_secret_value() if secret is not None else ""
        return cls([k for k in raw.split(",") if k.strip()])

    def encrypt(self, plaintext: str) -> str:
        return self._newest.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._all.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise UndecryptableSessionKey(
                f"a session key cannot be decrypted with any key in {VARIABLE}"
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
                f"a session key cannot be decrypted with any key in {VARIABLE}"
            ) from None


def required(cipher: SessionKeyCipher | None) -> SessionKeyCipher:
    """The cipher, or a ConfigError: a session key arrived and there is no key to encrypt it."""
    if cipher is None:
        raise ConfigError(f"{VARIABLE} is not set; it is needed to store session keys")
    return cipher
