"""What the console does beyond reading: recheck an account, probe the services for /health.

A recheck is planned in the database exactly as `midas-recon recheck` plans it, then fetched
by the Celery workers (REDIS_URL set) or, in the embedded mode, by a thread of this server.
The page polls the run until its answer is stored.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from worker.config import Settings
from worker.db.session import after_commit, ping, session_scope
from worker.recon.batches import Batch
from worker.recon.rechecks import RecheckRejected, plan_recheck, validate_recheck
from worker.vocabulary import RunKind

log = logging.getLogger(__name__)

# How long /health waits for workers to answer a ping.
PING_TIMEOUT_S = 1.0


class NoWorkers(Exception):
    """Redis answered, no Celery worker did."""


class ActionRefused(Exception):
    """An action that cannot be done as asked; the message is for the operator."""


@dataclass
class Actions:
    settings: Settings
    _limiter: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- recheck ------------------------------------------------------------------------------

    def recheck(self, openid: str, zone_id: str) -> int:
        """Plan a one-account recheck run now and have it fetched; its run id."""
        try:
            request = validate_recheck(openid, zone_id, "console")
        except RecheckRejected as exc:
            raise ActionRefused(str(exc)) from None
        with session_scope(self.settings.DATABASE_URL) as session:
            batch = plan_recheck(session, self.settings, request)
            after_commit(session, lambda: self._fetch(batch))
        return batch.run_id

    def _fetch(self, batch: Batch) -> None:
        if self.settings.embedded:
            threading.Thread(
                target=self._fetch_inline,
                args=(batch,),
                name="console-recheck",
                daemon=True,
            ).start()
            return
        from worker import dispatch

        try:
            dispatch.send_batch(batch, RunKind.RECHECK)
        except Exception as exc:  # noqa: BLE001  (redis and kombu raise many kinds)
            raise ActionRefused(
                f"recheck run #{batch.run_id} planned but not sent: Redis unreachable "
                f"({type(exc).__name__}); the sweep sends it when Redis is back"
            ) from None

    def _fetch_inline(self, batch: Batch) -> None:
        from worker.recon.runs import FetchDeps, batch_size, drive

        try:
            deps = FetchDeps.from_settings(self.settings, limiter=self._local_limiter())
            db = partial(session_scope, self.settings.DATABASE_URL)
            drive(db, deps, batch.run_id, size=batch_size(self.settings), first=[batch])
        except Exception:  # a thread has no caller: log it, the run stays visible as running
            log.exception("console_recheck_failed", extra={"run_id": batch.run_id})

    def _local_limiter(self) -> Any:
        # One limiter for the whole server process: rechecks from several operators share it.
        from worker.midas.limiter import make_limiter

        with self._lock:
            if self._limiter is None:
                self._limiter = make_limiter(self.settings)
            return self._limiter

    # -- health -------------------------------------------------------------------------------

    def probe(self) -> dict[str, Any]:
        """Database and Redis reachable, limiter pause, workers answering a ping."""
        out: dict[str, Any] = {"embedded": self.settings.embedded}
        out["database"] = _check(lambda: _ping_database(self.settings.DATABASE_URL))
        if self.settings.embedded:
            out["redis"] = {"ok": None, "detail": "not used (embedded mode)"}
            out["limiter_paused_until"] = _pause_end(self._local_limiter())
            out["workers"] = {
                "ok": None,
                "detail": "embedded mode: this process fetches",
            }
            return out
        out["redis"] = _check(lambda: _ping_redis(self.settings.REDIS_URL or ""))
        try:
            from worker.midas.limiter import make_limiter

            out["limiter_paused_until"] = _pause_end(make_limiter(self.settings))
        except Exception as exc:  # noqa: BLE001
            out["limiter_paused_until"] = None
            out["limiter_error"] = type(exc).__name__
        out["workers"] = _check(_ping_workers)
        return out


def _check(probe: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        detail = probe()
    except NoWorkers as exc:
        return {"ok": False, "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001  (any failure means "not reachable"; no secret)
        return {"ok": False, "detail": type(exc).__name__}
    return {
        "ok": True,
        "detail": detail,
        "ms": round(1000 * (time.monotonic() - started), 1),
    }


def _ping_database(url: str) -> str:
    with session_scope(url) as session:
        ping(session)
    return "reachable"


def _ping_redis(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    finally:
        client.close()
    return "reachable"


def _ping_workers() -> list[str]:
    from worker.celery_app import app

    replies = app.control.ping(timeout=PING_TIMEOUT_S) or []
    names = sorted(name for reply in replies for name in reply)
    if not names:
        raise NoWorkers(f"no worker answered a ping within {PING_TIMEOUT_S:.0f} s")
    return names


def _pause_end(limiter: Any) -> float | None:
    until = limiter.paused_until()
    return None if until is None else float(until)
