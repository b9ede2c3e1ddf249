"""The Celery configuration as the worker sees it: every task's effective options, routes and
the beat schedule (no broker, no worker: Celery accepts misspelled options silently)."""

from __future__ import annotations

import datetime as dt
import inspect
import os
import ssl
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab
from cryptography.fernet import Fernet
from kombu.utils.scheduling import cycle_by_name

import worker.tasks  # (registers the tasks)
from worker import celery_app as ca
from worker.config import load_settings
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.crypto import SessionKeyCipher
from worker.db.session import session_scope

NOW = dt.datetime(2026, 11, 24, 10, 0, tzinfo=dt.UTC)

# The stable interface other systems send to (PRODUCT.md §3, §6; the team brief).
INTERFACE = {
    "midas_recon.start_nightly": ["business_date", "trigger"],
    "midas_recon.fetch_batch": ["run_id", "account_ids", "claim"],
    "midas_recon.pump": ["run_id"],
    "midas_recon.sweep": [],
    "midas_recon.recheck": ["openid", "zone_id", "reason", "bill_no"],
    "midas_recon.record_login": ["openid", "zone_id", "session_key", "at"],
    "midas_recon.scan_ledger": [],
    "midas_recon.confirm_pass": [],
    "midas_recon.send_alert": ["alert_id"],
    "midas_recon.check_alerts": [],
    "midas_recon.ensure_partitions": [],
}


def project_tasks() -> dict[str, object]:
    return {name: t for name, t in ca.app.tasks.items() if name.startswith("midas_recon.")}


def test_every_task_is_registered_routed_and_has_the_interface_signature() -> None:
    assert set(project_tasks()) == set(INTERFACE) == set(ca.TASK_QUEUES)
    for name, params in INTERFACE.items():
        task = ca.app.tasks[name]
        assert list(inspect.signature(task.run).parameters) == params, name
        route = ca.app.amqp.router.route({}, name)
        assert route["queue"].name == ca.TASK_QUEUES[name], name
    # The bulk lane carries only nightly fetch batches; everything else is the fast lane.
    assert [n for n, q in ca.TASK_QUEUES.items() if q == "nightly"] == ["midas_recon.fetch_batch"]


@pytest.mark.parametrize("name", sorted(INTERFACE))
def test_effective_task_options(name: str) -> None:
    task = ca.app.tasks[name]
    assert task.acks_late is True
    assert task.reject_on_worker_lost is True
    assert task.ignore_result is True
    assert task.serializer == "json"
    assert 0 < task.soft_time_limit < task.time_limit <= ca.LONGEST_HARD_LIMIT_S
    # Guards against the misspellings Celery would accept without a word.
    for typo in ("ignore_results", "acks_late_", "time_limits", "soft_timelimit", "queue_name"):
        assert not hasattr(task, typo)
    retries = getattr(task, "autoretry_for", ())
    if retries:  # only tasks nothing else would redo, and never forever
        assert name in (
            "midas_recon.start_nightly",
            "midas_recon.record_login",
            "midas_recon.recheck",
            "midas_recon.send_alert",
        )
        wanted = 5 if name != "midas_recon.send_alert" else worker.tasks.ALERT_MAX_RETRIES
        assert task.max_retries == wanted and task.retry_backoff_max <= ca.MAX_COUNTDOWN_S
    # A message may wait for its countdown and then run to its hard limit: still within the
    # visibility timeout, or Redis would deliver it a second time while it runs.
    assert task.time_limit + ca.MAX_COUNTDOWN_S < ca.VISIBILITY_TIMEOUT_S


def test_fetch_batch_budget_fits_its_limits() -> None:
    from worker.recon.runs import STALE_CLAIM_S, batch_deadline_s

    task = ca.app.tasks["midas_recon.fetch_batch"]
    assert task.soft_time_limit == ca.FETCH_SOFT_LIMIT_S
    # A claim older than the hard limit has no live batch behind it: only then is it stale.
    assert task.time_limit < STALE_CLAIM_S
    settings = load_settings({"MIDAS_TIMEOUT_S": "5"})
    assert batch_deadline_s(settings, task.soft_time_limit) + 60 + 2 * 5 < task.soft_time_limit


def test_app_configuration() -> None:
    conf = ca.app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True and not conf.result_backend
    assert conf.task_default_queue == "nightly"
    assert [q.name for q in conf.task_queues] == ["recheck", "alerts", "nightly"]
    # One binding per queue: a shared (exchange, key) would copy each message to both.
    for queue in ca.app.amqp.queues.values():
        assert (queue.exchange.name, queue.routing_key) == (queue.name, queue.name)
    assert conf.task_create_missing_queues is False
    assert conf.broker_connection_retry_on_startup is True
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    options = conf.broker_transport_options
    assert options["visibility_timeout"] == ca.VISIBILITY_TIMEOUT_S
    assert options["visibility_timeout"] > ca.LONGEST_HARD_LIMIT_S + ca.MAX_COUNTDOWN_S


