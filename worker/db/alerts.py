"""All SQL of alerts: record an event once, its deliveries, and what the periodic check reads."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Select, case, func, select, update
from sqlalchemy.orm import Session

from worker.alerts.events import Alert as AlertEvent
from worker.alerts.events import ClosedRun, ConfirmedCase
from worker.db.models import Alert, AlertDelivery, MismatchCase, MismatchEvent, Run
from worker.db.session import dialect_insert
from worker.vocabulary import OPEN_CASE_STATUSES, CaseStatus, DeliveryStatus, RunKind, RunStatus


def record(session: Session, alert: AlertEvent) -> int | None:
    """Insert the alert unless its key was seen before; its new id, or None."""
    stmt = (
        dialect_insert(session, Alert.__table__)  # type: ignore[arg-type]
        .values(dedupe_key=alert.key, kind=alert.kind.value, body=alert.dumps())
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(Alert.__table__.c.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def get(session: Session, alert_id: int) -> AlertEvent | None:
    body = session.scalar(select(Alert.body).where(Alert.id == alert_id))
    return AlertEvent.loads(body) if body is not None else None


def delivered(session: Session, alert_id: int) -> set[str]:
    """Targets that already took this alert (or were given up on)."""
    rows = session.scalars(
        select(AlertDelivery.target).where(
            AlertDelivery.alert_id == alert_id, AlertDelivery.status != DeliveryStatus.PENDING
        )
    )
    return set(rows)


def note_attempt(
    session: Session,
    alert_id: int,
    target: str,
    *,
    status: str,
    error: str | None,
    now: dt.datetime,
) -> None:
    """Count one attempt at a target and where it stands now."""
    table = AlertDelivery.__table__
    stmt = dialect_insert(session, table).values(  # type: ignore[arg-type]
        alert_id=alert_id,
        target=target,
        status=status,
        attempts=1,
        last_error=error,
        sent_at=now if status == DeliveryStatus.SENT else None,
        updated_at=now,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["alert_id", "target"],
        set_={
            "status": stmt.excluded.status,
            "attempts": table.c.attempts + 1,
            "last_error": stmt.excluded.last_error,
            "sent_at": stmt.excluded.sent_at,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    session.execute(stmt)


def give_up(session: Session, alert_id: int, target: str, *, now: dt.datetime) -> None:
    """No more retries for this delivery; its attempts and last error stay as they were."""
    session.execute(
        update(AlertDelivery)
        .where(AlertDelivery.alert_id == alert_id, AlertDelivery.target == target)
        .values(status=DeliveryStatus.FAILED, updated_at=now)
    )


def stalled(session: Session, targets: int, *, now: dt.datetime, quiet: dt.timedelta) -> list[int]:
    """Alerts of the last day that some target has not settled (sent or given up), with no
    attempt for `quiet`: their message was lost or their task killed. Not those retrying."""
    settled = func.sum(case((AlertDelivery.status != DeliveryStatus.PENDING, 1), else_=0))
    last_touch = func.coalesce(func.max(AlertDelivery.updated_at), Alert.created_at)
    rows = session.scalars(
        select(Alert.id)
        .outerjoin(AlertDelivery, AlertDelivery.alert_id == Alert.id)
        .where(Alert.created_at >= now - dt.timedelta(days=1), Alert.created_at < now - quiet)
        .group_by(Alert.id)
        .having(func.coalesce(settled, 0) < targets, last_touch < now - quiet)
        .order_by(Alert.id)
    )
    return list(rows)


@dataclass(frozen=True)
class SentAlert:
    id: int
    created_at: dt.datetime
    kind: str
    title: str
    deliveries: tuple[tuple[str, str, int, str | None], ...]  # target, status, attempts, error


def recent(session: Session, limit: int = 20) -> list[SentAlert]:
    """The newest alerts with their deliveries, newest first."""
    alerts = session.execute(
        select(Alert.id, Alert.created_at, Alert.kind, Alert.body)
        .order_by(Alert.id.desc())
        .limit(limit)
    ).all()
    by_alert: dict[int, list[tuple[str, str, int, str | None]]] = {}
    if alerts:
        for d in session.execute(
            select(
                AlertDelivery.alert_id,
                AlertDelivery.target,
                AlertDelivery.status,
                AlertDelivery.attempts,
                AlertDelivery.last_error,
            )
            .where(AlertDelivery.alert_id.in_([a.id for a in alerts]))
            .order_by(AlertDelivery.target)
        ):
            by_alert.setdefault(d.alert_id, []).append(
                (d.target, d.status, d.attempts, d.last_error)
            )
    return [
        SentAlert(
            a.id,
            a.created_at,
            a.kind,
            AlertEvent.loads(a.body).title,
            tuple(by_alert.get(a.id, [])),
        )
        for a in alerts
    ]


# -- what the periodic check reads --------------------------------------------------------------


def _closed_run_query() -> Select[Any]:
    """The run's columns a ClosedRun holds, named as its fields."""
    return select(*(getattr(Run, f.name) for f in fields(ClosedRun)))


