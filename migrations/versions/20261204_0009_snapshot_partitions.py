"""Snapshot partitions: `balance_snapshots` by month of its run's business date on Postgres.

Revision ID: 20261204_0009
Revises: 20261204_0008
Create Date: 2026-12-04

- `balance_snapshots.business_date` (both dialects, one model): the business date of the
  snapshot's run, filled here from `runs`. The one-snapshot-per-account key gains it (the run
  fixes the date, so it means what it meant) because every unique key of a partitioned table
  must hold the partition key.
- Postgres: the table becomes `PARTITION BY RANGE (business_date)`, one partition per month
  (`balance_snapshots_YYYY_MM`, no default partition), primary key (id, business_date). The
  rows are copied with their ids, and the id sequence moves to the new table, so ids go on
  where they were. Partitions are made for every month that has rows and the current month
  and the two after it; later ones come from the daily beat task and from run creation
  (worker/recon/retention.py).
- `mismatch_events.snapshot_id` loses its foreign key (an index stays): Postgres cannot refer
  to a partitioned table by `id` alone, and `db retention` drops whole months of snapshots.
  An event keeps `midas_value` / `ledger_value` itself; its snapshot is a pointer for people.
- The views that read `balance_snapshots` are pointed at the new table with their own
  definitions (CREATE OR REPLACE: grants given to BI users stay). SQLite cannot rebuild a
  table under a view, so there every view is dropped and recreated as it was.

On Postgres the upgrade copies the whole table in one transaction, holding it locked: stop the
workers for it (docs/operations.md); it takes about as long as a copy of the table.

Downgrade puts back the plain table with every row and id, and the foreign key. It refuses,
changing nothing, when an event points at a snapshot `db retention` dropped: the key could not
hold, and unlinking the events would silently lose where their numbers came from.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.business_calendar import utcnow
from worker.db import partitions
from worker.recon.retention import months_to_ensure

revision: str = "20261204_0009"
down_revision: str | None = "20261204_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
COINS = sa.BigInteger()
TS = sa.DateTime(timezone=True)

# Every column but business_date, in the order of 20261124_0001.
COLUMNS = (
    "id, run_id, openid, zone_id, fetched_at, status, errcode, errmsg, balance, gen_balance,"
    " save_amt, save_sum, cost_sum, present_sum, first_save, api_version"
)
OLD_UNIQUE = "uq_balance_snapshots_run_id_openid_zone_id"
NEW_UNIQUE = "uq_balance_snapshots_run_id_openid_zone_id_business_date"
EVENTS_FK = "fk_mismatch_events_snapshot_id_balance_snapshots"
EVENTS_INDEX = "ix_mismatch_events_snapshot_id"
ACCOUNT_TIME = "ix_balance_snapshots_account_time"
SEQUENCE = "balance_snapshots_id_seq"


def _snapshots_table(name: str, *, partitioned: bool) -> None:
    """The snapshots table as 20261124_0001 made it, with business_date when partitioned."""
    extra = [sa.Column("business_date", sa.Date(), nullable=False)] if partitioned else []
    key = ["id", "business_date"] if partitioned else ["id"]
    unique = ["run_id", "openid", "zone_id", *(["business_date"] if partitioned else [])]
    op.create_table(
        name,
        sa.Column("id", ID, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        *extra,
        sa.Column("openid", sa.String(128), nullable=False),
        sa.Column("zone_id", sa.String(64), nullable=False),
        sa.Column("fetched_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("errcode", sa.Integer(), nullable=True),
        sa.Column("errmsg", sa.Text(), nullable=True),
        sa.Column("balance", COINS, nullable=True),
        sa.Column("gen_balance", COINS, nullable=True),
        sa.Column("save_amt", COINS, nullable=True),
        sa.Column("save_sum", COINS, nullable=True),
        sa.Column("cost_sum", COINS, nullable=True),
        sa.Column("present_sum", COINS, nullable=True),
        sa.Column("first_save", sa.Boolean(), nullable=True),
        sa.Column("api_version", sa.String(2), nullable=False),
        sa.CheckConstraint(
            "status IN ('ok', 'unobservable', 'error')", name=op.f("ck_balance_snapshots_status")
        ),
        sa.CheckConstraint(
            "(status = 'ok' AND balance IS NOT NULL AND gen_balance IS NOT NULL"
            " AND save_amt IS NOT NULL AND save_sum IS NOT NULL AND cost_sum IS NOT NULL"
            " AND present_sum IS NOT NULL AND first_save IS NOT NULL)"
            " OR (status <> 'ok' AND balance IS NULL AND gen_balance IS NULL"
            " AND save_amt IS NULL AND save_sum IS NULL AND cost_sum IS NULL"
            " AND present_sum IS NULL AND first_save IS NULL)",
            name=op.f("ck_balance_snapshots_values_iff_ok"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_balance_snapshots_run_id_runs")
        ),
        sa.PrimaryKeyConstraint(*key, name=op.f("pk_balance_snapshots")),
        sa.UniqueConstraint(*unique, name=op.f(NEW_UNIQUE if partitioned else OLD_UNIQUE)),
        postgresql_partition_by="RANGE (business_date)" if partitioned else None,
    )
    op.create_index(ACCOUNT_TIME, name, ["openid", "zone_id", "fetched_at"])
    # The ids go on where they were: the sequence follows the table (BIGSERIAL's default).
    op.execute(f"ALTER SEQUENCE {SEQUENCE} OWNED BY {name}.id")
    op.execute(f"ALTER TABLE {name} ALTER COLUMN id SET DEFAULT nextval('{SEQUENCE}'::regclass)")


def _set_aside(new_name: str, unique: str) -> None:
    """Rename the current table and free the names its key and index hold (schema-wide)."""
    op.execute(f"ALTER TABLE balance_snapshots RENAME TO {new_name}")
    op.execute(f"ALTER TABLE {new_name} DROP CONSTRAINT pk_balance_snapshots")
    op.execute(f"ALTER TABLE {new_name} DROP CONSTRAINT {unique}")
    op.execute(f"DROP INDEX {ACCOUNT_TIME}")


def _copy(source: str, columns: str, select: str, views: list[tuple[str, str]]) -> None:
    """Copy every row (or fail the migration, rolled back, when any is missing), point the
    views at the new table and drop the old one."""
    conn = op.get_bind()
    op.execute(f"INSERT INTO balance_snapshots ({columns}) {select}")
    before = conn.execute(sa.text(f"SELECT count(*) FROM {source}")).scalar_one()  # noqa: S608
    after = conn.execute(sa.text("SELECT count(*) FROM balance_snapshots")).scalar_one()
    if before != after:
        raise RuntimeError(f"copied {after} snapshots of {before}: nothing was changed")
    for name, definition in views:  # the same definition, parsed again: the new table's
        op.execute(f"CREATE OR REPLACE VIEW {name} AS {definition}")
    op.execute(f"DROP TABLE {source}")


def _pg_views_reading_snapshots() -> list[tuple[str, str]]:
    """(name, definition) of the views that read balance_snapshots itself, oldest first."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT v.oid, v.relname, pg_get_viewdef(v.oid) FROM pg_depend d"
            " JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class"
            " WHERE d.classid = 'pg_rewrite'::regclass"
            " AND d.refobjid = 'balance_snapshots'::regclass AND v.relkind = 'v'"
            " ORDER BY v.oid"
        )
    )
    return [(name, definition) for _oid, name, definition in rows]


