"""Two beats, one schedules (worker.beat.LockedScheduler); kill the leader and the other takes
over within a minute, without sending the nightly a second time.

Real `celery beat` processes against the test Redis; no worker, so every message beat sends
stays in its queue, where the test counts them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.celery_app import make_app
from worker.config import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELERY = str(Path(sys.executable).with_name("celery"))


class Beat:
    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        self.log = tmp / f"beat-{name}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [CELERY, "-A", "worker", "beat", "-l", "INFO", "-s", str(tmp / f"schedule-{name}")],
            env={**env, "RECON_LIVENESS_DIR": str(tmp / name)},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def leading(self) -> bool:
        return '"beat_leading"' in self.text()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self._out.close()


def messages(client: redis.Redis) -> list[tuple[str, dict[str, Any]]]:
    """(task name, kwargs) of every message waiting in the queues."""
    out = []
    for queue in ("recheck", "alerts", "nightly"):
        for raw in client.lrange(queue, 0, -1):
            msg = json.loads(raw)
            _args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
            out.append((msg["headers"]["task"], kwargs))
    return out


def wait(cond: Any, timeout: float, what: str, *beats: Beat) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            logs = "\n".join(b.text()[-2000:] for b in beats)
            raise AssertionError(f"no {what} within {timeout}s\n{logs}")
        time.sleep(0.5)
    return time.monotonic() - start


def test_the_standby_takes_over_without_a_second_nightly(redis_url: str, tmp_path: Path) -> None:
    # The nightly at the next whole minute that is at least 25 s away (UTC business days).
    now = dt.datetime.now(dt.UTC)
    fire = (now + dt.timedelta(seconds=25 + 60)).replace(second=0, microsecond=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=f"sqlite:///{tmp_path}/unused.db",
        RECON_TIMEZONE="UTC",
        RECON_NIGHTLY_AT=fire.strftime("%H:%M"),
        PYTHONUNBUFFERED="1",
    )
    app = make_app(load_settings(env))
    with app.connection_for_write() as conn:  # as a worker would: the queues exist
        for queue in app.amqp.queues.values():
            queue(conn.default_channel).declare()
    client = redis.Redis.from_url(redis_url)

    first = Beat("a", env, tmp_path)
    second: Beat | None = None
    try:
        wait(first.leading, 60, "leader", first)
        second = Beat("b", env, tmp_path)
        wait(lambda: (tmp_path / "b" / "midas-recon-beat.alive").exists(), 60, "standby", second)
        # The leader sends the nightly at its minute; the standby sends nothing meanwhile.
        nightly = lambda: [m for m in messages(client) if m[0] == "midas_recon.start_nightly"]  # noqa: E731
        wait(lambda: len(nightly()) == 1, 150, "nightly from the leader", first, second)
        assert not second.leading(), "two leaders"
        time.sleep(3)  # the leader records what it sent
        first.kill()
        took = wait(second.leading, 60, "takeover", second)
        sweeps_then = sum(1 for m in messages(client) if m[0] == "midas_recon.sweep")
        # The new leader works: the periodic tasks continue, the nightly is not sent again.
        wait(
            lambda: sum(1 for m in messages(client) if m[0] == "midas_recon.sweep") > sweeps_then,
            30,
            "sweep from the new leader",
            second,
        )
        time.sleep(5)
    finally:
        first.kill()
        if second is not None:
            second.kill(signal.SIGTERM)
        client.close()
    assert took < 60
    (only,) = nightly()
    assert only[1] == {"business_date": fire.date().isoformat(), "trigger": "beat"}