@pytest.mark.parametrize(
    "given",
    [["nightly", "recheck"], ["recheck", "nightly"], ["nightly", "alerts", "recheck"]],
)
def test_rechecks_are_polled_first_whatever_the_q_order(given: list[str]) -> None:
    strategy = ca.app.conf.broker_transport_options["queue_order_strategy"]
    cycle = cycle_by_name(strategy)()  # how kombu resolves the option
    cycle.update(list(given))
    wanted = [q for q in ("recheck", "alerts", "nightly") if q in given]
    assert cycle.consume(len(given)) == wanted
    cycle.rotate("recheck")  # kombu rotates after each message; the order must not change
    assert cycle.consume(len(given)) == wanted


def test_beat_schedule_follows_the_settings() -> None:
    settings = load_settings({"RECON_NIGHTLY_AT": "03:45", "RECON_TIMEZONE": "America/New_York"})
    app = ca.make_app(settings)
    assert app.conf.timezone == "America/New_York"
    schedule = app.conf.beat_schedule
    assert set(schedule) == {
        "nightly-start",
        "sweep",
        "ledger-scan",
        "confirm-pass",
        "alerts-check",
        "snapshot-partitions",
    }
    for entry in schedule.values():
        assert entry["task"] in INTERFACE
        assert entry["options"]["expires"] > 0
    nightly = schedule["nightly-start"]
    assert isinstance(nightly["schedule"], crontab)
    assert nightly["schedule"].hour == {3} and nightly["schedule"].minute == {45}
    assert nightly["kwargs"]["trigger"] == "beat"
    # As built, with no app set by hand (beat uses the entry as it is): 03:45 New York time.
    sched = nightly["schedule"]
    assert str(sched.tz) == "America/New_York"
    zone = ZoneInfo("America/New_York")
    last = dt.datetime(2026, 11, 24, 3, 45, tzinfo=zone)
    sched.nowfun = lambda: dt.datetime(2026, 11, 25, 3, 40, tzinfo=zone)
    assert sched.remaining_estimate(last) == dt.timedelta(minutes=5)
    for name, every in (
        ("sweep", ca.SWEEP_EVERY_S),
        ("ledger-scan", ca.LEDGER_SCAN_EVERY_S),
        ("confirm-pass", ca.CONFIRM_PASS_EVERY_S),
        ("alerts-check", ca.ALERT_CHECK_EVERY_S),
    ):
        assert schedule[name]["schedule"] == dt.timedelta(seconds=every)
        assert every <= 60
    # Daily at midday local time, away from the night that writes snapshots.
    partitions = schedule["snapshot-partitions"]["schedule"]
    assert isinstance(partitions, crontab) and str(partitions.tz) == "America/New_York"
    assert partitions.hour == {12} and partitions.minute == {17}


def test_module_app_uses_the_default_nightly_time() -> None:
    entry = ca.app.conf.beat_schedule["nightly-start"]["schedule"]
    settings = load_settings()  # the environment the module app was built from
    assert entry.hour == {settings.calendar.nightly_at.hour}
    assert entry.minute == {settings.calendar.nightly_at.minute}
    assert str(entry.tz) == settings.RECON_TIMEZONE