def _sqlite_drop_views() -> list[str]:
    """Drop every view, returning their CREATE statements in the order they were made."""
    rows = op.get_bind().execute(
        sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view' ORDER BY rowid")
    )
    views = [(name, sql) for name, sql in rows]
    for name, _sql in views:
        op.execute(f"DROP VIEW {name}")
    return [sql for _name, sql in views]


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _upgrade_sqlite()
        return
    views = _pg_views_reading_snapshots()
    op.drop_constraint(EVENTS_FK, "mismatch_events", type_="foreignkey")
    op.create_index(EVENTS_INDEX, "mismatch_events", ["snapshot_id"])
    _set_aside("balance_snapshots_unpartitioned", OLD_UNIQUE)
    _snapshots_table("balance_snapshots", partitioned=True)
    months = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT r.business_date FROM balance_snapshots_unpartitioned s"
            " JOIN runs r ON r.id = s.run_id"
        )
    )
    # The current month by the UTC date: run creation makes the month of any other date.
    wanted: list[dt.date] = [*months.scalars(), *months_to_ensure(utcnow().date())]
    partitions.ensure_months(op.get_bind(), wanted)
    _copy(
        "balance_snapshots_unpartitioned",
        f"{COLUMNS}, business_date",
        f"SELECT s.{COLUMNS.replace(', ', ', s.')}, r.business_date"  # noqa: S608
        " FROM balance_snapshots_unpartitioned s JOIN runs r ON r.id = s.run_id",
        views,
    )


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        _downgrade_sqlite()
        return
    lost = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT count(*) FROM mismatch_events e WHERE e.snapshot_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM balance_snapshots s WHERE s.id = e.snapshot_id)"
            )
        )
        .scalar_one()
    )
    if lost:
        raise RuntimeError(
            f"{lost} case events point at snapshots that `db retention` dropped: the plain"
            " table's foreign key cannot hold; nothing was changed"
        )
    views = _pg_views_reading_snapshots()
    _set_aside("balance_snapshots_partitioned", NEW_UNIQUE)
    _snapshots_table("balance_snapshots", partitioned=False)
    _copy(
        "balance_snapshots_partitioned",  # its partitions go with it
        COLUMNS,
        f"SELECT {COLUMNS} FROM balance_snapshots_partitioned ORDER BY id",  # noqa: S608
        views,
    )
    op.drop_index(EVENTS_INDEX, table_name="mismatch_events")
    op.create_foreign_key(
        EVENTS_FK, "mismatch_events", "balance_snapshots", ["snapshot_id"], ["id"]
    )


