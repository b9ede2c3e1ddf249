"""All Celery configuration and the beat schedule, in one place.

`celery -A worker worker -Q recheck,alerts,nightly` consumes the three queues; `celery -A
worker beat` drives the schedule (two may run: the one holding a Redis lease schedules,
worker.beat). Three lanes:

- `recheck`: everything short and latency-sensitive: rechecks after payments, confirming
  re-fetches, logins, and the control tasks (pump, sweep, scans).
- `alerts`: the alert check and webhook deliveries (worker.alerts), whose retries wait on
  outside services and must never hold a process a recheck needs, nor wait behind a night.
- `nightly`: the bulk lane, only the fetch batches of nightly runs, kept short by the pump
  (worker.tasks.pump): the broker holds a few batches of ids, Postgres holds the run's plan.

Rechecks first: a worker polls `recheck` before `nightly` (RechecksFirstCycle), and a process
takes one message at a time (prefetch 1), so a recheck waits at most for the first process to
finish its current batch; batches hold ~2 s of the fleet's rate (worker.recon.runs), so that
is seconds. Kombu's default would alternate between the queues instead.

Concurrency: each process fetches its batch with a thread pool sized to the rate (in-flight
≈ rate x latency), so a worker needs few processes (2-4; docker-compose runs 4). More
processes do not raise the fleet's rate, which the limiter caps; they shorten the wait of a
recheck for a free process.
"""

from __future__ import annotations

import inspect
import logging
import ssl
import sys
from collections.abc import Callable
from datetime import time, timedelta
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

from celery import Celery, Task, current_task, signals
from celery.beat import BeatLazyFunc
from celery.schedules import crontab
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from kombu.entity import Exchange, Queue
from kombu.utils.scheduling import priority_cycle

from worker import business_calendar as clock
from worker.config import ConfigError, Settings, get_settings

RECHECK_QUEUE: Final = "recheck"
NIGHTLY_QUEUE: Final = "nightly"
# Alerts have their own lane: a webhook that is slow or down (retries with backoff) must
# never hold a process that a recheck or a batch needs, nor wait behind a night's batches.
ALERTS_QUEUE: Final = "alerts"
QUEUES: Final = (RECHECK_QUEUE, ALERTS_QUEUE, NIGHTLY_QUEUE)  # consumption order

# Every task, its queue. Routing by name (not by task object) also covers `send_task` from
# the game's own Celery app and messages queued before a refactor.
TASK_QUEUES: Final[dict[str, str]] = {
    "midas_recon.start_nightly": RECHECK_QUEUE,
    "midas_recon.pump": RECHECK_QUEUE,
    "midas_recon.sweep": RECHECK_QUEUE,
    "midas_recon.fetch_batch": NIGHTLY_QUEUE,  # recheck/confirm runs pass queue="recheck"
    "midas_recon.recheck": RECHECK_QUEUE,
    "midas_recon.record_login": RECHECK_QUEUE,
    "midas_recon.scan_ledger": RECHECK_QUEUE,
    "midas_recon.confirm_pass": RECHECK_QUEUE,
    "midas_recon.send_alert": ALERTS_QUEUE,
    "midas_recon.check_alerts": ALERTS_QUEUE,
    "midas_recon.ensure_partitions": RECHECK_QUEUE,
}

# -- time budgets (seconds) -------------------------------------------------------------------
# A fetch batch stops starting new fetches after BATCH_DEADLINE_S and gives the rest back to
# the plan, so its soft limit is a backstop and the hard limit a kill for a stuck process.
BATCH_DEADLINE_S: Final = 240
FETCH_SOFT_LIMIT_S: Final = 300
FETCH_HARD_LIMIT_S: Final = 330
# Planning a million-account night is one INSERT … SELECT: seconds, but give it room.
PLAN_SOFT_LIMIT_S: Final = 600
PLAN_HARD_LIMIT_S: Final = 660
LONGEST_HARD_LIMIT_S: Final = PLAN_HARD_LIMIT_S
# The longest countdown/ETA we ever send (the confirm pass waits at most this; a longer
# settle window is left to the periodic confirm pass).
MAX_COUNTDOWN_S: Final = 300

