"""Typed models on one base. Every schema change goes through an Alembic migration.

Money is integer coins (BIGINT). Timestamps are timezone-aware UTC (`UTCDateTime` makes SQLite
behave like Postgres here). Relationships are `lazy="raise"`: all SQL is explicit.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.vocabulary import (
    CASE_STATUSES,
    DELIVERY_STATUSES,
    ITEM_STATES,
    LEDGER_KINDS,
    OPEN_CASE_STATUSES,
    RUN_KINDS,
    RUN_STATUSES,
    SNAPSHOT_STATUSES,
    DeliveryStatus,
    ItemState,
    RunKind,
    RunStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on Postgres; SQLite only auto-increments a column declared exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Coins = BigInteger  # integer coins, never floats


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware in and out; naive datetimes are refused rather than guessed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must carry a time zone")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite hands back what it stored: UTC without the offset
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


@compiles(PrimaryKeyConstraint, "sqlite")
def _sqlite_primary_key(constraint: PrimaryKeyConstraint, compiler: Any, **kw: Any) -> str:
    """The primary key without the partition key on SQLite, which has no partitions: only a
    lone INTEGER PRIMARY KEY auto-increments there (`balance_snapshots.id`)."""
    names = [c.name for c in constraint.columns if not c.info.get("partition_key")]
    text = f"PRIMARY KEY ({', '.join(compiler.preparer.quote(n) for n in names)})"
    if constraint.name is not None:
        text = f"CONSTRAINT {compiler.preparer.format_constraint(constraint)} {text}"
    return text


def _in(column: str, values: tuple[str, ...]) -> str:
    """A CHECK (or index predicate) from worker.vocabulary's plain strings."""
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime()}

    def __repr__(self) -> str:  # ids only: a repr must never carry a session key or a value
        ident = getattr(self, "id", None)
        return f"<{type(self).__name__} id={ident}>"


