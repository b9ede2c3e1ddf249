"""Alerts end to end: which events are due, recorded once, delivered to every webhook.

Nothing here runs inside a run's transaction: the periodic check (worker.tasks.check_alerts)
reads what runs left behind, and `raise_for_run` is a separate short transaction a task may
call after a run closed. Delivery is an HTTP call per target, each result stored in its own
short transaction, so no database lock waits for a webhook.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Final

import requests
from sqlalchemy.orm import Session

from worker.alerts import events
from worker.alerts.delivery import DeliveryFailed, post
from worker.alerts.events import Alert
from worker.alerts.targets import Target, parse_targets
from worker.config import Settings
from worker.db import alerts as repo
from worker.logs import redact
from worker.metrics import (
    ALERTS_SENT,
    FLEET_PAUSES_LAST_HOUR,
    LAST_COMPLETE_NIGHTLY,
    LAST_COMPLETE_NIGHTLY_DATE,
    LATEST_NIGHTLY_STATUS,
    OPEN_CASES,
    RATE_LIMIT,
)
from worker.vocabulary import (
    OPEN_CASE_STATUSES,
    RUN_STATUSES,
    DeliveryStatus,
    RunStatus,
)

log = logging.getLogger(__name__)

Db = Callable[[], AbstractContextManager[Session]]

# How far back the periodic check looks for closed runs. Keys make a second look harmless;
# two days cover a worker fleet that was down for a night.
LOOKBACK: Final = dt.timedelta(hours=48)
# A deadline missed longer ago than this is not announced any more (a fresh install, or a
# database restored from an old backup, would otherwise start with stale alarms).
LATE_NOTICE_WINDOW: Final = dt.timedelta(hours=24)
# A delivery with no attempt for this long is not retrying any more (the retries of one task
# are at most a minute apart): its message was lost, or its task was killed. Sent again.
STALLED_AFTER: Final = dt.timedelta(minutes=10)


def targets(settings: Settings) -> list[Target]:
    hooks = settings.RECON_ALERT_WEBHOOKS
    return parse_targets(hooks.get_secret_value()) if hooks is not None else []


# -- which events are due -------------------------------------------------------------------


def due_alerts(
    session: Session, settings: Settings, now: dt.datetime, *, pauses_last_hour: int
) -> list[Alert]:
    """Every alert the current state calls for; recording them (dedupe) decides what is new."""
    base = settings.RECON_WEB_BASE_URL
    since = now - LOOKBACK
    out = [a for run in repo.closed_runs(session, since) if (a := events.run_closed(run, base))]
    for run_id, cases in repo.confirmed_by_closed_runs(session, since).items():
        if digest := events.cases_confirmed(run_id, cases, base):
            out.append(digest)
    if late := late_nightly(session, settings, now):
        out.append(late)
    if pauses_last_hour > settings.RECON_ALERT_PAUSE_STORM:
        out.append(events.pause_storm(pauses_last_hour, settings.RECON_ALERT_PAUSE_STORM, now))
    return out


def late_nightly(session: Session, settings: Settings, now: dt.datetime) -> Alert | None:
    """The newest business date whose nightly deadline has passed, if its run is not complete."""
    calendar = settings.calendar
    day = calendar.nightly_date_for(now)
    # The newest started nightly may still be within its deadline: then the one before it.
    for candidate in (day, day - dt.timedelta(days=1)):
        deadline = calendar.nightly_deadline(candidate)
        if deadline > now:
            continue
        if now - deadline > LATE_NOTICE_WINDOW or repo.latest_nightly_status(session) is None:
            return None  # long past, or no nightly ever ran here: nothing to say yet
        status = repo.nightly_status(session, candidate)
        return (
            None
            if status == RunStatus.COMPLETE
            else events.nightly_late(candidate, deadline, status)
        )
    return None


def stalled(session: Session, settings: Settings, now: dt.datetime) -> list[int]:
    """Alerts whose delivery stopped without an outcome (a lost message, a killed task), to
    send again; the retries of a live one, and given-up deliveries, are left alone."""
    to = targets(settings)
    if not to:
        return []
    return repo.stalled(session, len(to), now=now, quiet=STALLED_AFTER)


def record(session: Session, alerts: Iterable[Alert]) -> list[int]:
    """Record each alert unless its key was seen; the ids of the new ones."""
    new = [alert_id for a in alerts if (alert_id := repo.record(session, a)) is not None]
    if new:
        log.info("alerts_recorded", extra={"alert_ids": new})
    return new


def raise_for_run(session: Session, settings: Settings, run_id: int) -> list[int]:
    """The alerts of one run that has just closed (failed, incomplete, cases confirmed)."""
    base = settings.RECON_WEB_BASE_URL
    run = repo.closed_run(session, run_id)
    if run is None or run.status in (RunStatus.PLANNING, RunStatus.RUNNING):
        return []
    due = [a] if (a := events.run_closed(run, base)) else []
    cases = repo.confirmed_by_closed_runs(session, run_id=run_id)
    if digest := events.cases_confirmed(run_id, cases.get(run_id, []), base):
        due.append(digest)
    return record(session, due)


# -- delivery ---------------------------------------------------------------------------------


def deliver(
    db: Db,
    alert_id: int,
    to: list[Target],
    *,
    now: Callable[[], dt.datetime],
    http: requests.Session | None = None,
) -> list[str]:
    """Send the alert to each target that has not taken it yet; the labels that failed."""
    with db() as session:
        alert = repo.get(session, alert_id)
        done = repo.delivered(session, alert_id)
    if alert is None:
        log.error("alert_missing", extra={"alert_id": alert_id})
        return []
    failed: list[str] = []
    for target in to:
        if target.label in done:
            continue
        try:
            post(target, alert, session=http)
        except DeliveryFailed as exc:
            error = redact(str(exc))
            failed.append(target.label)
            with db() as session:
                repo.note_attempt(
                    session,
                    alert_id,
                    target.label,
                    status=DeliveryStatus.PENDING,
                    error=error,
                    now=now(),
                )
            ALERTS_SENT.labels(alert.kind.value, "retry").inc()
            log.warning(
                "alert_not_delivered",
                extra={"alert_id": alert_id, "target": target.label, "error": error},
            )
            continue
        # A crash between the POST and this commit sends the message again on the retry:
        # a webhook cannot be part of our transaction, so "once" holds up to that window.
        with db() as session:
            repo.note_attempt(
                session, alert_id, target.label, status=DeliveryStatus.SENT, error=None, now=now()
            )
        ALERTS_SENT.labels(alert.kind.value, DeliveryStatus.SENT).inc()
        log.info("alert_delivered", extra={"alert_id": alert_id, "target": target.label})
    return failed


def give_up(db: Db, alert_id: int, labels: list[str], *, now: dt.datetime) -> None:
    """Retries are spent: mark these deliveries failed (`alerts list` shows them)."""
    with db() as session:
        alert = repo.get(session, alert_id)
        for label in labels:
            repo.give_up(session, alert_id, label, now=now)
    kind = alert.kind.value if alert else "unknown"
    ALERTS_SENT.labels(kind, DeliveryStatus.FAILED).inc(len(labels))
    log.error("alert_given_up", extra={"alert_id": alert_id, "targets": labels})


# -- gauges for Prometheus --------------------------------------------------------------------


def refresh_gauges(session: Session, settings: Settings, *, pauses_last_hour: int) -> None:
    """Set the state gauges from Postgres (worker.metrics): the alert rules read them."""
    RATE_LIMIT.set(settings.MIDAS_RATE_LIMIT)
    last = repo.last_complete_nightly(session)
    if last is None:
        LAST_COMPLETE_NIGHTLY.set(0)
        LAST_COMPLETE_NIGHTLY_DATE.set(0)
    else:
        day, finished = last
        LAST_COMPLETE_NIGHTLY.set(finished.timestamp())
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        LAST_COMPLETE_NIGHTLY_DATE.set(midnight.timestamp())
    latest = repo.latest_nightly_status(session)
    for status in RUN_STATUSES:
        LATEST_NIGHTLY_STATUS.labels(status).set(1 if status == latest else 0)
    counts = repo.cases_by_status(session)
    for status in OPEN_CASE_STATUSES:
        OPEN_CASES.labels(status).set(counts.get(status, 0))
    FLEET_PAUSES_LAST_HOUR.set(pauses_last_hour)
