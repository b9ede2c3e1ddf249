"""Task events are on and carry no secret: a real worker, the real event stream.

`celery events` and Flower show every task's arguments from the events (argsrepr/kwargsrepr).
The game sends record_login with a player's session key, by keyword or by position, from its
own Celery app that knows nothing of our redaction: no event, and no worker log line, may
carry that key. The last test runs the compose `flower` command itself (basic auth from its
secret file) and reads the task through Flower's API and page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import select

from worker.celery_app import make_app
from worker.config import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CELERY = str(Path(sys.executable).with_name("celery"))
SESSION_KEYS = ("sk-by-keyword-4f9a1c2e7b", "sk-by-position-8d3e6a0f51", "sk-our-own-app-c0ffee99")
TRANSPORT = Fernet.generate_key().decode()


def sealed(i: int) -> str:
    from worker.intake import seal_session_key

    return seal_session_key(SESSION_KEYS[i], TRANSPORT)


def test_no_session_key_in_any_task_event(db_url: str, redis_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        SESSION_KEY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        # The game seals each session key for the worker (worker.intake.seal_session_key).
        SESSION_KEY_TRANSPORT_KEY=TRANSPORT,
        RECON_LIVENESS_DIR=str(tmp_path),
        PYTHONUNBUFFERED="1",
    )
    settings = load_settings(env)
    app = make_app(settings)
    events: list[dict[str, Any]] = []
    stop = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": events.append})
            for _ in receiver.itercapture(limit=None, timeout=None, wakeup=False):
                if stop.is_set():
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [CELERY, "-A", "worker", "worker", "-Q", "recheck", "-c", "1", "-l", "INFO",
             "-n", "events-test@%h"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait(lambda: any(e["type"] == "worker-online" for e in events), 90, log)
        # The game's app: plain Celery, no project code, its default settings.
        game = Celery("game", broker=redis_url, set_as_current=False)
        game.conf.update(task_serializer="json", accept_content=["json"])
        sent = [
            game.send_task(
                "midas_recon.record_login",
                kwargs={"openid": "o-kw", "zone_id": "1", "session_key": sealed(0)},
                queue="recheck",
            ).id,
            game.send_task(
                "midas_recon.record_login",
                args=["o-pos", "1", sealed(1)],
                queue="recheck",
            ).id,
        ]
        # And our own task object, from a process of ours (as the CLI or another task sends
        # it): task-sent events are on there.
        code = (
            "from worker import tasks; print(tasks.record_login.apply_async(kwargs="
            f"{{'openid': 'o-own', 'zone_id': '1', 'session_key': {sealed(2)!r}}}).id)"
        )
        own = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert own.returncode == 0, own.stderr
        sent.append(own.stdout.strip())

        def done() -> bool:
            ok = {e.get("uuid") for e in events if e["type"] == "task-succeeded"}
            return set(sent) <= ok

        _wait(done, 90, log)
    finally:
        stop.set()
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)

    # The tasks ran for real: the keys were stored, encrypted.
    from worker.db.models import Account
    from worker.db.session import session_scope

    with session_scope(db_url) as session:
        stored = dict(session.execute(select(Account.openid, Account.session_key_enc)).all())
    assert set(stored) == {"o-kw", "o-pos", "o-own"} and all(stored.values())

    types = {e["type"] for e in events}
    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= types
    (own_sent,) = [e for e in events if e["type"] == "task-sent"]
    assert "[REDACTED]" in own_sent["kwargs"] and "o-own" in own_sent["kwargs"]
    received = [e for e in events if e["type"] == "task-received"]
    assert len(received) == 3
    for event in received:
        # Arguments are shown (the events are useful), the key is not.
        assert "[REDACTED]" in event["args"] + event["kwargs"], event
        assert "o-" in event["args"] + event["kwargs"], event
    everything = json.dumps(events) + log.read_text()
    for key in SESSION_KEYS:
        assert key not in everything, f"{key} leaked into an event or the worker log"


def test_project_tasks_send_redacted_reprs() -> None:
    """The sender's side: the message (and its task-sent event) carries redacted reprs."""
    from worker.celery_app import ProjectTask, redacted_reprs
    from worker.tasks import recheck, record_login

    assert isinstance(record_login, ProjectTask)
    args, kwargs = redacted_reprs(record_login, ["o", "1", SESSION_KEYS[1]], {"at": None})
    assert SESSION_KEYS[1] not in args and "[REDACTED]" in args and "'o'" in args
    args, kwargs = redacted_reprs(record_login, [], {"openid": "o", "session_key": "x" * 20})
    assert "x" * 20 not in kwargs and "'openid': 'o'" in kwargs
    # Nothing secret in a recheck: shown as it is.
    args, kwargs = redacted_reprs(recheck, ["openid-1"], {"reason": "ledger"})
    assert args == "['openid-1']" and kwargs == "{'reason': 'ledger'}"