class Account(Base):
    """Who to reconcile. Filled by `accounts import` and the `record_login` task."""

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("openid", "zone_id"),
        Index("ix_accounts_last_active_at", "last_active_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    openid: Mapped[str] = mapped_column(String(128))
    zone_id: Mapped[str] = mapped_column(String(64), server_default="1")
    last_active_at: Mapped[dt.datetime | None]
    # Fernet token of the session_key (never the key in clear); null when none is known.
    session_key_enc: Mapped[str | None] = mapped_column(Text)
    session_key_updated_at: Mapped[dt.datetime | None]
    # What the nightly planner ranks by (worker.recon.coverage), kept by every stored batch:
    # last observed ok, last answered at all (ok or unobservable), last found unobservable.
    last_ok_at: Mapped[dt.datetime | None]
    last_answer_at: Mapped[dt.datetime | None]
    last_unobservable_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class LedgerEntry(Base):
    """The game's own record of coin movements; the game may insert here directly."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint(_in("kind", LEDGER_KINDS), name="kind"),
        CheckConstraint("amount > 0", name="amount_positive"),
        # Per-account totals up to a time read only this index's range, never the whole ledger.
        Index("ix_ledger_entries_account_time", "openid", "zone_id", "occurred_at"),
        # The statement reads the ledger by time: the business day, and the rows between
        # two nights' fetches (worker/reports/statement.py).
        Index("ix_ledger_entries_occurred_at", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    bill_no: Mapped[str] = mapped_column(String(128), unique=True)
    openid: Mapped[str] = mapped_column(String(128))
    zone_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(Coins)
    occurred_at: Mapped[dt.datetime]
    # When the row reached us; the ledger scan for rechecks walks `id`, this is for people.
    recorded_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class Run(Base):
    """One reconciliation pass: the nightly run of a business date, or a recheck/confirm."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_in("kind", RUN_KINDS), name="kind"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        # One nightly run per business date: a second start is a no-op, even from two beats.
        Index(
            "uq_runs_nightly_business_date",
            "business_date",
            unique=True,
            # SQL text as the migration wrote it (alembic check compares it); RunKind.NIGHTLY.
            postgresql_where=text("kind = 'nightly'"),
            sqlite_where=text("kind = 'nightly'"),
        ),
        Index("ix_runs_status", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    business_date: Mapped[dt.date] = mapped_column(Date)
    kind: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(32))  # beat, cli, demo, payment, ledger-scan…
    status: Mapped[str] = mapped_column(String(16), server_default=RunStatus.PLANNING.value)
    api_version: Mapped[str] = mapped_column(String(2))
    planned: Mapped[int] = mapped_column(Integer, server_default="0")
    ok: Mapped[int] = mapped_column(Integer, server_default="0")
    unobservable: Mapped[int] = mapped_column(Integer, server_default="0")
    error: Mapped[int] = mapped_column(Integer, server_default="0")
    mismatches_opened: Mapped[int] = mapped_column(Integer, server_default="0")
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # A nightly's night: how many accounts it could fetch before `deadline_at`, how many
    # active accounts it left unobserved (run_deferrals says why), and the coverage it
    # closed with (worker.recon.coverage).
    capacity: Mapped[int | None] = mapped_column(Integer)
    deadline_at: Mapped[dt.datetime | None]
    deferred: Mapped[int] = mapped_column(Integer, server_default="0")
    coverage_verdict: Mapped[str | None] = mapped_column(String(16))
    coverage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    @property
    def note(self) -> str | None:
        """One night at a time, said (`runs`, the console): a nightly waiting for the one
        before, or closed by the next."""
        closed_by = (self.coverage or {}).get("closed_by_run_id")
        if closed_by is not None:
            return f"closed by #{closed_by}"
        if self.kind == RunKind.NIGHTLY and self.status == RunStatus.PLANNING:
            return "waiting for the night before"
        return None


class RunItem(Base):
    """One account to fetch in one run; `done` only after its snapshot is stored."""

    __tablename__ = "run_items"
    __table_args__ = (
        CheckConstraint(_in("state", ITEM_STATES), name="state"),
        # Claims take a run's pending items in tier order (the riskiest first, so a night
        # cut short by its deadline has spent itself on them): the index hands them so.
        Index("ix_run_items_run_state", "run_id", "state", "tier"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), server_default=ItemState.PENDING.value)
    # When a batch claimed it; a claim older than the visibility window is taken back.
    claimed_at: Mapped[dt.datetime | None]
    outcome: Mapped[str | None] = mapped_column(String(16))  # the snapshot status once done
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # Why a nightly planned it (worker.recon.coverage.TIERS); null for rechecks and confirms.
    tier: Mapped[int | None] = mapped_column(SmallInteger)


class RunClaim(Base):
    """A batch's claim on items of a run, from the claim until the batch stored them (or they
    were taken back): where the pump looks for dead batches (worker.db.runs).

    Not found among the claimed items themselves: every item passes through `claimed` once,
    and each leaves a dead entry in the (run_id, state) index that every later scan steps
    over until a vacuum removes it (docs/benchmarks.md §3). This table holds a row per batch.
    """

    __tablename__ = "run_claims"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    claimed_at: Mapped[dt.datetime] = mapped_column(primary_key=True)  # the claim (token)
    # The batch's lowest account id: two batches never share an item, so two claims made in
    # the same microsecond (a frozen test clock, two pumps) are still two rows.
    account_id: Mapped[int] = mapped_column(BigId, primary_key=True)


class RunDeferral(Base):
    """Active accounts a nightly did not observe, by reason and tier (never silently dropped).

    `capacity`: they did not fit the night (no item row: the active accounts without an item
    in the run); `deadline`: planned, left at the deadline; `superseded`: planned, left when
    the next night closed the run. The last two are items with outcome `deferred`.
    """

    __tablename__ = "run_deferrals"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    reason: Mapped[str] = mapped_column(String(16), primary_key=True)
    tier: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    accounts: Mapped[int] = mapped_column(Integer)


class SnapshotMonth(Base):
    """The latest fetch time stored in a month of `balance_snapshots` (Postgres), so that "is
    there a newer snapshot" reads only the months that can hold one (worker/db/partitions.py).

    Kept within `partitions.FETCH_SLACK` of the truth: no snapshot of the month was fetched
    later than `fetched_until + FETCH_SLACK`.
    """

    __tablename__ = "snapshot_months"

    month: Mapped[dt.date] = mapped_column(Date, primary_key=True)  # first day of the month
    fetched_until: Mapped[dt.datetime]


class BalanceSnapshot(Base):
    """What Midas said, insert-only; finance queries this table (PRODUCT.md §4).

    On Postgres the table is partitioned by month of `business_date` (worker/db/partitions.py):
    every unique key holds the partition key, so the primary key is (id, business_date) and
    the one-per-account key gains `business_date`, a function of `run_id` (same meaning).
    """

    __tablename__ = "balance_snapshots"
    __table_args__ = (
        PrimaryKeyConstraint("id", "business_date"),
        UniqueConstraint("run_id", "openid", "zone_id", "business_date"),
        CheckConstraint(_in("status", SNAPSHOT_STATUSES), name="status"),
        # An unanswered question is never a zero: values exist exactly when status is ok.
        # SQL text as the migration wrote it ('ok' is SnapshotStatus.OK).
        CheckConstraint(
            "(status = 'ok' AND balance IS NOT NULL AND gen_balance IS NOT NULL"
            " AND save_amt IS NOT NULL AND save_sum IS NOT NULL AND cost_sum IS NOT NULL"
            " AND present_sum IS NOT NULL AND first_save IS NOT NULL)"
            " OR (status <> 'ok' AND balance IS NULL AND gen_balance IS NULL"
            " AND save_amt IS NULL AND save_sum IS NULL AND cost_sum IS NULL"
            " AND present_sum IS NULL AND first_save IS NULL)",
            name="values_iff_ok",
        ),
        Index("ix_balance_snapshots_account_time", "openid", "zone_id", "fetched_at"),
        {"postgresql_partition_by": "RANGE (business_date)"},
    )

    # Still unique on its own: every partition draws from the one sequence (see below).
    id: Mapped[int] = mapped_column(BigId, server_default=FetchedValue())
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    # The business date of the run (copied at insert): the month partition the row lives in.
    business_date: Mapped[dt.date] = mapped_column(Date, info={"partition_key": True})
    openid: Mapped[str] = mapped_column(String(128))
    zone_id: Mapped[str] = mapped_column(String(64))
    fetched_at: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(16))
    errcode: Mapped[int | None] = mapped_column(Integer)
    errmsg: Mapped[str | None] = mapped_column(Text)
    balance: Mapped[int | None] = mapped_column(Coins)
    gen_balance: Mapped[int | None] = mapped_column(Coins)
    save_amt: Mapped[int | None] = mapped_column(Coins)
    save_sum: Mapped[int | None] = mapped_column(Coins)
    cost_sum: Mapped[int | None] = mapped_column(Coins)
    present_sum: Mapped[int | None] = mapped_column(Coins)
    first_save: Mapped[bool | None] = mapped_column(Boolean)
    api_version: Mapped[str] = mapped_column(String(2))


