"""Celery tasks: JSON ids in, one transaction around one service call, follow-ups after it.

The follow-ups (the next messages, the Redis keys that go with them) are worker.dispatch's,
registered with `after_commit` inside the transaction: sent once it committed, never when it
rolled back.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Final

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from worker import business_calendar as clock
from worker import dispatch
from worker.business_calendar import FutureDate
from worker.celery_app import (
    FETCH_HARD_LIMIT_S,
    FETCH_SOFT_LIMIT_S,
    PLAN_HARD_LIMIT_S,
    PLAN_SOFT_LIMIT_S,
    project_task,
)
from worker.config import ConfigError, get_settings
from worker.db.runs import unfinished_runs
from worker.db.session import after_commit, after_rollback, session_scope
from worker.recon import rechecks
from worker.recon import runs as service
from worker.recon.batches import parse_claim
from worker.text import strip_controls
from worker.vocabulary import RunKind, RunStatus

log = logging.getLogger(__name__)


# -- arguments ----------------------------------------------------------------------------------

# Ids are BIGINT; a batch holds at most MAX_BATCH of them (worker.recon.runs).
_MAX_ID: Final = 2**63 - 1
_MAX_IDS: Final = 10_000


def _is_id(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 < value <= _MAX_ID


def _run_id(value: object) -> int:
    """A run id from a message: refused with a plain ValueError before it reaches SQL."""
    if not isinstance(value, int) or not _is_id(value):
        raise ValueError("run_id must be a positive integer")
    return value


def _account_ids(value: object) -> list[int]:
    if not isinstance(value, list) or len(value) > _MAX_IDS or not all(map(_is_id, value)):
        raise ValueError("account_ids must be a list of positive integers")
    return [int(a) for a in value]


# -- tasks --------------------------------------------------------------------------------------


# A database or Redis that is briefly away when beat fires must not cost the night.
TRANSIENT: Final = (OperationalError, InterfaceError, redis.ConnectionError, redis.TimeoutError)


@project_task(
    "start_nightly",
    soft_time_limit=PLAN_SOFT_LIMIT_S,
    time_limit=PLAN_HARD_LIMIT_S,
    retry_on=TRANSIENT,
)
def start_nightly(business_date: str | None = None, trigger: str = "beat") -> None:
    """Plan the nightly run of the date the message stands for (beat puts it in the message;
    without one, the date of the latest scheduled start); a second start is a no-op."""
    day = dt.date.fromisoformat(business_date) if business_date is not None else None
    if not isinstance(trigger, str) or not 0 < len(trigger := strip_controls(trigger)) <= 32:
        raise ValueError("trigger must be a short name")
    settings = dispatch.runtime().settings
    try:
        with session_scope(settings.DATABASE_URL) as session:
            started = service.start_nightly(session, settings, business_date=day, trigger=trigger)
            # Planning: it waits for the night before.
            if started.status in (RunStatus.RUNNING, RunStatus.PLANNING):
                after_commit(session, lambda: dispatch.request_pump(started.run_id))
    except FutureDate as exc:
        log.error("nightly_refused", extra={"reason": str(exc)})  # a retry cannot help


@project_task("pump")
def pump(run_id: int) -> None:
    """Claim the next batches of a run while the queue has room; finalize when all is done."""
    run_id = _run_id(run_id)
    settings = dispatch.runtime().settings
    dispatch.pump_started(run_id)
    with session_scope(settings.DATABASE_URL) as session:
        result = service.pump(
            session,
            run_id,
            room=dispatch.room,
            size=service.batch_size(settings),
            is_alive=dispatch.claim_alive(run_id),
            settings=settings,
        )
        if result.status != RunStatus.RUNNING:
            after_commit(session, lambda: dispatch.run_closed(run_id))
        after_commit(session, lambda: dispatch.send_batches(result.batches, result.kind))
        # The night before closed: the next one may plan now.
        after_commit(session, lambda: dispatch.request_pumps(result.wake))


@project_task("fetch_batch", soft_time_limit=FETCH_SOFT_LIMIT_S, time_limit=FETCH_HARD_LIMIT_S)
def fetch_batch(run_id: int, account_ids: list[int], claim: str | None = None) -> None:
    """Fetch, store and compare one claimed batch; ask for the next one."""
    run_id, account_ids = _run_id(run_id), _account_ids(account_ids)
    if claim is None:
        # Only the pump (and the recheck and confirm planners) hand out batches: a batch
        # without a claim would race them for the same accounts.
        log.error("batch_without_claim", extra={"run_id": run_id})
        return
    rt = dispatch.runtime()
    token = parse_claim(claim)
    try:
        deps = rt.fetch_deps()
    except ConfigError as exc:
        # Like 90011: every call would fail. The run stops with the one-line reason (it names
        # the variable, never a value) and resumes with `midas-recon run --date D`.
        with session_scope(rt.settings.DATABASE_URL) as session:
            service.fail_run(session, run_id, f"configuration: {exc}")
            after_commit(session, lambda: dispatch.run_closed(run_id))
        return
    with dispatch.heartbeat(run_id, token):
        result = service.run_batch(
            lambda: session_scope(rt.settings.DATABASE_URL),
            deps,
            run_id,
            account_ids,
            token,
        )
    # run_batch owns its two transactions and has committed both: its follow-ups may go.
    if result.stopped is not None:
        dispatch.run_closed(run_id)
    if result.kind is not None:
        dispatch.request_pump(run_id)
    if result.confirm_due is not None:
        dispatch.schedule_confirm(result.confirm_due)


@project_task("sweep")
def sweep() -> None:
    """Pump every running run: lost pumps, stale claims and unfinalized runs heal here."""
    with session_scope(get_settings().DATABASE_URL) as session:
        running = unfinished_runs(session)
        after_commit(session, lambda: dispatch.request_pumps(run_id for run_id, _ in running))


@project_task("recheck", retry_on=TRANSIENT)
def recheck(
    openid: str, zone_id: str = "1", reason: str | None = None, bill_no: str | None = None
) -> None:
    """After a payment: fetch the account soon, once per burst."""
    try:
        request = rechecks.validate_recheck(openid, zone_id, reason, bill_no)
    except rechecks.RecheckRejected as exc:
        log.error("recheck_rejected", extra={"reason": str(exc)})
        return
    rt = dispatch.runtime()
    if not rechecks.first_of_burst(rt.redis, request.openid, request.zone_id):
        log.info("recheck_debounced", extra={"openid": request.openid, "zone_id": request.zone_id})
        return
    with session_scope(rt.settings.DATABASE_URL) as session:
        # If planning fails (the task retries on a transient error), a burst key left behind
        # would debounce the retry itself and the recheck would be lost. The key is taken
        # before planning, not after: two messages of one burst planned side by side would
        # make two runs. A send failing after the commit keeps it: the sweep sends the batch.
        after_rollback(
            session, lambda: rechecks.forget_burst(rt.redis, request.openid, request.zone_id)
        )
        batch = rechecks.plan_recheck(session, rt.settings, request)
        after_commit(
            session,
            lambda: dispatch.send_batch(batch, RunKind.RECHECK, countdown=rechecks.RECHECK_DELAY_S),
        )


@project_task("record_login", retry_on=TRANSIENT)
def record_login(
    openid: str, zone_id: str = "1", session_key: str | None = None, at: str | None = None
) -> None:
    """The game's login handler: remember the account, its activity and session key.

    `session_key` is sealed with SESSION_KEY_TRANSPORT_KEY (worker.intake.seal_session_key).
    """
    from worker.db.crypto import TRANSPORT_VARIABLE, SessionKeyCipher
    from worker.recon.logins import LoginRejected
    from worker.recon.logins import record_login as record

    settings = get_settings()
    cipher = transport = None
    if session_key:
        cipher = SessionKeyCipher.from_settings(settings)
        transport = SessionKeyCipher.from_settings(settings, TRANSPORT_VARIABLE)
    try:
        with session_scope(settings.DATABASE_URL) as session:
            record(session, cipher, openid, zone_id, session_key, at, transport=transport)
    except LoginRejected as exc:
        log.error("login_rejected", extra={"reason": str(exc)})


@project_task("scan_ledger", soft_time_limit=120, time_limit=150)
def scan_ledger() -> None:
    """Recheck the accounts of ledger rows that appeared since the last scan."""
    raw = dispatch.ledger_scan_state()
    state = rechecks.ScanState.loads(raw) if raw else None
    with session_scope(dispatch.runtime().settings.DATABASE_URL) as session:
        result = rechecks.scan_ledger(session, state)
        if not result.busy:
            after_commit(session, lambda: dispatch.save_ledger_scan_state(result.state.dumps()))
            after_commit(session, lambda: dispatch.send_rechecks(result.accounts, "ledger"))


@project_task("confirm_pass", soft_time_limit=120, time_limit=150)
def confirm_pass() -> None:
    """Re-fetch the accounts whose suspected cases are due (one confirm run)."""
    settings = dispatch.runtime().settings
    with session_scope(settings.DATABASE_URL) as session:
        batches = rechecks.plan_confirm_pass(session, settings, size=service.batch_size(settings))
        after_commit(session, lambda: dispatch.send_batches(batches, RunKind.CONFIRM))


# -- alerts (worker/alerts) ---------------------------------------------------------------------

# Retries of one alert: backoff 1, 2, 4 ... up to 60 s (with jitter), three minutes at most in
# all; then the delivery is marked failed (`midas-recon alerts list`) and the Prometheus rules
# remain.
ALERT_MAX_RETRIES: Final = 8


class AlertNotDelivered(Exception):
    """Some webhook did not take the alert yet; the task retries with backoff."""


# Each target gets (connect, read) timeouts of 10 s: a few slow webhooks fit the soft limit.
@project_task(
    "send_alert",
    soft_time_limit=150,
    time_limit=180,
    retry_on=(AlertNotDelivered,),
    max_retries=ALERT_MAX_RETRIES,
)
def send_alert(alert_id: int) -> None:
    """Deliver one recorded alert to every webhook that has not taken it yet."""
    from celery import current_task

    from worker.alerts.service import deliver, give_up, targets

    if not _is_id(alert_id):
        raise ValueError("alert_id must be a positive integer")
    settings = get_settings()
    to = targets(settings)
    if not to:
        return

    def db() -> Any:
        return session_scope(settings.DATABASE_URL)

    failed = deliver(db, alert_id, to, now=clock.utcnow)
    if not failed:
        return
    if current_task.request.retries >= ALERT_MAX_RETRIES:
        give_up(db, alert_id, failed, now=clock.utcnow())
        return
    raise AlertNotDelivered(f"alert {alert_id}: {len(failed)} target(s) to retry")


@project_task("check_alerts")
def check_alerts() -> None:
    """Record the alerts the current state calls for, send the new ones, refresh the gauges."""
    from worker.alerts import service as alerts
    from worker.midas.limiter import fleet_pauses_since

    rt = dispatch.runtime()
    now = clock.utcnow()
    pauses = fleet_pauses_since(rt.redis, now.timestamp() - 3600)
    with session_scope(rt.settings.DATABASE_URL) as session:
        new = alerts.record(
            session, alerts.due_alerts(session, rt.settings, now, pauses_last_hour=pauses)
        )
        again = alerts.stalled(session, rt.settings, now)
        alerts.refresh_gauges(session, rt.settings, pauses_last_hour=pauses)
        after_commit(session, lambda: dispatch.send_alerts([*new, *again]))


@project_task("ensure_partitions")
def ensure_partitions() -> None:
    """Make the month partitions of balance_snapshots for this month and the next two."""
    from worker.recon.retention import ensure_ahead

    settings = get_settings()
    with session_scope(settings.DATABASE_URL) as session:
        created = ensure_ahead(session, settings.calendar.today(clock.utcnow()))
    if created:
        log.info("partitions_created", extra={"partitions": ",".join(created)})
