"""Follow-ups are sent after the commit, never after a rollback (worker.db.session.after_commit,
worker.dispatch): a message must not point at rows that do not exist, nor at rows that never
will."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select

from worker.db.models import Run
from worker.db.session import after_commit, after_rollback, session_scope
from worker.recon.rechecks import plan_recheck, validate_recheck

pytestmark = pytest.mark.integration


def count_runs(url: str) -> int:
    """Through a connection of its own: what another process would see."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Run)) or 0)
    finally:
        engine.dispose()


def test_a_callback_runs_once_after_the_commit_and_never_after_a_rollback(db_url: str) -> None:
    from worker.config import get_settings

    seen: list[int] = []
    undone: list[int] = []
    with pytest.raises(RuntimeError, match="after planning"):
        with session_scope(db_url) as session:
            plan_recheck(session, get_settings(), validate_recheck("oGone", "1", "test"))
            after_commit(session, lambda: seen.append(count_runs(db_url)))
            after_rollback(session, lambda: undone.append(count_runs(db_url)))
            raise RuntimeError("after planning")
    assert seen == [] and undone == [0] and count_runs(db_url) == 0

    with session_scope(db_url) as session:
        plan_recheck(session, get_settings(), validate_recheck("oKept", "1", "test"))
        after_commit(session, lambda: seen.append(count_runs(db_url)))
        assert seen == []  # not while the transaction is open
    assert seen == [1]  # once, and another connection saw the committed run


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch, db_url: str, redis_url: str) -> Iterator[redis.Redis]:
    """The tasks' own code in this process: a message sent runs at once, errors raised."""
    from worker import dispatch
    from worker.celery_app import app
    from worker.config import get_settings

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    monkeypatch.setattr(dispatch, "_runtime", None)
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    monkeypatch.setitem(app.conf, "task_eager_propagates", True)
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_a_pump_is_sent_once_after_its_run_is_committed(
    eager: redis.Redis, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import dispatch, tasks
    from worker.config import get_settings

    received: list[tuple[int, bool]] = []
    real = tasks.service.pump

    def receiver(session: Any, run_id: int, **kwargs: Any) -> Any:
        received.append((run_id, session.get(Run, run_id) is not None))
        return real(session, run_id, **kwargs)

    monkeypatch.setattr(tasks.service, "pump", receiver)

    with pytest.raises(RuntimeError):
        with session_scope(db_url) as session:
            lost = plan_recheck(session, get_settings(), validate_recheck("oGone", "1", "test"))
            after_commit(session, lambda: dispatch.request_pump(lost.run_id))
            raise RuntimeError("after planning")
    # Nothing sent, and no pump key left to debounce the pump of a later attempt.
    assert received == [] and eager.keys("midas_recon:pump:*") == []

    with session_scope(db_url) as session:
        batch = plan_recheck(session, get_settings(), validate_recheck("oKept", "1", "test"))
        after_commit(session, lambda: dispatch.request_pump(batch.run_id))
    assert received == [(batch.run_id, True)]  # once; the pump found the committed run


def test_a_failing_follow_up_is_not_a_rollback(db_url: str) -> None:
    """The commit stands, the error reaches the caller, and what undoes a failed scope (the
    recheck's burst key) is not undone."""
    from worker.config import get_settings

    undone: list[int] = []

    def send() -> None:
        raise ConnectionError("the broker is away")

    with pytest.raises(ConnectionError):
        with session_scope(db_url) as session:
            plan_recheck(session, get_settings(), validate_recheck("oKept", "1", "test"))
            after_rollback(session, lambda: undone.append(1))
            after_commit(session, send)
    assert undone == [] and count_runs(db_url) == 1