def closed_runs(session: Session, since: dt.datetime) -> list[ClosedRun]:
    """Failed and incomplete runs that closed after `since` (ix_runs_status keeps it small)."""
    rows = session.execute(
        _closed_run_query()
        .where(Run.status.in_((RunStatus.FAILED, RunStatus.INCOMPLETE)), Run.finished_at >= since)
        .order_by(Run.id)
    ).all()
    return [ClosedRun(**row._asdict()) for row in rows]


def closed_run(session: Session, run_id: int) -> ClosedRun | None:
    row = session.execute(_closed_run_query().where(Run.id == run_id)).one_or_none()
    return ClosedRun(**row._asdict()) if row is not None else None


def confirmed_by_closed_runs(
    session: Session, since: dt.datetime | None = None, *, run_id: int | None = None
) -> dict[int, list[ConfirmedCase]]:
    """Cases still confirmed, grouped by the run whose fetch confirmed them, for runs that
    closed after `since` (or the given runs): a digest per run once it is over, not per batch.
    """
    query = (
        select(
            MismatchEvent.run_id,
            MismatchCase.id,
            MismatchCase.openid,
            MismatchCase.zone_id,
            MismatchCase.check,
            MismatchCase.delta,
        )
        .join(MismatchEvent, MismatchEvent.case_id == MismatchCase.id)
        .join(Run, Run.id == MismatchEvent.run_id)
        .where(
            MismatchCase.status == CaseStatus.CONFIRMED,  # ix_mismatch_cases_status_due
            MismatchEvent.to_status == CaseStatus.CONFIRMED,
            Run.status.in_((RunStatus.COMPLETE, RunStatus.INCOMPLETE, RunStatus.FAILED)),
        )
        .order_by(MismatchCase.id)
    )
    if run_id is not None:
        query = query.where(Run.id == run_id)
    if since is not None:
        query = query.where(Run.finished_at >= since)
    out: dict[int, list[ConfirmedCase]] = {}
    for row in session.execute(query):
        if row[0] is not None:  # joined to a run: never null here
            out.setdefault(row[0], []).append(ConfirmedCase(*row[1:]))
    return out


def nightly_status(session: Session, day: dt.date) -> str | None:
    """The status of the nightly run of `day`, or None when there is none."""
    return session.scalar(
        select(Run.status).where(Run.kind == RunKind.NIGHTLY, Run.business_date == day)
    )


def last_complete_nightly(session: Session) -> tuple[dt.date, dt.datetime] | None:
    """The business date and finish time of the newest complete nightly run."""
    row = session.execute(
        select(Run.business_date, Run.finished_at)
        .where(Run.kind == RunKind.NIGHTLY, Run.status == RunStatus.COMPLETE)
        .order_by(Run.business_date.desc())
        .limit(1)
    ).one_or_none()
    if row is None or row.finished_at is None:
        return None
    return row.business_date, row.finished_at


def latest_nightly_status(session: Session) -> str | None:
    return session.scalar(
        select(Run.status)
        .where(Run.kind == RunKind.NIGHTLY)
        .order_by(Run.business_date.desc())
        .limit(1)
    )


def cases_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(MismatchCase.status, func.count())
        .where(MismatchCase.status.in_(OPEN_CASE_STATUSES))
        .group_by(MismatchCase.status)
    ).all()
    return {status: int(n) for status, n in rows}
