"""The daily coin statement's queries (worker.reports.statement owns the figures): SQL
aggregates over runs, snapshots, the ledger and case events, per zone."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, and_, case, func, literal, or_, select, text, true
from sqlalchemy.orm import Session, aliased

from worker.db.models import (
    Account,
    BalanceSnapshot,
    LedgerEntry,
    MismatchCase,
    MismatchEvent,
    Run,
)
from worker.vocabulary import (
    CLOSED_CASE_STATUSES,
    CaseStatus,
    LedgerKind,
    RunKind,
    SnapshotStatus,
)

EVENT_COLUMNS = {  # case event to_status -> statement column
    CaseStatus.CONFIRMED: "cases_confirmed",
    CaseStatus.CLEARED: "cases_cleared",
    CaseStatus.RESOLVED: "cases_resolved",
    CaseStatus.ACKNOWLEDGED: "cases_acknowledged",
}


# The ledger kinds of the statement's flows, by the column each adds to.
FLOW_KINDS = {
    LedgerKind.SAVE: "top_ups",
    LedgerKind.PRESENT: "gifts",
    LedgerKind.COST: "spends",
    LedgerKind.CANCEL: "cancels",
}


def nightly_run(session: Session, business_date: dt.date) -> Run | None:
    return session.scalars(
        select(Run).where(Run.kind == RunKind.NIGHTLY, Run.business_date == business_date)
    ).one_or_none()


def nightly_runs(
    session: Session, first: dt.date, last: dt.date, *, status: str | None = None
) -> list[Run]:
    """The nightly runs of the dates from `first` to `last`, optionally of one status."""
    query = select(Run).where(
        Run.kind == RunKind.NIGHTLY, Run.business_date >= first, Run.business_date <= last
    )
    if status is not None:
        query = query.where(Run.status == status)
    return list(session.scalars(query.order_by(Run.business_date)))


def trend_totals(session: Session, run_ids: Sequence[int], zone_id: str | None) -> Iterable[Any]:
    """Midas totals over the ok snapshots of each of these runs, by business date."""
    snap = BalanceSnapshot
    query = (
        select(
            Run.business_date,
            func.sum(snap.balance).label("balance"),
            func.sum(snap.save_sum).label("save_sum"),
            func.sum(snap.cost_sum).label("cost_sum"),
            func.sum(snap.present_sum).label("present_sum"),
        )
        .join(snap, and_(snap.run_id == Run.id, snap.status == SnapshotStatus.OK))
        .where(Run.id.in_(run_ids))
        .group_by(Run.business_date)
    )
    if zone_id is not None:
        query = query.where(snap.zone_id == zone_id)
    return session.execute(query)


def open_cases_at(
    session: Session, moments: Sequence[dt.datetime], zone_id: str | None = None
) -> dict[str, list[int]]:
    """Per zone, how many cases were open at each moment, in one scan of the case events.

    A case is open at T when its first event is before T and no closing event (cleared,
    resolved) is; the same rule as the view v_case_intervals.
    """
    ev = MismatchEvent
    intervals = (
        select(
            MismatchCase.zone_id,
            func.min(ev.at).label("opened_at"),
            func.min(case((ev.to_status.in_(CLOSED_CASE_STATUSES), ev.at))).label("closed_at"),
        )
        .join(ev, ev.case_id == MismatchCase.id)
        .group_by(MismatchCase.id, MismatchCase.zone_id)
    )
    if zone_id is not None:
        intervals = intervals.where(MismatchCase.zone_id == zone_id)
    iv = intervals.subquery()
    # The moments are bound with the column's own type so SQLite compares like with like.
    at_type = ev.__table__.c.at.type
    columns = [
        func.sum(
            case(
                (
                    and_(
                        iv.c.opened_at < literal(m, at_type),
                        or_(iv.c.closed_at.is_(None), iv.c.closed_at >= literal(m, at_type)),
                    ),
                    1,
                ),
                else_=0,
            )
        ).label(f"m{i}")
        for i, m in enumerate(moments)
    ]
    rows = session.execute(select(iv.c.zone_id, *columns).group_by(iv.c.zone_id))
    return {row[0]: [int(v or 0) for v in row[1:]] for row in rows}


def zone_exists(session: Session, zone_id: str) -> bool:
    """Whether any account or ledger row names the zone."""
    for column in (Account.zone_id, LedgerEntry.zone_id):
        if session.execute(select(column).where(column == zone_id).limit(1)).first():
            return True
    return False


def coverage(session: Session, run_id: int, zone_id: str | None) -> Iterable[Any]:
    s = BalanceSnapshot
    query: Select[Any] = (
        select(
            s.zone_id,
            func.count().label("accounts"),
            count_if(s.status == SnapshotStatus.OK).label("ok"),
            count_if(s.status == SnapshotStatus.UNOBSERVABLE).label("unobservable"),
            count_if(s.status == SnapshotStatus.ERROR).label("error"),
            func.sum(s.balance).label("balance"),
            func.sum(s.save_sum).label("save_sum"),
            func.sum(s.cost_sum).label("cost_sum"),
            func.sum(s.present_sum).label("present_sum"),
        )
        .where(s.run_id == run_id)
        .group_by(s.zone_id)
    )
    if zone_id is not None:
        query = query.where(s.zone_id == zone_id)
    return session.execute(query)


def movement(
    session: Session,
    run_id: int,
    previous_id: int,
    zone_id: str | None,
    *,
    ledger_upto: int | None = None,
) -> Any:
    """Per zone: accounts ok in both runs, their counters' change and the ledger in between
    (only ledger ids <= `ledger_upto` when given), and the first and last fetch of the two.

    The accounts ok in both runs (`pairs`) are joined once and read by two zone-level
    aggregates joined on the zone, so no per-account grouping (and no sort of 1M accounts)
    is needed; v_account_movement is the per-account form of the same numbers.
    """
    cur = aliased(BalanceSnapshot, name="cur")
    prev = aliased(BalanceSnapshot, name="prev")
    led = LedgerEntry

    pairs_query = (
        select(
            cur.openid,
            cur.zone_id,
            prev.fetched_at.label("prev_at"),
            cur.fetched_at.label("cur_at"),
            prev.balance.label("opening"),
            cur.balance.label("closing"),
            (cur.save_sum - prev.save_sum).label("save_change"),
            (cur.cost_sum - prev.cost_sum).label("cost_change"),
            (cur.present_sum - prev.present_sum).label("present_change"),
        )
        .select_from(cur)
        .join(
            prev,
            and_(
                prev.run_id == previous_id,
                prev.openid == cur.openid,
                prev.zone_id == cur.zone_id,
                prev.status == SnapshotStatus.OK,
            ),
        )
        .where(cur.run_id == run_id, cur.status == SnapshotStatus.OK)
    )
    if zone_id is not None:
        pairs_query = pairs_query.where(cur.zone_id == zone_id)
    # Read twice below, so Postgres computes it once (a CTE used twice is materialized).
    pairs = pairs_query.cte("pairs")

    counters = (
        select(
            pairs.c.zone_id,
            func.count().label("compared"),
            func.sum(pairs.c.opening).label("opening_balance"),
            func.sum(pairs.c.closing).label("closing_balance"),
            func.sum(pairs.c.save_change).label("midas_save_sum_change"),
            func.sum(pairs.c.cost_change).label("midas_cost_sum_change"),
            func.sum(pairs.c.present_change).label("midas_present_sum_change"),
        )
        .group_by(pairs.c.zone_id)
        .subquery("counters")
    )

    # The reconciliation's own window: what happened after the previous date's fetch, up to
    # this one; when the previous date's run fetched later (a backfill), what happened after
    # this fetch up to that one, with a minus sign.
    forward = pairs.c.prev_at <= pairs.c.cur_at
    sign = case((forward, 1), else_=-1)
    # Every account's window lies between the first and the last fetch of the two runs: the
    # same rows, but a range Postgres reads from ix_ledger_entries_occurred_at (a day or two
    # of ledger) instead of hashing the whole ledger against the accounts.
    ends = select(
        func.min(pairs.c.prev_at).label("first_prev"),
        func.min(pairs.c.cur_at).label("first_cur"),
        func.max(pairs.c.prev_at).label("last_prev"),
        func.max(pairs.c.cur_at).label("last_cur"),
    ).cte("ends")  # one pass over the pairs, read by the two bounds
    first_fetch = select(
        case((ends.c.first_prev < ends.c.first_cur, ends.c.first_prev), else_=ends.c.first_cur)
    ).scalar_subquery()
    last_fetch = select(
        case((ends.c.last_prev > ends.c.last_cur, ends.c.last_prev), else_=ends.c.last_cur)
    ).scalar_subquery()
    flows = (
        select(
            pairs.c.zone_id,
            *(
                func.sum(sign * case((led.kind == kind, led.amount), else_=0)).label(name)
                for kind, name in FLOW_KINDS.items()
            ),
        )
        .select_from(pairs)
        .join(
            led,
            and_(
                led.openid == pairs.c.openid,
                led.zone_id == pairs.c.zone_id,
                or_(
                    and_(
                        forward,
                        led.occurred_at > pairs.c.prev_at,
                        led.occurred_at <= pairs.c.cur_at,
                    ),
                    and_(
                        ~forward,
                        led.occurred_at > pairs.c.cur_at,
                        led.occurred_at <= pairs.c.prev_at,
                    ),
                ),
            ),
        )
        .where(
            led.occurred_at > first_fetch,
            led.occurred_at <= last_fetch,
            true() if ledger_upto is None else led.id <= ledger_upto,
        )
        .group_by(pairs.c.zone_id)
        .subquery("flows")
    )
    query = select(
        counters,
        *(func.coalesce(flows.c[name], 0).label(name) for name in FLOW_KINDS.values()),
        first_fetch.label("first_fetch_at"),
        last_fetch.label("last_fetch_at"),
    ).outerjoin(flows, flows.c.zone_id == counters.c.zone_id)
    return session.execute(query)


def late_flows(
    session: Session,
    run: Run,
    previous: Run,
    *,
    above_id: int,
    window: tuple[dt.datetime, dt.datetime],
    zone_id: str | None,
) -> Iterable[Any]:
    """Per zone, `movement`'s ledger flows over the ledger rows with id > `above_id` only.

    The rows are few (those recorded after the figures were stored): each finds its account's
    two snapshots through the one-per-account key, instead of pairing the two nights.
    `window` is the first and last fetch of the two runs, outside which no row can count.
    """
    cur = aliased(BalanceSnapshot, name="cur")
    prev = aliased(BalanceSnapshot, name="prev")
    led = LedgerEntry
    forward = prev.fetched_at <= cur.fetched_at
    sign = case((forward, 1), else_=-1)

    def both(snap: Any, of: Run) -> Any:
        return and_(
            snap.run_id == of.id,
            snap.business_date == of.business_date,  # the partition, on Postgres
            snap.openid == led.openid,
            snap.zone_id == led.zone_id,
            snap.status == SnapshotStatus.OK,
        )

    query = (
        select(
            led.zone_id,
            *(
                func.sum(sign * case((led.kind == kind, led.amount), else_=0)).label(name)
                for kind, name in FLOW_KINDS.items()
            ),
        )
        .select_from(led)
        .join(cur, both(cur, run))
        .join(prev, both(prev, previous))
        .where(
            led.id > above_id,
            led.occurred_at > window[0],
            led.occurred_at <= window[1],
            or_(
                and_(forward, led.occurred_at > prev.fetched_at, led.occurred_at <= cur.fetched_at),
                and_(
                    ~forward, led.occurred_at > cur.fetched_at, led.occurred_at <= prev.fetched_at
                ),
            ),
        )
        .group_by(led.zone_id)
    )
    if zone_id is not None:
        query = query.where(led.zone_id == zone_id)
    return session.execute(query)


def day_ledger(
    session: Session, start: dt.datetime, end: dt.datetime, zone_id: str | None
) -> Iterable[Any]:
    led = LedgerEntry
    query = (
        select(led.zone_id, led.kind, func.sum(led.amount).label("amount"))
        .where(led.occurred_at >= start, led.occurred_at < end)
        .group_by(led.zone_id, led.kind)
    )
    if zone_id is not None:
        query = query.where(led.zone_id == zone_id)
    return session.execute(query)


def day_case_events(
    session: Session, start: dt.datetime, end: dt.datetime, zone_id: str | None
) -> Iterable[Any]:
    """Per zone, distinct cases that reached each status during the day."""
    ev = MismatchEvent

    def cases_where(cond: Any) -> Any:
        return func.count(func.distinct(case((cond, ev.case_id))))

    query = (
        select(
            MismatchCase.zone_id,
            cases_where(ev.from_status.is_(None)).label("opened"),
            *(cases_where(ev.to_status == s).label(s) for s in EVENT_COLUMNS),
        )
        .join(ev, ev.case_id == MismatchCase.id)
        .where(ev.at >= start, ev.at < end)
        .group_by(MismatchCase.zone_id)
    )
    if zone_id is not None:
        query = query.where(MismatchCase.zone_id == zone_id)
    return session.execute(query)


def tune_for_reporting(session: Session) -> None:
    # Postgres JIT-compiles these few big aggregates and spends longer compiling (~150 ms per
    # query) than running them. SET LOCAL ends with the transaction.
    # random_page_cost 4 (the default, priced for spinning disks) made one night's snapshots
    # (1 M of 30 M rows, stored together) look dearer through the run_id index than reading
    # all 30 nights: 4.3 s instead of 0.48 s. 1.1 prices pages as SSD and the cache serve them.
    # work_mem 4 MB (the default) spilled the 1M accounts of two nights to disk: hash joins
    # in 16 batches, an external sort; one report at a time can afford 64 MB per node.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL jit = off"))
        session.execute(text("SET LOCAL random_page_cost = 1.1"))
        session.execute(text("SET LOCAL work_mem = '64MB'"))


def count_if(cond: Any) -> Any:
    return func.sum(case((cond, 1), else_=0))
