"""The baseline of the rate benchmark: what a user would otherwise pick, Celery's own
`rate_limit`, with the project's Midas client minus its limiter.

One task per account (rate_limit counts tasks), each one getbalance: the session key is
decrypted in the task as the worker does, the answer is parsed and dropped. Run as
`celery -A bench.celery_baseline worker --pool threads -Q baseline` with BENCH_RATE_LIMIT
(e.g. "100/s") and the worker's usual environment. Celery's rate limit is a token bucket per
worker instance: "R/s" on each of 4 workers lets 4 R through; "R/4 per worker" is the
correct division, which is what this benchmark measures both ways.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Celery

T = TypeVar("T")
QUEUE = "baseline"
RATE_LIMIT = os.environ.get("BENCH_RATE_LIMIT", "100/s")

app = Celery("bench_baseline", broker=os.environ.get("REDIS_URL"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


class NoLimit:
    """The project's limiter interface doing nothing: Celery's rate_limit is in charge."""

    @contextmanager
    def slot(self) -> Iterator[None]:
        yield

    @contextmanager
    def slot_prepared(self, prepare: Callable[[], T]) -> Iterator[T]:
        yield prepare()

    def pause_until(self, unix_ts: float) -> None:
        return None

    def paused_until(self) -> float | None:
        return None


_lock = threading.Lock()
_deps: tuple[Any, Any] | None = None


def _client() -> tuple[Any, Any]:
    global _deps
    with _lock:
        if _deps is None:
            from worker.config import get_settings
            from worker.db.crypto import SessionKeyCipher
            from worker.midas.client import MidasClient

            settings = get_settings()
            client = MidasClient.from_settings(settings, limiter=NoLimit())
            _deps = (client, SessionKeyCipher.from_settings(settings))
        return _deps


@app.task(name="bench.fetch_account", rate_limit=RATE_LIMIT, ignore_result=True)
def fetch_account(openid: str, zone_id: str, key_enc: str) -> None:
    from worker.midas.errors import MidasError

    client, cipher = _client()
    try:
        client.get_balance(openid, zone_id, cipher.decrypt(key_enc))
    except MidasError:
        pass  # the simulator counts every arrival and its answer; nothing to do here