# Redis redelivers a message that was delivered but not acknowledged after this long. With
# acks_late a message stays unacknowledged for its whole run, and an ETA/countdown message
# from the moment a worker reserves it, so this must exceed the longest task plus the
# longest countdown, or a healthy task would be delivered a second time while it runs.
# The cost of a long timeout is only that a message held by a worker that died with its
# whole machine comes back late; nightly batches do not wait for it, the pump takes stale
# claims back after STALE_CLAIM_S (worker.recon.runs).
VISIBILITY_TIMEOUT_S: Final = 1800
assert VISIBILITY_TIMEOUT_S > LONGEST_HARD_LIMIT_S + MAX_COUNTDOWN_S

# Remote control commands a worker answers (limit_remote_control). With all of them, any
# client of the broker lists the waiting and running tasks with their arguments (`inspect
# reserved`), revokes them, or stops every worker with one broadcast `shutdown`. `ping` is
# what a liveness probe may use; `hello` is how a starting worker syncs with the others
# (mingle). Progress is in Postgres, so operators need nothing else.
# (Not switched off altogether: with worker_enable_remote_control=False the kill test of
# tests/orchestration/test_nightly.py hung in 2 runs of 2, a batch claimed at the start never
# run after a pool process was killed, and passed 2 of 2 with it on. The cause, somewhere in
# how kombu's Redis poller behaves without the control consumer, is not pinned down.)
# enable_events: Flower broadcasts it every few seconds; task events are on by configuration
# anyway (a no-op), and refusing it filled the worker's log with errors.
REMOTE_CONTROL_ALLOWED: Final = frozenset({"ping", "hello", "enable_events"})

# How often beat drives the periodic work.
SWEEP_EVERY_S: Final = 15.0
LEDGER_SCAN_EVERY_S: Final = 30.0
CONFIRM_PASS_EVERY_S: Final = 30.0
# Alerts read what runs left in Postgres: a minute late at most.
ALERT_CHECK_EVERY_S: Final = 60.0
# The snapshot partitions of this month and the next two, made once a day at this local time:
# creating one locks the snapshots table for a moment, so not while a night stores them.
PARTITIONS_AT: Final = time(12, 17)
PARTITIONS_EXPIRES_S: Final = 12 * 3600
# A nightly start queued while every worker was down still counts hours later.
NIGHTLY_START_EXPIRES_S: Final = 12 * 3600


class RechecksFirstCycle(priority_cycle):
    """The order in which a worker polls its queues (kombu `queue_order_strategy`).

    Kombu's Redis transport polls all queues with one BRPOP, which serves the first non-empty
    list in the order given. Its default rotates that order (round-robin), so a recheck could
    wait behind a nightly batch at every free process; this order always asks `recheck`
    first, then `alerts`, whatever order `-Q` listed the queues in. The nightly lane cannot
    starve rechecks or alerts, and they cannot starve the night either: they are few (rechecks
    debounced, alerts one per event).
    """

    def consume(self, n: int) -> list[str]:
        items: list[str] = self.items[:n]
        rank = {name: i for i, name in enumerate(QUEUES)}
        return sorted(items, key=lambda q: rank.get(q, len(QUEUES)))


def nightly_date_now() -> str:
    """The business date a nightly start sent now stands for (ISO); beat evaluates this when
    it sends the message (celery.beat.BeatLazyFunc), so the message carries its date."""
    return get_settings().calendar.nightly_date_for(clock.utcnow()).isoformat()


