"""Fixtures for the schema and intake tests: both dialects, scratch databases, a cipher."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL
from worker.db.crypto import SessionKeyCipher


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The test on Postgres (production) and on SQLite (the embedded default), migrated."""
    name = "db_url" if request.param == "postgresql" else "sqlite_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def scratch_pg_url() -> Iterator[str]:
    """An empty Postgres database of its own, for tests that migrate up and down."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"midas_recon_scratch_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


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
