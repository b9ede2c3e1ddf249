"""Celery tasks: JSON ids in, one transaction around one service call, follow-ups after it.

Follow-up messages are sent only after the transaction committed, so a message never points
at rows that do not exist; a crash between the commit and the send is repaired by the sweep
(stale claims go back to the plan, running runs are pumped again).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from worker import business_calendar as clock
from worker.business_calendar import FutureDate
from worker.celery_app import (
    FETCH_HARD_LIMIT_S,
    FETCH_SOFT_LIMIT_S,
    MAX_COUNTDOWN_S,
    NIGHTLY_QUEUE,
    PLAN_HARD_LIMIT_S,
    PLAN_SOFT_LIMIT_S,
    RECHECK_QUEUE,
    project_task,
)
from worker.config import ConfigError, Settings, get_settings
from worker.db.runs import unfinished_runs
from worker.db.session import session_scope
from worker.recon import rechecks
from worker.recon import runs as service
from worker.recon.batches import Batch, parse_claim
from worker.text import strip_controls

log = logging.getLogger(__name__)

# Fetch batches waiting in the nightly queue, at most: enough that a process finishing a
# batch finds the next one at once (the pump refills after every batch), few enough that
# the plan stays in Postgres and a recheck never queues behind a long list.
NIGHTLY_QUEUE_DEPTH: Final = 4
# Batches a pump may send at once for a recheck or confirm run (small runs, fast lane).
FAST_LANE_BATCHES: Final = 10
# One pump message per run at a time; if it is lost the key expires and the sweep sends one.
PUMP_KEY_TTL_MS: Final = 30_000
# A claim is alive while its Redis key exists. The sender sets it for the time a message may
# wait in a queue (a countdown included); the batch refreshes it while it runs, with a short
# expiry, so the claims of a worker killed outright are taken back within half a minute.
QUEUED_CLAIM_TTL_MS: Final = 300_000
RUNNING_CLAIM_TTL_MS: Final = 20_000
HEARTBEAT_EVERY_S: Final = 5.0
# Confirm passes scheduled for the same few seconds are sent once.
CONFIRM_BUCKET_S: Final = 5
LEDGER_SCAN_STATE_KEY: Final = "midas_recon:ledger_scan:state"


# -- per-process resources ----------------------------------------------------------------------


@dataclass
class _Runtime:
    settings: Settings
    redis: redis.Redis
    deps: service.FetchDeps | None = None

    def fetch_deps(self) -> service.FetchDeps:
        if self.deps is None:
            from worker.midas.limiter import make_limiter

            limiter = make_limiter(self.settings, redis=self.redis)
            self.deps = service.FetchDeps.from_settings(
                self.settings, limiter=limiter, redis=self.redis
            )
        return self.deps


_lock = threading.Lock()
_runtime: tuple[int, _Runtime] | None = None


def runtime() -> _Runtime:
    """This process's Redis client, limiter and Midas client, made after the fork."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime[0] != os.getpid():
            settings = get_settings()
            if settings.REDIS_URL is None:
                raise RuntimeError("REDIS_URL is not set: the Celery tasks need Redis")
            client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=10.0, socket_connect_timeout=5.0
            )
            _runtime = (os.getpid(), _Runtime(settings, client))
        return _runtime[1]


# -- sending follow-ups -------------------------------------------------------------------------


def claim_key(run_id: int, claim: dt.datetime) -> str:
    return f"midas_recon:claim:{run_id}:{claim.isoformat()}"


def claim_alive(run_id: int) -> Callable[[dt.datetime], bool]:
    client = runtime().redis
    return lambda claim: bool(client.exists(claim_key(run_id, claim)))


def dispatch_batch(batch: Batch, kind: str, *, countdown: float | None = None) -> None:
    """Mark the claim alive, then send the batch: nightly batches to the bulk lane, recheck
    and confirm batches to the fast one."""
    runtime().redis.set(claim_key(batch.run_id, batch.claim), "1", px=QUEUED_CLAIM_TTL_MS)
    queue = NIGHTLY_QUEUE if kind == "nightly" else RECHECK_QUEUE
    fetch_batch.apply_async(
        args=(batch.run_id, batch.account_ids, batch.claim_token), queue=queue, countdown=countdown
    )