def beat_schedule(settings: Settings, app: Celery) -> dict[str, dict[str, Any]]:
    """The periodic tasks. The nightly fires at RECON_NIGHTLY_AT in RECON_TIMEZONE: the crontab
    is bound to `app`, whose time zone that is (unbound, it would take the default app's UTC).
    """
    at = settings.calendar.nightly_at
    return {
        # The message carries the business date it stands for, evaluated by beat when it
        # sends it (BeatLazyFunc): a start that waits in the queue past midnight, or a retry,
        # keeps its date. A second beat, or a repeated 02:30 on a DST change, is a no-op:
        # one run per date.
        "nightly-start": {
            "task": "midas_recon.start_nightly",
            "schedule": crontab(minute=str(at.minute), hour=str(at.hour), app=app),
            "kwargs": {"business_date": BeatLazyFunc(nightly_date_now), "trigger": "beat"},
            "options": {"expires": NIGHTLY_START_EXPIRES_S},
        },
        # Periodic messages expire after their interval: if workers were down, the queued
        # copies must not all run at once when they return; the next tick does the job.
        "sweep": {
            "task": "midas_recon.sweep",
            "schedule": timedelta(seconds=SWEEP_EVERY_S),
            "options": {"expires": SWEEP_EVERY_S},
        },
        "ledger-scan": {
            "task": "midas_recon.scan_ledger",
            "schedule": timedelta(seconds=LEDGER_SCAN_EVERY_S),
            "options": {"expires": LEDGER_SCAN_EVERY_S},
        },
        "confirm-pass": {
            "task": "midas_recon.confirm_pass",
            "schedule": timedelta(seconds=CONFIRM_PASS_EVERY_S),
            "options": {"expires": CONFIRM_PASS_EVERY_S},
        },
        # Failed/incomplete runs, confirmed cases, a nightly late at RECON_NIGHTLY_DEADLINE,
        # 45011 storms; and the gauges Prometheus alerts on (worker.alerts.service).
        "alerts-check": {
            "task": "midas_recon.check_alerts",
            "schedule": timedelta(seconds=ALERT_CHECK_EVERY_S),
            "options": {"expires": ALERT_CHECK_EVERY_S},
        },
        # Monthly partitions of balance_snapshots, made ahead (worker.recon.retention); run
        # creation makes its own month's too, so a day missed here costs nothing.
        "snapshot-partitions": {
            "task": "midas_recon.ensure_partitions",
            "schedule": crontab(
                minute=str(PARTITIONS_AT.minute), hour=str(PARTITIONS_AT.hour), app=app
            ),
            "options": {"expires": PARTITIONS_EXPIRES_S},
        },
    }


def broker_tls(redis_url: str | None) -> dict[str, Any] | None:
    """TLS options for a `rediss://` broker: certificates verified (kombu's default for a
    rediss URL without options is not to verify them); `?ssl_ca_certs=PATH` names a private CA.
    """
    if redis_url is None or urlsplit(redis_url).scheme != "rediss":
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    ca_file = parse_qs(urlsplit(redis_url).query).get("ssl_ca_certs")
    if ca_file:
        options["ssl_ca_certs"] = ca_file[0]
    return options


# -- task arguments in events and logs ----------------------------------------------------------
# Arguments that hold a secret (the game sends a player's session_key with record_login).
# Task events carry every task's arguments as text (argsrepr/kwargsrepr) to `celery events`,
# Flower and Celery's own "received" log line; these are replaced there, by name or position.
SECRET_ARGUMENTS: Final = frozenset({"session_key"})
_REPR_MAXSIZE: Final = 1024  # Celery's own cap on argsrepr/kwargsrepr


def redacted_reprs(task: Task, args: Any, kwargs: Any) -> tuple[str, str]:
    """argsrepr and kwargsrepr of a call of `task`: secret arguments replaced, and any known
    secret (worker.logs registry) or `session_key=…` text redacted in what remains."""
    from worker.logs import REDACTED, redact

    names = _positional_names(task)
    args_list = list(args) if isinstance(args, list | tuple) else [args] if args else []
    shown_args = [
        REDACTED if i < len(names) and names[i] in SECRET_ARGUMENTS else value
        for i, value in enumerate(args_list)
    ]
    kwargs_dict = kwargs if isinstance(kwargs, dict) else {}
    shown_kwargs = {k: REDACTED if k in SECRET_ARGUMENTS else v for k, v in kwargs_dict.items()}
    return (
        redact(saferepr(shown_args, _REPR_MAXSIZE)),
        redact(saferepr(shown_kwargs, _REPR_MAXSIZE)),
    )