# What BIGSERIAL gives a lone key: in a composite primary key SQLAlchemy leaves `id` a plain
# BIGINT on Postgres (and SQLite would refuse `autoincrement=True`; there `id` is the rowid).
event.listen(
    BalanceSnapshot.__table__,
    "after_create",
    DDL(  # type: ignore[no-untyped-call]  # (SQLAlchemy leaves DDL's __init__ untyped)
        "CREATE SEQUENCE balance_snapshots_id_seq OWNED BY balance_snapshots.id;"
        " ALTER TABLE balance_snapshots ALTER COLUMN id"
        " SET DEFAULT nextval('balance_snapshots_id_seq'::regclass)"
    ).execute_if(dialect="postgresql"),
)


class NightFigures(Base):
    """A closed nightly run's statement figures for one zone, stored when it closes
    (worker/db/night_figures.py) so the statement and its trend need not re-aggregate a
    million snapshots; they are used only while what they were computed from is unchanged.

    The coverage and totals are `worker.db.statement.coverage`'s; the movement columns are
    `movement`'s against `previous_run_id`, null where no account was ok in both runs.
    """

    __tablename__ = "night_figures"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    zone_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    accounts: Mapped[int] = mapped_column(Integer)
    ok: Mapped[int] = mapped_column(Integer)
    unobservable: Mapped[int] = mapped_column(Integer)
    error: Mapped[int] = mapped_column(Integer)
    # Midas totals over the ok snapshots; null when none was ok (unknown, not zero).
    balance: Mapped[int | None] = mapped_column(Coins)
    save_sum: Mapped[int | None] = mapped_column(Coins)
    cost_sum: Mapped[int | None] = mapped_column(Coins)
    present_sum: Mapped[int | None] = mapped_column(Coins)
    # The previous date's nightly run the movement compares with; null when there was none.
    previous_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    compared: Mapped[int | None] = mapped_column(Integer)
    opening_balance: Mapped[int | None] = mapped_column(Coins)
    closing_balance: Mapped[int | None] = mapped_column(Coins)
    midas_save_sum_change: Mapped[int | None] = mapped_column(Coins)
    midas_cost_sum_change: Mapped[int | None] = mapped_column(Coins)
    midas_present_sum_change: Mapped[int | None] = mapped_column(Coins)
    top_ups: Mapped[int | None] = mapped_column(Coins)
    gifts: Mapped[int | None] = mapped_column(Coins)
    spends: Mapped[int | None] = mapped_column(Coins)
    cancels: Mapped[int | None] = mapped_column(Coins)
    # Every account's ledger window lies in (first_fetch_at, last_fetch_at]: where a ledger
    # row imported later can count at all.
    first_fetch_at: Mapped[dt.datetime | None]
    last_fetch_at: Mapped[dt.datetime | None]
    # The flows hold exactly the ledger rows with id <= this; the rows above it are added
    # when the statement is read. Null: a ledger insert was still open when the run closed,
    # so which ids were final was not known, and the movement is computed afresh.
    ledger_watermark: Mapped[int | None] = mapped_column(BigInteger)
    # What the two runs were when the figures were computed (night_figures.run_state): a run
    # resumed, closed again or given more snapshots since no longer matches.
    run_state: Mapped[str] = mapped_column(String(120))
    previous_state: Mapped[str | None] = mapped_column(String(120))
    computed_at: Mapped[dt.datetime]


