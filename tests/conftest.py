"""Shared fixtures: a real Postgres (a throwaway database per test session, built by running
the migrations) and a real Redis. Unreachable services fail the run loudly; nothing is skipped.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# The admin URL may be overridden; the default is the CI machine's trust-auth cluster.
PG_ADMIN_URL = os.environ.get(
    "TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def _admin_engine():  # type: ignore[no-untyped-def]
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


@contextmanager
def throwaway_database(prefix: str) -> Iterator[str]:
    """A new, empty Postgres database named `prefix_<random>`, dropped afterwards (even with
    connections left open). The one way tests make a database; an unreachable server fails
    the test loudly, never skips it."""
    admin = _admin_engine()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def snapshot_months(url: str, first: dt.date, last: dt.date) -> None:
    """The month partitions of balance_snapshots from `first` to `last`: tests that write
    runs and snapshots directly skip run creation, which makes the month's partition."""
    from worker.db.partitions import add_months, ensure_months
    from worker.db.session import make_engine

    months, month = [], first
    while month <= last:
        months.append(month)
        month = add_months(month, 1)
    engine = make_engine(url)
    with engine.begin() as conn:
        ensure_months(conn, months)
    engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database for this test session, at the head migration."""
    from worker.db.migrate import upgrade
    from worker.db.session import engine_for

    with throwaway_database("midas_recon_test") as url:
        upgrade(url)
        snapshot_months(url, dt.date(2026, 1, 1), dt.date(2027, 12, 1))
        yield url
        engine_for(url).dispose()
        engine_for.cache_clear()


@pytest.fixture
def scratch_pg_url() -> Iterator[str]:
    """An empty database of its own (no migration), for tests that migrate it themselves."""
    with throwaway_database("midas_recon_scratch") as url:
        yield url


@pytest.fixture
def db_url(pg_url: str) -> str:
    """The session database, emptied before the test (all tables, identities reset)."""
    from worker.db.models import Base

    engine = create_engine(pg_url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return pg_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The embedded default: a SQLite file at the head migration."""
    from worker.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'midas_recon.db'}"
    upgrade(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own, emptied before and after the test."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL}: {exc}", pytrace=False)
    client.flushdb()
    yield TEST_REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def test_vectors_path() -> Path:
    path = SHARED / "midas" / "test-vectors.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: ../shared must sit beside the project", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings are cached per process; each test starts from a clean slate."""
    from worker.config import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