def _positional_names(task: Task) -> list[str]:
    try:
        params = inspect.signature(task.run).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


class RedactedRequest(Request):  # type: ignore[misc]
    """The worker's view of a message: argsrepr/kwargsrepr rebuilt from the arguments, so a
    sender that did not redact them (the game's own Celery app) cannot put a session key into
    the task-received/started/failed events or the "received" log line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        argsrepr, kwargsrepr = redacted_reprs(self.task, self.args, self.kwargs)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        self.request_dict["argsrepr"], self.request_dict["kwargsrepr"] = argsrepr, kwargsrepr


class ProjectTask(Task):  # type: ignore[misc]
    """Base of every project task: redacted argsrepr/kwargsrepr in the message it sends (and
    so in the task-sent event), and RedactedRequest on the worker side."""

    Request = f"{__name__}:RedactedRequest"

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if "argsrepr" not in options or "kwargsrepr" not in options:
            options["argsrepr"], options["kwargsrepr"] = redacted_reprs(self, args, kwargs)
        return super().apply_async(args, kwargs, **options)


def make_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings` (the worker's, or a sender's in the CLI)."""
    app = Celery("midas_recon", set_as_current=False)
    app.conf.update(
        broker_url=settings.REDIS_URL,
        broker_use_ssl=broker_tls(settings.REDIS_URL),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "queue_order_strategy": f"{__name__}:RechecksFirstCycle",
        },
        # JSON only: a pickled message from the broker would be code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # No result backend: --wait and progress read Postgres, where the truth is.
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # Acknowledge after the task ran, and requeue when its process died (SIGKILL, OOM):
        # every task is safe to run again (claims, unique keys, done flags).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A process reserves only the message it runs: waiting messages stay in Redis, where
        # another process (or a recheck arriving later) can take them.
        worker_prefetch_multiplier=1,
        # On a lost broker connection the unacknowledged messages are redelivered; cancel
        # the tasks still running on them rather than run them twice side by side.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=60,
        task_time_limit=90,
        # Each queue its own direct exchange and key: a queue declared without them is bound
        # to the default queue's exchange and key, and the Redis transport then copies every
        # message into every queue bound that way.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
            for name in QUEUES
        ],
        task_default_exchange=NIGHTLY_QUEUE,
        task_default_routing_key=NIGHTLY_QUEUE,
        task_default_queue=NIGHTLY_QUEUE,
        task_create_missing_queues=False,
        task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        # Task events on, for `celery events` and Flower: every task's arguments travel in
        # them as argsrepr/kwargsrepr, which ProjectTask and RedactedRequest redact.
        task_send_sent_event=True,
        worker_send_task_events=True,
        # Two beats may run; the one holding a Redis lock schedules (worker.beat).
        beat_scheduler="worker.beat:LockedScheduler",
        # Our JSON logging (worker.logs) stays in charge of the root logger.
        worker_hijack_root_logger=False,
        timezone=settings.RECON_TIMEZONE,
        enable_utc=True,
        include=["worker.tasks"],
    )
    app.conf.beat_schedule = beat_schedule(settings, app)
    return app


