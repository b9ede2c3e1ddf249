"""Engines and the one place that owns a transaction.

Business code receives a `Session` and never commits; `session_scope` commits on success and
rolls back on error. Follow-up work (Celery sends, the Redis keys that go with them) is
registered with `after_commit` inside the scope and runs only once the commit succeeded, so a
message never points at rows that do not exist and a rolled-back scope sends nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets the report read while the embedded worker writes; FKs are off by default.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive a Postgres restart between tasks
    return create_engine(url, **kwargs)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine (one pool) per URL per process."""
    return make_engine(url)


@lru_cache(maxsize=8)
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


_AFTER_COMMIT = "midas_recon.after_commit"
_AFTER_ROLLBACK = "midas_recon.after_rollback"


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once the scope that owns `session` has committed; never if it rolls back.

    Callbacks run in the order registered, after the session is closed (so they may open a
    scope of their own); an exception in one propagates to the scope's caller, the commit
    stands, and the callbacks after it are not run.
    """
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def after_rollback(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` if the scope that owns `session` rolls back (its body or its commit
    failed); never once it committed, even when an `after_commit` callback then fails."""
    session.info.setdefault(_AFTER_ROLLBACK, []).append(callback)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """Commit on success, roll back on any error; the only place that commits. Then the
    `after_commit` callbacks of a committed scope."""
    if url is None:
        from worker.config import get_settings

        url = get_settings().DATABASE_URL
    session = _factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        try:
            session.rollback()
        finally:
            for undo in session.info.pop(_AFTER_ROLLBACK, []):
                undo()
        raise
    finally:
        callbacks: list[Callable[[], object]] = session.info.pop(_AFTER_COMMIT, [])
        session.close()
    for callback in callbacks:
        callback()


def ping(session: Session) -> None:
    """One round trip to the database (the console's health probe)."""
    session.execute(text("SELECT 1"))


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that knows ON CONFLICT, for the dialect the session is bound to."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"unsupported database dialect: {name}")
