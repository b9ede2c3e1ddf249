"""Fixtures for the schema and intake tests: both dialects, scratch databases, a cipher."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from worker.db.crypto import SessionKeyCipher


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The test on Postgres (production) and on SQLite (the embedded default), migrated."""
    name = "db_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def fernet_keys() -> tuple[str, str]:
    """(newest, older): two fresh Fernet keys."""
    return Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.fixture
def cipher(fernet_keys: tuple[str, str]) -> SessionKeyCipher:
    return SessionKeyCipher([fernet_keys[0]])


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """write_csv("a.csv", "text") or write_csv("a.csv", b"bytes") -> the path."""

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    return write