@contextmanager
def heartbeat(run_id: int, claim: dt.datetime) -> Iterator[None]:
    """Keep the claim's key alive while the batch runs; drop it when the batch ends."""
    client, key = runtime().redis, claim_key(run_id, claim)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                client.set(key, "1", px=RUNNING_CLAIM_TTL_MS)
            except redis.RedisError:
                log.warning("heartbeat_failed", extra={"run_id": run_id})
            if stop.wait(HEARTBEAT_EVERY_S):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        client.delete(key)


def request_pump(run_id: int, *, countdown: float | None = None) -> None:
    """Send a pump for the run unless one is already on its way."""
    if runtime().redis.set(f"midas_recon:pump:{run_id}", "1", nx=True, px=PUMP_KEY_TTL_MS):
        pump.apply_async(args=(run_id,), countdown=countdown)


def schedule_confirm(due: dt.datetime) -> None:
    """A confirm pass just after `due`; further out than the longest countdown we send, the
    periodic pass takes it (an ETA message longer than that risks a second delivery)."""
    wait = (due - clock.utcnow()).total_seconds()
    if wait > MAX_COUNTDOWN_S:
        return
    bucket = -(-int(due.timestamp()) // CONFIRM_BUCKET_S) * CONFIRM_BUCKET_S
    countdown = max(0.0, bucket - clock.utcnow().timestamp()) + 0.5
    key = f"midas_recon:confirm_at:{bucket}"
    if runtime().redis.set(key, "1", nx=True, px=int((countdown + 60) * 1000)):
        confirm_pass.apply_async(countdown=countdown)


def _room(kind: str) -> int:
    if kind != "nightly":
        return FAST_LANE_BATCHES
    # Messages without a priority sit in the Redis list named after the queue (kombu).
    waiting = int(runtime().redis.llen(NIGHTLY_QUEUE))
    return max(0, NIGHTLY_QUEUE_DEPTH - waiting)


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
    rt = runtime()
    try:
        with session_scope(rt.settings.DATABASE_URL) as session:
            started = service.start_nightly(
                session, rt.settings, business_date=day, trigger=trigger
            )
    except FutureDate as exc:
        log.error("nightly_refused", extra={"reason": str(exc)})  # a retry cannot help
        return
    if started.status in ("running", "planning"):  # planning: it waits for the night before
        request_pump(started.run_id)


@project_task("pump")
def pump(run_id: int) -> None:
    """Claim the next batches of a run while the queue has room; finalize when all is done."""
    run_id = _run_id(run_id)
    rt = runtime()
    # From here on a new request may send the next pump: this one may not see its work.
    rt.redis.delete(f"midas_recon:pump:{run_id}")
    with session_scope(rt.settings.DATABASE_URL) as session:
        result = service.pump(
            session,
            run_id,
            room=_room,
            size=service.batch_size(rt.settings),
            is_alive=claim_alive(run_id),
            settings=rt.settings,
        )
    if result.status != "running":
        notify_run_closed(run_id)
    for batch in result.batches:
        dispatch_batch(batch, result.kind)
    for waiting in result.wake:  # the night before closed: the next one may plan now
        request_pump(waiting)


@project_task("fetch_batch", soft_time_limit=FETCH_SOFT_LIMIT_S, time_limit=FETCH_HARD_LIMIT_S)
def fetch_batch(run_id: int, account_ids: list[int], claim: str | None = None) -> None:
    """Fetch, store and compare one claimed batch; ask for the next one."""
    run_id, account_ids = _run_id(run_id), _account_ids(account_ids)
    if claim is None:
        # Only the pump (and the recheck and confirm planners) hand out batches: a batch
        # without a claim would race them for the same accounts.
        log.error("batch_without_claim", extra={"run_id": run_id})
        return
    rt = runtime()
    token = parse_claim(claim)
    try:
        deps = rt.fetch_deps()
    except ConfigError as exc:
        # Like 90011: every call would fail. The run stops with the one-line reason (it names
        # the variable, never a value) and resumes with `midas-recon run --date D`.
        with session_scope(rt.settings.DATABASE_URL) as session:
            service.fail_run(session, run_id, f"configuration: {exc}")
        notify_run_closed(run_id)
        return
    with heartbeat(run_id, token):
        result = service.run_batch(
            lambda: session_scope(rt.settings.DATABASE_URL),
            deps,
            run_id,
            account_ids,
            token,
        )
    if result.stopped is not None:
        notify_run_closed(run_id)
    if result.kind is not None:
        request_pump(run_id)
    if result.confirm_due is not None:
        schedule_confirm(result.confirm_due)


@project_task("finalize")
def finalize(run_id: int) -> None:
    """Close the run if every item is done (the pump does this too; this is for operators)."""
    run_id = _run_id(run_id)
    with session_scope(get_settings().DATABASE_URL) as session:
        service.finalize(session, run_id)


@project_task("sweep")
def sweep() -> None:
    """Pump every running run: lost pumps, stale claims and unfinalized runs heal here."""
    with session_scope(get_settings().DATABASE_URL) as session:
        running = unfinished_runs(session)
    for run_id, _kind in running:
        request_pump(run_id)


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
    rt = runtime()
    if not rechecks.first_of_burst(rt.redis, request.openid, request.zone_id):
        log.info("recheck_debounced", extra={"openid": request.openid, "zone_id": request.zone_id})
        return
    try:
        with session_scope(rt.settings.DATABASE_URL) as session:
            batch = rechecks.plan_recheck(session, rt.settings, request)
    except BaseException:
        # Planning failed (the task retries on a transient error): a burst key left behind
        # would debounce the retry itself, and the recheck would be lost.
        rechecks.forget_burst(rt.redis, request.openid, request.zone_id)
        raise
    dispatch_batch(batch, "recheck", countdown=rechecks.RECHECK_DELAY_S)


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
    rt = runtime()
    raw: Any = rt.redis.get(LEDGER_SCAN_STATE_KEY)
    state = rechecks.ScanState.loads(raw) if raw else None
    with session_scope(rt.settings.DATABASE_URL) as session:
        result = rechecks.scan_ledger(session, state)
    if result.busy:
        return
    rt.redis.set(LEDGER_SCAN_STATE_KEY, result.state.dumps())
    for openid, zone_id in result.accounts:
        recheck.apply_async(kwargs={"openid": openid, "zone_id": zone_id, "reason": "ledger"})


@project_task("confirm_pass", soft_time_limit=120, time_limit=150)
def confirm_pass() -> None:
    """Re-fetch the accounts whose suspected cases are due (one confirm run)."""
    rt = runtime()
    with session_scope(rt.settings.DATABASE_URL) as session:
        batches = rechecks.plan_confirm_pass(
            session, rt.settings, size=service.batch_size(rt.settings)
        )
    for batch in batches:
        dispatch_batch(batch, "confirm")


# -- alerts (worker/alerts) ---------------------------------------------------------------------

# Retries of one alert: backoff 1, 2, 4 ... up to 60 s (with jitter), three minutes at most in
# all; then the delivery is marked failed (`midas-recon alerts list`) and the Prometheus rules
# remain.
ALERT_MAX_RETRIES: Final = 8


class AlertNotDelivered(Exception):
    """Some webhook did not take the alert yet; the task retries with backoff."""


def notify_run_closed(run_id: int) -> None:
    """A run just closed: record its alerts (failed, incomplete, cases confirmed) and send them.

    Called after the run's transaction committed. Never raises: an alert must not cost the
    run anything; the periodic check finds what this missed within a minute.
    """
    try:
        rt = runtime()
        from worker.alerts.service import raise_for_run

        with session_scope(rt.settings.DATABASE_URL) as session:
            new = raise_for_run(session, rt.settings, run_id)
        for alert_id in new:
            send_alert.apply_async(args=(alert_id,))
    except Exception:  # logged and left to the periodic check
        log.warning("alert_hook_failed", extra={"run_id": run_id}, exc_info=True)


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

    rt = runtime()
    now = clock.utcnow()
    pauses = fleet_pauses_since(rt.redis, now.timestamp() - 3600)
    with session_scope(rt.settings.DATABASE_URL) as session:
        new = alerts.record(
            session, alerts.due_alerts(session, rt.settings, now, pauses_last_hour=pauses)
        )
        again = alerts.stalled(session, rt.settings, now)
        alerts.refresh_gauges(session, rt.settings, pauses_last_hour=pauses)
    for alert_id in [*new, *again]:
        send_alert.apply_async(args=(alert_id,))


@project_task("ensure_partitions")
def ensure_partitions() -> None:
    """Make the month partitions of balance_snapshots for this month and the next two."""
    from worker.recon.retention import ensure_ahead

    settings = get_settings()
    with session_scope(settings.DATABASE_URL) as session:
        created = ensure_ahead(session, settings.calendar.today(clock.utcnow()))
    if created:
        log.info("partitions_created", extra={"partitions": ",".join(created)})