def _wait(cond: Any, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            name = getattr(cond, "__name__", "a condition")
            raise AssertionError(f"timed out on {name}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_flower_as_compose_runs_it_asks_for_a_password_and_shows_no_session_key(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The compose `flower` command, for real (its secret file, its basic auth), beside a
    real worker: the API wants the password, and a task's arguments show no session key."""
    import base64
    import socket
    import urllib.error
    import urllib.request

    import yaml

    from tests.conftest import ROOT
    from tests.test_compose import interpolate

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = interpolate(compose["services"]["flower"]["command"][2], {})  # `$$` is `$`
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    auth_file = tmp_path / "flower_basic_auth"
    auth_file.write_text("ops:flower-pass-7d1e")
    script = (
        script.replace("/run/secrets/flower_basic_auth", str(auth_file))
        .replace("--address=0.0.0.0", "--address=127.0.0.1")
        .replace("--port=5555", f"--port={port}")
    )
    assert f"--port={port}" in script and str(auth_file) in script
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(
        DATABASE_URL=db_url,
        REDIS_URL=redis_url,
        SESSION_KEY_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        SESSION_KEY_TRANSPORT_KEY=TRANSPORT,
        RECON_LIVENESS_DIR=str(tmp_path),
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "flower-and-worker.log"
    out = log.open("w")
    flower = subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    worker = subprocess.Popen(
        [CELERY, "-A", "worker", "worker", "-Q", "recheck", "-c", "1", "-l", "INFO",
         "-n", "flower-test@%h"],
        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    token = base64.b64encode(b"ops:flower-pass-7d1e").decode()

    def get(path: str, authorized: bool = True) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if authorized:
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310  (loopback http)
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError:
            return 0, ""

    try:
        _wait(lambda: get("/api/workers?refresh=false")[0] == 200, 90, log)
        assert get("/api/tasks", authorized=False)[0] == 401
        assert get("/", authorized=False)[0] == 401
        _wait(lambda: "flower-test@" in log.read_text(), 90, log)
        time.sleep(3)  # the worker's first heartbeat reaches Flower
        game = Celery("game", broker=redis_url, set_as_current=False)
        game.conf.update(task_serializer="json", accept_content=["json"])
        task_id = game.send_task(
            "midas_recon.record_login",
            args=["o-flower", "1", SESSION_KEYS[1]],
            queue="recheck",
        ).id

        def succeeded() -> bool:
            status, body = get(f"/api/task/info/{task_id}")
            return status == 200 and '"SUCCESS"' in body

        _wait(succeeded, 90, log)
        _status, info = get(f"/api/task/info/{task_id}")
        _status, tasks = get("/api/tasks")
        _status, page = get(f"/task/{task_id}")
    finally:
        for proc in (worker, flower):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
        out.close()
    assert "o-flower" in info and "[REDACTED]" in info  # the arguments are shown, redacted
    for text in (info, tasks, page, log.read_text()):
        assert SESSION_KEYS[1] not in text
