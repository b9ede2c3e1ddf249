"""Session keys in transit: `record_login` through a real broker and a real worker at INFO with
task events on. The key must not be readable anywhere on the way: not in Redis (SCAN + DUMP of
every key, messages waiting and after), not in the event stream (a real receiver), not in the
worker's log, in any encoding (raw, lower case, base64, hex, and the bytes it encodes).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.orchestration.conftest import Procs, wait_for, world_env
from worker.config import load_settings
from worker.db.crypto import SessionKeyCipher
from worker.db.models import Account
from worker.db.session import session_scope
from worker.intake import seal_session_key
from worker.logs import REDACTED

pytestmark = pytest.mark.integration

TASK = "midas_recon.record_login"


def forms(key: str) -> set[bytes]:
    """The key as it could show: as written, lower-cased, base64 and hex of it, and the 16
    bytes a WeChat session key encodes, raw and in hex."""
    raw = key.encode()
    found = {raw, key.lower().encode(), base64.b64encode(raw), raw.hex().encode()}
    decoded = base64.b64decode(key)
    found |= {decoded, decoded.hex().encode(), decoded.hex().upper().encode()}
    return found


_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=_-]{16,}")


def readings(blob: bytes) -> Iterator[bytes]:
    """`blob`, and every base64 run in it decoded at each alignment (kombu keeps message
    bodies base64-encoded, so a key inside one is only visible decoded)."""
    yield blob
    for run in _BASE64_RUN.findall(blob):
        for start in range(4):
            part = run[start:].rstrip(b"=")
            part = part[: len(part) // 4 * 4]
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    yield decode(part)
                except (binascii.Error, ValueError):
                    pass


def leaks(blobs: dict[str, bytes], keys: list[str]) -> list[str]:
    wanted = {form: key for key in keys for form in forms(key)}
    found = []
    for where, blob in blobs.items():
        for text in readings(blob):
            found += [f"{where}: {wanted[f]!r} as {f[:12]!r}" for f in wanted if f in text]
    return found


def redis_dump(url: str) -> dict[str, bytes]:
    """Every key: its DUMP (what a copy of the keyspace holds) and its values read by type
    (DUMP may LZF-compress a long value, which would hide a key from a plain search)."""
    client = redis.Redis.from_url(url)
    out = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[Any] = []
        if kind == "string":
            values = [client.get(key)]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "stream":
            values = [repr(entry).encode() for entry in client.xrange(key)]
        dumped = client.dump(key) or b""
        out[f"redis {kind} {key!r}"] = b"\n".join([key, dumped, *(v or b"" for v in values)])
    client.close()
    return out


class EventStream:
    """A real event receiver (what `celery events` and Flower use), collecting every event."""

    def __init__(self, broker: str) -> None:
        self.app = Celery("observer", broker=broker, set_as_current=False)
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def __enter__(self) -> EventStream:
        self._thread.start()
        wait_for(lambda: self._receiver is not None, 10, "the event receiver")
        time.sleep(0.5)  # subscribed before anything is sent
        return self

    def __exit__(self, *exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]


def session_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()  # as jscode2session returns it


def stored_keys(url: str, cipher: SessionKeyCipher) -> dict[str, str]:
    with session_scope(url) as session:
        rows = session.execute(select(Account.openid, Account.session_key_enc)).all()
    return {openid: cipher.decrypt(enc) for openid, enc in rows if enc}


def test_no_session_key_in_the_broker_events_or_log(
    db_url: str, redis_url: str, procs: Procs
) -> None:
    transport_key = Fernet.generate_key().decode()
    env = world_env(
        db_url, redis_url, "https://midas.invalid", SESSION_KEY_TRANSPORT_KEY=transport_key
    )
    procs.configure(env)
    keys = {f"oTransit{i}": session_key() for i in range(6)}
    at = dt.datetime.now(dt.UTC).isoformat()
    # The game's own Celery app: it knows the task by name and the queue from our README.
    game = Celery("game", broker=redis_url, set_as_current=False)
    with EventStream(redis_url) as stream:
        for i, (openid, key) in enumerate(keys.items()):
            sealed = seal_session_key(key, transport_key)
            if i % 2:  # PRODUCT.md §3's call shape, positionally and by keyword
                game.send_task(TASK, args=(openid, "1", sealed, at), queue="recheck")
            else:
                kwargs = {"openid": openid, "zone_id": "1", "session_key": sealed, "at": at}
                game.send_task(TASK, kwargs=kwargs, queue="recheck")
        queued = redis_dump(redis_url)
        assert any(b"record_login" in blob for blob in queued.values()), "nothing queued?"

        procs.worker("w1", concurrency=1, level="INFO", events=True)
        cipher = SessionKeyCipher.from_settings(load_settings(env))
        wait_for(lambda: len(stored_keys(db_url, cipher)) == len(keys), 60, "the logins")
        assert stored_keys(db_url, cipher) == keys  # sealed in transit, stored, opened

        # A game that forgets to seal: its key has crossed the broker already (the sender's
        # fault), but the worker refuses it, and neither its log nor its events repeat it.
        clear = session_key()
        game.send_task(TASK, args=("oForgot", "1", clear), queue="recheck")
        wait_for(lambda: "login_rejected" in procs.log("w1"), 30, "the refused login")
        wait_for(lambda: len(stream.of("task-succeeded")) >= len(keys) + 1, 15, "the events")
    after = redis_dump(redis_url)
    log = procs.log("w1")

    # The witnesses saw what they should have: INFO lines about each task, events with
    # (hidden) arguments, a key refused and never stored.
    assert log.count(f"Task {TASK}[") >= 2 * (len(keys) + 1), log[-3000:]
    received = [e for e in stream.of("task-received") if e.get("name") == TASK]
    assert len(received) == len(keys) + 1 and all(
        REDACTED in e["args"] + e["kwargs"] for e in received
    )
    assert "session_key is not sealed" in log
    assert "oForgot" not in stored_keys(db_url, cipher)

    events = {f"event {i}": json.dumps(e).encode() for i, e in enumerate(stream.events)}
    assert not leaks(queued, list(keys.values()))
    assert not leaks(after, [*keys.values(), clear])
    assert not leaks(events, [*keys.values(), clear])
    assert not leaks({"worker log": log.encode()}, [*keys.values(), clear])


def test_a_broker_client_can_neither_list_nor_stop_the_worker(
    db_url: str, redis_url: str, procs: Procs
) -> None:
    """With every remote control command on, `inspect reserved` listed waiting tasks with
    their arguments and one broadcast `shutdown` stopped every worker; `ping` stays."""
    env = world_env(db_url, redis_url, "https://midas.invalid")
    procs.configure(env)
    worker = procs.worker("w1", concurrency=1, level="INFO")
    wait_for(lambda: " ready." in procs.log("w1"), 60, "the worker")
    intruder = Celery("intruder", broker=redis_url, set_as_current=False)
    assert intruder.control.inspect(timeout=2).ping()  # a liveness probe still works
    for listing in ("reserved", "active", "scheduled", "query_task", "stats"):
        replies = getattr(intruder.control.inspect(timeout=1), listing)() or {}
        # At most "no such command" (KeyError), never a task or its arguments.
        assert all(set(r) == {"error"} for r in replies.values()), (listing, replies)
    intruder.control.broadcast("shutdown")
    time.sleep(3)
    assert worker.poll() is None, procs.log("w1")[-2000:]