def _upgrade_sqlite() -> None:
    views = _sqlite_drop_views()
    # The events first: with foreign keys on, rebuilding the snapshots under their key fails.
    with op.batch_alter_table("mismatch_events", recreate="always") as batch:
        batch.drop_constraint(EVENTS_FK, type_="foreignkey")
    op.create_index(EVENTS_INDEX, "mismatch_events", ["snapshot_id"])
    op.add_column("balance_snapshots", sa.Column("business_date", sa.Date(), nullable=True))
    op.execute(
        "UPDATE balance_snapshots SET business_date ="
        " (SELECT r.business_date FROM runs r WHERE r.id = balance_snapshots.run_id)"
    )
    with op.batch_alter_table("balance_snapshots", recreate="always") as batch:
        batch.alter_column("business_date", existing_type=sa.Date(), nullable=False)
        batch.drop_constraint(OLD_UNIQUE, type_="unique")
        batch.create_unique_constraint(NEW_UNIQUE, ["run_id", "openid", "zone_id", "business_date"])
    for sql in views:
        op.execute(sql)


def _downgrade_sqlite() -> None:
    views = _sqlite_drop_views()
    with op.batch_alter_table("balance_snapshots", recreate="always") as batch:
        batch.drop_constraint(NEW_UNIQUE, type_="unique")
        batch.create_unique_constraint(OLD_UNIQUE, ["run_id", "openid", "zone_id"])
        batch.drop_column("business_date")
    op.drop_index(EVENTS_INDEX, table_name="mismatch_events")
    with op.batch_alter_table("mismatch_events", recreate="always") as batch:
        batch.create_foreign_key(EVENTS_FK, "balance_snapshots", ["snapshot_id"], ["id"])
    for sql in views:
        op.execute(sql)