class MismatchCase(Base):
    """One disagreement per (openid, zone_id, check) while open; never deleted."""

    __tablename__ = "mismatch_cases"
    __table_args__ = (
        CheckConstraint(_in("status", CASE_STATUSES), name="status"),
        Index(
            "uq_mismatch_cases_open",
            "openid",
            "zone_id",
            "check",
            unique=True,
            postgresql_where=text(_in("status", OPEN_CASE_STATUSES)),
            sqlite_where=text(_in("status", OPEN_CASE_STATUSES)),
        ),
        Index("ix_mismatch_cases_status_due", "status", "confirm_due_at"),
        # The console: one account's cases in any status, cases by day, the cases of a run.
        Index("ix_mismatch_cases_account", "openid", "zone_id"),
        Index("ix_mismatch_cases_first_seen_at", "first_seen_at"),
        Index("ix_mismatch_cases_opened_run_id", "opened_run_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    openid: Mapped[str] = mapped_column(String(128))
    zone_id: Mapped[str] = mapped_column(String(64))
    check: Mapped[str] = mapped_column(String(32))  # a check name of PRODUCT.md §5
    status: Mapped[str] = mapped_column(String(16))
    midas_value: Mapped[int] = mapped_column(Coins)  # as last seen
    ledger_value: Mapped[int] = mapped_column(Coins)
    delta: Mapped[int] = mapped_column(Coins)  # midas_value - ledger_value
    first_seen_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    opened_run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    # When a suspected case's confirming re-fetch is due (first seen, or its difference last
    # changed, + the settle window; later while ledger rows are within the clock skew).
    confirm_due_at: Mapped[dt.datetime | None]
    # A suspected case whose confirming re-fetch could not observe the account (an expired
    # session) waits, with this reason, for the account's next login instead of costing a
    # request every pass; both null while it is not parked.
    parked_at: Mapped[dt.datetime | None]
    parked_reason: Mapped[str | None] = mapped_column(Text)


class MismatchEvent(Base):
    """Append-only history of a case: every transition, who made it and the numbers seen."""

    __tablename__ = "mismatch_events"
    __table_args__ = (
        Index("ix_mismatch_events_case_id", "case_id"),
        Index("ix_mismatch_events_snapshot_id", "snapshot_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("mismatch_cases.id"))
    at: Mapped[dt.datetime]
    actor: Mapped[str] = mapped_column(String(64))  # "system" or "operator:<name>"
    from_status: Mapped[str | None] = mapped_column(String(16))  # null for the opening event
    to_status: Mapped[str] = mapped_column(String(16))
    midas_value: Mapped[int | None] = mapped_column(Coins)
    ledger_value: Mapped[int | None] = mapped_column(Coins)
    # No foreign key: Postgres cannot refer to a partitioned table by `id` alone, and a month
    # dropped by `db retention` takes its snapshots with it. The event keeps the numbers.
    snapshot_id: Mapped[int | None] = mapped_column(BigId)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    note: Mapped[str | None] = mapped_column(Text)


class Cursor(Base):
    """Named high-water marks (e.g. the ledger scan's last seen ledger id)."""

    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime]


class Operator(Base):
    """A person who may log in to the console (`midas-recon operators add`)."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Recorded in case events as "operator:<name>" (mismatch_events.actor holds 64).
    name: Mapped[str] = mapped_column(String(55), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)  # Argon2id, encoded; never the password
    disabled_at: Mapped[dt.datetime | None]  # set by `operators disable`: no more logins
    last_login_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class Alert(Base):
    """An event worth a message (worker/alerts), recorded once: its key is its identity."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # e.g. "run:42:failed", "nightly_late:2026-12-03": a second sighting inserts nothing.
    dedupe_key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    # worker.alerts.events.Alert as JSON: what every format renders from. No URL, no secret.
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class AlertDelivery(Base):
    """One alert to one webhook: sent once, retried until then (a failed one is given up)."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),)

    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id"), primary_key=True)
    # The target's label (format#position:hash of the URL), never the URL: it holds the key.
    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), server_default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)  # redacted, label only
    sent_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())
