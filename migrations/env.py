"""Alembic environment: one script for Postgres (production) and SQLite (embedded default).

The URL comes from the Alembic config when the caller put one there (worker/db/migrate.py
does), otherwise from DATABASE_URL through the project's settings, so `alembic upgrade head`
and `midas-recon db upgrade` always migrate the database the worker uses.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import make_url

from worker.db.models import Base
from worker.db.partitions import month_of_partition
from worker.db.session import make_engine

config = context.config
# Any fixed number, the same in every process that migrates this database.
_LOCK = 0x6D696461735F7265  # "midas_re"


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from worker.config import get_settings

    return get_settings().DATABASE_URL


def _include_name(name: str | None, type_: str, _parents: Any) -> bool:
    """The month partitions of balance_snapshots are data, not schema: the models declare
    the partitioned table, and its partitions come and go (worker/db/partitions.py)."""
    return not (type_ == "table" and name is not None and month_of_partition(name) is not None)


def _options(dialect_name: str) -> dict[str, Any]:
    return {
        "target_metadata": Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
        # A changed column type is a schema change too (`midas-recon db check`, the tests).
        "compare_type": True,
        "include_name": _include_name,
    }


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    url = _url()
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # Not pooled: a migration is a one-off, and tests run it against throwaway databases.
    engine = make_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_options(connection.dialect.name))
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Two processes upgrading at once (every container running `db upgrade` on
                    # start): the second waits here, then finds the work done. The version is
                    # read after the lock, and the lock ends with the migration's transaction.
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