def _settings_or_exit() -> Settings:
    """Settings for a worker or beat process: one line and exit 2 when they are wrong."""
    try:
        return get_settings()
    except ConfigError as exc:
        print(f"midas-recon: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = make_app(_settings_or_exit())
# Beat keeps its entries in a shelve (or redbeat in Redis) and reads them back: a crontab
# comes back without its app and asks for the current one to learn its time zone. Unless this
# app is that one, the nightly fires at RECON_NIGHTLY_AT in UTC (tests/orchestration/
# test_beat_calendar.py runs the real beat).
app.set_default()

F = TypeVar("F", bound=Callable[..., Any])


def project_task(
    name: str,
    *,
    soft_time_limit: float = 60,
    time_limit: float = 90,
    retry_on: tuple[type[BaseException], ...] = (),
    max_retries: int = 5,
) -> Callable[[F], Task]:
    """Register `fn` as `midas_recon.<name>` with the project's options, spelled once.

    Celery accepts any keyword as a task option and silently ignores a misspelled one, so
    tasks use this decorator (typed keywords only) and tests/orchestration checks the result.
    """
    full = f"midas_recon.{name}"
    if full not in TASK_QUEUES:
        raise KeyError(f"{full} has no queue in TASK_QUEUES")
    if not 0 < soft_time_limit < time_limit <= LONGEST_HARD_LIMIT_S:
        raise ValueError(f"{full}: need 0 < soft_time_limit < time_limit <= longest")

    def register(fn: F) -> Task:
        options: dict[str, Any] = {
            "name": full,
            "base": ProjectTask,
            "acks_late": True,
            "reject_on_worker_lost": True,
            "ignore_result": True,
            "soft_time_limit": soft_time_limit,
            "time_limit": time_limit,
        }
        if retry_on:
            # For tasks nothing else would redo (a nightly start from beat, a login): a new
            # message with a backoff countdown, well under MAX_COUNTDOWN_S.
            options.update(
                autoretry_for=retry_on,
                retry_backoff=True,
                retry_backoff_max=60,
                retry_jitter=True,
                max_retries=max_retries,
            )
        return app.task(**options)(fn)

    return register


class TaskContextFilter(logging.Filter):
    """Adds the running task's id and name to every log record of its thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        task = current_task
        if task and task.request.id:  # the proxy is falsy outside a task
            record.task_id = task.request.id
            record.task = task.name
        return True


def _connect_signals() -> None:
    from worker.metrics_server import connect_celery_signals

    connect_celery_signals()

    def setup_logging(loglevel: str | int | None = None, **_kwargs: Any) -> None:
        from worker.logs import configure_logging

        level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
        handler = configure_logging(get_settings(), level=str(level or "INFO"))
        handler.addFilter(TaskContextFilter())

    # Connecting setup_logging tells Celery not to configure logging itself.
    signals.setup_logging.connect(setup_logging, weak=False, dispatch_uid="midas_recon_logs")

    def refuse_incomplete_production(**_kwargs: Any) -> None:
        from worker.db.accounts import check_a_stored_key_opens

        settings = get_settings()
        try:
            settings.check_production_start()
            if settings.MIDAS_ENV == "production":
                check_a_stored_key_opens(settings)
        except ConfigError as exc:
            print(f"midas-recon: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        if settings.MIDAS_ALLOW_PLAIN_HTTP and settings.midas_over_plain_http:
            logging.getLogger(__name__).warning(
                "midas.plain_http_allowed", extra={"reason": settings.MIDAS_ALLOW_PLAIN_HTTP}
            )

    for signal in (signals.worker_init, signals.beat_init):
        signal.connect(refuse_incomplete_production, weak=False, dispatch_uid="midas_recon_prod")

    def worker_alive(**_kwargs: Any) -> None:
        from worker import liveness

        liveness.touch("worker")

    # The healthcheck's file (worker.liveness): ready once, then every event heartbeat.
    for signal in (signals.worker_ready, signals.heartbeat_sent):
        signal.connect(worker_alive, weak=False, dispatch_uid="midas_recon_alive")

    def limit_on_start(**_kwargs: Any) -> None:
        limit_remote_control()

    signals.worker_init.connect(limit_on_start, weak=False, dispatch_uid="midas_recon_control")


def limit_remote_control() -> None:
    """Unregister every remote control command but REMOTE_CONTROL_ALLOWED in this process:
    the worker then answers the others with nothing (and logs "No such control command")."""
    from celery.worker.control import Panel

    for name in list(Panel.data):
        if name not in REMOTE_CONTROL_ALLOWED:
            del Panel.data[name]


_connect_signals()
