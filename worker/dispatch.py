"""What follows what, through Redis and the broker: the coordination the tasks share.

Owns the per-process Redis client, the claim keys that say a batch is queued or running (and
the heartbeat that keeps them alive), the pump key (one pump per run on its way), the confirm
buckets (one confirm pass per few seconds), the nightly queue's room, the ledger scan's state,
and the sending of every follow-up message.

Callers inside a transaction do not call these directly: they register them with
`worker.db.session.after_commit(session, ...)`, so a message is sent, and a key set, only once
the rows it points at are committed. A crash between the commit and the send is repaired by
the sweep (stale claims go back to the plan, running runs are pumped again).

Messages are sent by task name (stable across refactors, routed by name in
worker.celery_app): through the registered task when this process has imported
`worker.tasks` (ProjectTask's redacted reprs, eager mode in tests), by `send_task` otherwise.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import redis

from worker import business_calendar as clock
from worker.celery_app import MAX_COUNTDOWN_S, NIGHTLY_QUEUE, RECHECK_QUEUE, app
from worker.config import Settings, get_settings
from worker.db.session import after_commit, session_scope
from worker.recon.batches import Batch
from worker.vocabulary import RunKind

if TYPE_CHECKING:
    from worker.recon.runs import FetchDeps

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
class Runtime:
    settings: Settings
    redis: redis.Redis
    deps: FetchDeps | None = None

    def fetch_deps(self) -> FetchDeps:
        """The limiter and Midas client of this process (ConfigError when a setting lacks)."""
        if self.deps is None:
            from worker.midas.limiter import make_limiter
            from worker.recon.runs import FetchDeps

            limiter = make_limiter(self.settings, redis=self.redis)
            self.deps = FetchDeps.from_settings(self.settings, limiter=limiter, redis=self.redis)
        return self.deps


_lock = threading.Lock()
_runtime: tuple[int, Runtime] | None = None


def runtime() -> Runtime:
    """This process's settings, Redis client, limiter and Midas client, made after the fork."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime[0] != os.getpid():
            settings = get_settings()
            if settings.REDIS_URL is None:
                raise RuntimeError("REDIS_URL is not set: the Celery tasks need Redis")
            client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=10.0, socket_connect_timeout=5.0
            )
            _runtime = (os.getpid(), Runtime(settings, client))
        return _runtime[1]


def _send(
    name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
) -> None:
    # A signature by name resolves to the registered task when there is one, and falls back
    # to `app.send_task` (the same routing by name) when there is not.
    app.signature(
        f"midas_recon.{name}", args=args, kwargs=kwargs or {}, options=options
    ).apply_async()


# -- claims -------------------------------------------------------------------------------------


def claim_key(run_id: int, claim: dt.datetime) -> str:
    return f"midas_recon:claim:{run_id}:{claim.isoformat()}"


def claim_alive(run_id: int) -> Callable[[dt.datetime], bool]:
    client = runtime().redis
    return lambda claim: bool(client.exists(claim_key(run_id, claim)))


def send_batch(batch: Batch, kind: str, *, countdown: float | None = None) -> None:
    """Mark the claim alive, then send the batch: nightly batches to the bulk lane, recheck
    and confirm batches to the fast one."""
    runtime().redis.set(claim_key(batch.run_id, batch.claim), "1", px=QUEUED_CLAIM_TTL_MS)
    queue = NIGHTLY_QUEUE if kind == RunKind.NIGHTLY else RECHECK_QUEUE
    _send(
        "fetch_batch",
        (batch.run_id, batch.account_ids, batch.claim_token),
        queue=queue,
        countdown=countdown,
    )


def send_batches(batches: Iterable[Batch], kind: str) -> None:
    for batch in batches:
        send_batch(batch, kind)


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


def room(kind: str) -> int:
    """How many batches a pump of a run of `kind` may send now."""
    if kind != RunKind.NIGHTLY:
        return FAST_LANE_BATCHES
    # Messages without a priority sit in the Redis list named after the queue (kombu).
    waiting = int(runtime().redis.llen(NIGHTLY_QUEUE))
    return max(0, NIGHTLY_QUEUE_DEPTH - waiting)


# -- pumps and confirm passes -------------------------------------------------------------------


def _pump_key(run_id: int) -> str:
    return f"midas_recon:pump:{run_id}"


def request_pump(run_id: int, *, countdown: float | None = None) -> None:
    """Send a pump for the run unless one is already on its way."""
    if runtime().redis.set(_pump_key(run_id), "1", nx=True, px=PUMP_KEY_TTL_MS):
        _send("pump", (run_id,), countdown=countdown)


def request_pumps(run_ids: Iterable[int]) -> None:
    for run_id in run_ids:
        request_pump(run_id)


def pump_started(run_id: int) -> None:
    """From here on a new request may send the next pump: the running one may not see its
    work."""
    runtime().redis.delete(_pump_key(run_id))


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
        _send("confirm_pass", countdown=countdown)


# -- rechecks, the ledger scan, alerts ----------------------------------------------------------


def send_rechecks(accounts: Iterable[tuple[str, str]], reason: str) -> None:
    for openid, zone_id in accounts:
        _send("recheck", kwargs={"openid": openid, "zone_id": zone_id, "reason": reason})


def ledger_scan_state() -> Any:
    """The ledger scan's saved state (bytes), None before the first scan."""
    return runtime().redis.get(LEDGER_SCAN_STATE_KEY)


def save_ledger_scan_state(state: str) -> None:
    runtime().redis.set(LEDGER_SCAN_STATE_KEY, state)


def send_alerts(alert_ids: Iterable[int]) -> None:
    for alert_id in alert_ids:
        _send("send_alert", (alert_id,))


def run_closed(run_id: int) -> None:
    """A run just closed: record its alerts (failed, incomplete, cases confirmed) and send them.

    Runs after the run's transaction committed. Never raises: an alert must not cost the
    run anything; the periodic check finds what this missed within a minute.
    """
    try:
        from worker.alerts.service import raise_for_run

        settings = runtime().settings
        with session_scope(settings.DATABASE_URL) as session:
            new = raise_for_run(session, settings, run_id)
            after_commit(session, lambda: send_alerts(new))
    except Exception:  # logged and left to the periodic check
        log.warning("alert_hook_failed", extra={"run_id": run_id}, exc_info=True)