def test_the_nightly_message_carries_the_date_it_stands_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beat evaluates the date when it sends: 23:30 in Shanghai on the 24th is the 24th's run,
    whenever a worker gets to it."""
    from celery.beat import _evaluate_entry_kwargs

    import worker.business_calendar as bc

    monkeypatch.setenv("RECON_NIGHTLY_AT", "23:30")
    monkeypatch.setenv("RECON_TIMEZONE", "Asia/Shanghai")
    settings = load_settings()
    app = ca.make_app(settings)
    entry = app.conf.beat_schedule["nightly-start"]
    sent = dt.datetime(2026, 11, 24, 15, 30, 2, tzinfo=dt.UTC)  # 23:30:02 in Shanghai
    monkeypatch.setattr(bc, "utcnow", lambda: sent)
    assert _evaluate_entry_kwargs(entry["kwargs"]) == {
        "business_date": "2026-11-24",
        "trigger": "beat",
    }


def test_the_task_decorator_refuses_unknown_names_and_bad_limits() -> None:
    with pytest.raises(KeyError):
        ca.project_task("no_such_task")
    with pytest.raises(ValueError):
        ca.project_task("pump", soft_time_limit=90, time_limit=60)
    with pytest.raises(ValueError):
        ca.project_task("pump", soft_time_limit=60, time_limit=ca.LONGEST_HARD_LIMIT_S + 1)


@pytest.mark.integration
def test_each_message_lands_in_its_own_queue_only(redis_url: str) -> None:
    import redis

    sender = ca.make_app(load_settings({"REDIS_URL": redis_url}))
    with sender.connection_for_write() as conn:
        for queue in sender.amqp.queues.values():  # as a worker declares them
            queue(conn.default_channel).declare()
        sender.send_task("midas_recon.pump", args=(1,), connection=conn)
        sender.send_task("midas_recon.fetch_batch", args=(1, [2], "x"), connection=conn)
        sender.send_task(
            "midas_recon.fetch_batch", args=(1, [3], "y"), queue="recheck", connection=conn
        )
    client = redis.Redis.from_url(redis_url)
    assert client.llen("recheck") == 2
    assert client.llen("nightly") == 1
    client.close()


PRODUCTION = {
    "MIDAS_ENV": "production",
    "MIDAS_API_VERSION": "v2",
    "MIDAS_APPID": "wx-production-app",
    "MIDAS_OFFER_ID": "1450000000",
    "MIDAS_APP_KEY": "prod-appkey-4f1e9a2b7c",
    "MIDAS_APP_SECRET": "prod-secret-8d2c6b1e0f",
    "SESSION_KEY_ENCRYPTION_KEY": "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=",
    "SESSION_KEY_TRANSPORT_KEY": "cXV1eHF1eGJhemJhcmZvb3F1dXhxdXhiYXpiYXJmb28=",
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"MIDAS_APP_KEY": "changeme"}, "MIDAS_APP_KEY holds a placeholder value"),
        ({"MIDAS_APP_SECRET": ""}, "MIDAS_APP_SECRET is not set"),
        ({"SESSION_KEY_ENCRYPTION_KEY": "xxxx"}, "SESSION_KEY_ENCRYPTION_KEY holds a placeholder"),
        ({"SESSION_KEY_TRANSPORT_KEY": ""}, "SESSION_KEY_TRANSPORT_KEY is not set"),
        ({"MIDAS_API_BASE": "http://midas.internal"}, "MIDAS_API_BASE is http://"),
    ],
)
def test_production_worker_and_beat_refuse_to_start_without_their_secrets(
    tmp_path: Path, redis_url: str, change: dict[str, str], named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(PRODUCTION, DATABASE_URL=f"sqlite:///{tmp_path}/w.db", REDIS_URL=redis_url)
    env.update(change)
    celery = str(Path(sys.executable).with_name("celery"))
    for role in (["worker", "--pool", "solo"], ["beat", "-s", str(tmp_path / "beat")]):
        done = subprocess.run(
            [celery, "-A", "worker", *role, "-l", "WARNING"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (role, done.stderr[-2000:])
        # (Celery's own warning about running as root may come first.)
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"midas-recon: {named}"), done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def test_production_settings_with_every_secret_pass_the_start_check() -> None:
    load_settings(PRODUCTION).check_production_start()
    # the same settings in sandbox are not checked at start (a test or staging setup)
    sandbox = load_settings({**PRODUCTION, "MIDAS_ENV": "sandbox", "MIDAS_APP_KEY": ""})
    sandbox.check_production_start()


def _celery(env: dict[str, str], *role: str) -> subprocess.CompletedProcess[str]:
    celery = str(Path(sys.executable).with_name("celery"))
    return subprocess.run(
        [celery, "-A", "worker", *role, "-l", "WARNING"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_worker_refuses_a_key_that_opens_no_stored_session_key(
    sqlite_url: str, redis_url: str
) -> None:
    """After a rekey and a different key configured, runs came out "unobservable" and clean:
    the start check now opens one stored ciphertext."""
    other = SessionKeyCipher([Fernet.generate_key().decode()])
    with session_scope(sqlite_url) as session:
        upsert_accounts(session, [AccountRow("o1", "1", NOW, other.encrypt("c2Vzc2lvbg=="), NOW)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(PRODUCTION, DATABASE_URL=sqlite_url, REDIS_URL=redis_url)
    done = _celery(env, "worker", "--pool", "solo")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("midas-recon: SESSION_KEY_ENCRYPTION_KEY does not open the stored")
    assert "Traceback" not in done.stderr


def test_the_remote_control_allowlist_names_real_commands() -> None:
    """A command renamed by a Celery upgrade would silently vanish from the allowlist."""
    from celery.worker.control import Panel

    assert set(Panel.data) >= ca.REMOTE_CONTROL_ALLOWED


def test_a_rediss_broker_verifies_certificates() -> None:
    assert ca.broker_tls("redis://h:6379/0") is None and ca.broker_tls(None) is None
    assert ca.broker_tls("rediss://:pw@h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with_ca = ca.broker_tls("rediss://h:6380/0?ssl_ca_certs=/etc/redis/ca.pem")
    assert with_ca == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/redis/ca.pem"}
    app = ca.make_app(load_settings({"REDIS_URL": "rediss://:pw@h:6380/0"}))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
