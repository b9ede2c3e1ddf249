"""The alerts lane under a real Celery worker: the periodic check's message on the `alerts`
queue, real retries (countdown messages through Redis) against a receiver that fails first."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.alerts.conftest import Receiver
from worker.db.models import AlertDelivery, Run
from worker.db.session import session_scope

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELERY = str(Path(sys.executable).with_name("celery"))
KEY = "worker-lane-hook-key-51c0e7"


def test_a_real_worker_retries_until_the_receiver_takes_it(
    db_url: str, redis_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.failures["/hook/"] = [500, 503, 502]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        RECON_ALERT_WEBHOOKS=f"json={receiver.base()}/hook/{KEY}",
        RECON_LIVENESS_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    now = dt.datetime.now(dt.UTC)
    with session_scope(db_url) as s:
        s.add(
            Run(
                business_date=now.date() - dt.timedelta(days=5),
                kind="nightly",
                trigger="beat",
                status="failed",
                api_version="v1",
                failure_reason="errcode 90017: refused",
                finished_at=now - dt.timedelta(minutes=1),
            )
        )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [CELERY, "-A", "worker", "worker", "-Q", "alerts", "-c", "2", "-l", "INFO",
             "-n", "alerts-lane@%h"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "ready." not in log.read_text():
            assert time.monotonic() < deadline and worker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        # What beat sends every minute, sent once here through the module's own app.
        send = "from worker import tasks; tasks.check_alerts.apply_async()"
        done = subprocess.run([sys.executable, "-c", send], env=env, timeout=60)
        assert done.returncode == 0
        # The failed run and the late nightly (a nightly ran before, none for the newest
        # date past its deadline): two alerts, three failed attempts spread over them.
        deadline = time.monotonic() + 120
        while len(receiver.ok("/hook/")) < 2:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(5)  # nothing more comes
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    statuses = [r.status for r in receiver.received]
    assert sorted(statuses) == [200, 200, 500, 502, 503], statuses
    kinds = sorted(r.body["kind"] for r in receiver.ok("/hook/"))
    assert kinds == ["nightly_late", "run_stopped"]
    with session_scope(db_url) as s:
        rows = s.execute(select(AlertDelivery.status, AlertDelivery.attempts)).all()
    assert {status for status, _n in rows} == {"sent"} and len(rows) == 2
    assert sum(n for _s, n in rows) == 5
    text = log.read_text()
    assert "Retry in" in text  # Celery retried with a countdown, through the broker
    assert KEY not in text
