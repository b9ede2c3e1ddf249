"""Alerts over real HTTP, from the real tasks (run eagerly) against Postgres and Redis.

A failed run, an incomplete run, a confirm pass with confirmed cases, a missed nightly
deadline (and a 45011 storm) each reach every format exactly once, however often the check
runs; a receiver that fails three times gets the message once; no log line holds a key.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import select

from tests.alerts.conftest import Receiver
from worker.config import get_settings
from worker.db.models import AlertDelivery, MismatchCase, MismatchEvent, Run
from worker.db.session import session_scope

KEYS = {
    "json": "generic-hook-key-6a1f0c9e",
    "wecom": "wecom-robot-key-3b7d2e81",
    "feishu": "feishu-hook-5c0e9a7d-2f41",
    "slack": "slackslackslackkey7788",
}


def webhooks(receiver: Receiver) -> str:
    base = receiver.base()
    return ",".join(
        [
            f"json={base}/hook/{KEYS['json']}",
            f"wecom={base}/cgi-bin/webhook/send?key={KEYS['wecom']}",
            f"feishu={base}/open-apis/bot/v2/hook/{KEYS['feishu']}",
            f"slack={base}/services/T0001/B0001/{KEYS['slack']}",
        ]
    )


PREFIX = {
    "json": "/hook/",
    "wecom": "/cgi-bin/webhook/send",
    "feishu": "/open-apis/bot/",
    "slack": "/services/",
}


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, db_url: str, redis_url: str, receiver: Receiver
) -> Iterator[dict[str, str]]:
    import worker.dispatch
    import worker.tasks
    from worker.celery_app import app
    from worker.config import get_settings

    values = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "RECON_ALERT_WEBHOOKS": webhooks(receiver),
        "RECON_WEB_BASE_URL": "https://recon.example.com",
        "RECON_TIMEZONE": "UTC",
        "RECON_NIGHTLY_AT": "02:30",
        "RECON_NIGHTLY_DEADLINE": "08:00",
        "RECON_ALERT_PAUSE_STORM": "5",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()  # building the test database read the settings before
    monkeypatch.setattr(worker.dispatch, "_runtime", None)  # the per-process settings cache
    # The tasks' own code, in this process: apply_async runs at once, retries included.
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    yield values


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the JSON log writes it, DEBUG and up."""
    from worker.config import get_settings
    from worker.logs import configure_logging

    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(get_settings(), level="DEBUG", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def late_date(now: dt.datetime) -> dt.date:
    """The newest business date whose deadline has passed (UTC, 02:30 start, 08:00 deadline)."""
    from worker.config import get_settings

    cal = get_settings().calendar
    newest = cal.nightly_date_for(now)
    return next(
        d for d in (newest, newest - dt.timedelta(days=1)) if cal.nightly_deadline(d) <= now
    )


def seed(now: dt.datetime) -> dict[str, int]:
    """A failed and an incomplete nightly on earlier dates, a confirm run that confirmed three
    cases, and no nightly at all for the newest date past its deadline."""
    late = late_date(now)
    finished = now - dt.timedelta(minutes=5)

    def run(day: dt.date, kind: str, status: str, **extra: Any) -> Run:
        return Run(
            business_date=day,
            kind=kind,
            trigger="beat" if kind == "nightly" else "confirm",
            status=status,
            api_version="v1",
            started_at=finished - dt.timedelta(hours=1),
            finished_at=finished,
            **extra,
        )

    with session_scope() as s:
        failed = run(
            late - dt.timedelta(days=3),
            "nightly",
            "failed",
            planned=100,
            ok=40,
            error=1,
            failure_reason="errcode 90011: signature wrong",
        )
        incomplete = run(
            late - dt.timedelta(days=2), "nightly", "incomplete", planned=100, ok=97, error=3
        )
        confirm = run(late, "confirm", "complete", planned=3, ok=3)
        s.add_all([failed, incomplete, confirm])
        s.flush()
        for i, delta in enumerate((-500, 30, 12_000)):
            case = MismatchCase(
                openid=f"player-{i}",
                zone_id="1",
                check="balance",
                status="confirmed",
                midas_value=1000 + delta,
                ledger_value=1000,
                delta=delta,
                first_seen_at=finished,
                last_seen_at=finished,
            )
            s.add(case)
            s.flush()
            s.add(
                MismatchEvent(
                    case_id=case.id,
                    at=finished,
                    actor="system",
                    from_status="suspected",
                    to_status="confirmed",
                    run_id=confirm.id,
                )
            )
        ids = {"failed": failed.id, "incomplete": incomplete.id, "confirm": confirm.id}
    return ids


def storm(redis_url: str, now: dt.datetime, pauses: int) -> None:
    from worker.midas.limiter import pause_log_key

    client = redis.Redis.from_url(redis_url)
    minute = int(now.timestamp()) // 60 * 60
    client.zadd(pause_log_key(), {str(minute - 60 * i): minute - 60 * i for i in range(pauses)})
    client.close()


def test_each_event_reaches_each_format_exactly_once(
    env: dict[str, str], receiver: Receiver, log_lines: io.StringIO
) -> None:
    from worker.tasks import check_alerts

    now = _now()
    ids = seed(now)
    storm(env["REDIS_URL"], now, pauses=7)
    for _ in range(3):  # the periodic check, again and again: nothing twice
        check_alerts.apply()
    from worker.dispatch import run_closed

    run_closed(ids["failed"])  # the hook after a run closes: already known, nothing new

    for fmt, prefix in PREFIX.items():
        got = receiver.ok(prefix)
        assert len(got) == 5, (fmt, [r.body for r in got])
        assert len(receiver.received) == 20  # nobody failed, nobody was asked twice
    generic = {r.body["kind"]: r.body for r in receiver.ok(PREFIX["json"])}
    assert set(generic) == {
        "run_stopped",
        "run_incomplete",
        "cases_confirmed",
        "nightly_late",
        "pause_storm",
    }
    stopped = generic["run_stopped"]
    assert stopped["facts"]["errcode"] == 90011 and stopped["facts"]["run_id"] == ids["failed"]
    assert "signature wrong" in stopped["text"]
    assert generic["run_incomplete"]["facts"]["error"] == 3
    digest = generic["cases_confirmed"]
    assert digest["facts"]["confirmed"] == 3 and digest["facts"]["net_delta"] == 11_530
    # The largest difference first, each with its console link.
    assert digest["lines"][0].startswith("#") and "+12000" in digest["lines"][0]
    assert "https://recon.example.com/accounts/player-2?zone_id=1" in digest["lines"][0]
    assert digest["link"] == "https://recon.example.com/cases"
    assert generic["nightly_late"]["facts"] == {
        "business_date": late_date(now).isoformat(),
        "status": None,
    }
    assert generic["pause_storm"]["facts"]["pauses"] == 7

    # Each format's own shape.
    wecom = receiver.ok(PREFIX["wecom"])[0].body
    assert wecom["msgtype"] == "markdown" and "[midas-recon]" in wecom["markdown"]["content"]
    feishu = receiver.ok(PREFIX["feishu"])[0].body
    assert feishu["msg_type"] == "text" and "[midas-recon]" in feishu["content"]["text"]
    slack = receiver.ok(PREFIX["slack"])[0].body
    assert slack["blocks"][0]["type"] == "header" and "[midas-recon]" in slack["text"]
    assert all(KEYS["wecom"] == r.query.split("=", 1)[1] for r in receiver.ok(PREFIX["wecom"]))

    with session_scope() as s:
        rows = s.execute(select(AlertDelivery.status, AlertDelivery.attempts)).all()
    assert len(rows) == 20 and set(rows) == {("sent", 1)}

    # `alerts list` shows them by label, never by URL.
    from worker.cli.base import cli

    out = CliRunner().invoke(cli, ["alerts", "list", "--limit", "50"])
    assert out.exit_code == 0, out.output
    assert out.output.count("sent  attempts=1") == 20
    assert_no_key(out.output)
    assert_no_key(log_lines.getvalue())
    assert "alert_delivered" in log_lines.getvalue()


def test_a_receiver_failing_three_times_gets_the_message_once(
    env: dict[str, str],
    receiver: Receiver,
    log_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.tasks import check_alerts

    monkeypatch.setenv(
        "RECON_ALERT_WEBHOOKS", f"wecom={receiver.base()}/cgi-bin/webhook/send?key={KEYS['wecom']}"
    )
    get_settings.cache_clear()
    receiver.failures["/cgi-bin/webhook/send"] = [500, 500, 500]
    now = _now()
    ids = seed(now)
    with session_scope() as s:  # only the failed run this time
        s.execute(Run.__table__.update().where(Run.id != ids["failed"]).values(finished_at=None))
        s.execute(
            Run.__table__.update()
            .where(Run.kind == "nightly", Run.id != ids["failed"])
            .values(status="complete", finished_at=now)
        )
    check_alerts.apply()
    statuses = [r.status for r in receiver.received]
    assert statuses == [500, 500, 500, 200] + [200] * (len(statuses) - 4)
    assert len(receiver.ok("/cgi-bin/webhook/send")) == len(statuses) - 3
    titles = [r.body["markdown"]["content"] for r in receiver.ok("/cgi-bin/webhook/send")]
    assert sum("errcode 90011 stopped" in t for t in titles) == 1, titles
    with session_scope() as s:
        attempts = s.scalars(select(AlertDelivery.attempts).order_by(AlertDelivery.alert_id))
        assert next(iter(attempts)) == 4
    assert "HTTP 500" in log_lines.getvalue()
    assert_no_key(log_lines.getvalue())


def test_a_receiver_that_never_answers_is_given_up_and_listed(
    env: dict[str, str],
    receiver: Receiver,
    log_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.cli.base import cli
    from worker.tasks import ALERT_MAX_RETRIES

    monkeypatch.setenv(
        "RECON_ALERT_WEBHOOKS", f"slack={receiver.base()}/services/T/B/{KEYS['slack']}"
    )
    get_settings.cache_clear()
    receiver.failures["/services/"] = [503] * 100
    out = CliRunner().invoke(cli, ["alerts", "test"])
    assert out.exit_code == 1 and "FAILED" in out.output  # the CLI tries once, says so
    from worker.db import alerts as repo

    with session_scope() as s:
        (alert,) = repo.recent(s)
    from worker.tasks import send_alert

    send_alert.apply(args=(alert.id,))
    assert len(receiver.received) == 1 + ALERT_MAX_RETRIES + 1
    listed = CliRunner().invoke(cli, ["alerts", "list"])
    assert f"failed  attempts={1 + ALERT_MAX_RETRIES + 1}" in listed.output
    assert "HTTP 503" in listed.output
    assert_no_key(out.output + listed.output + log_lines.getvalue())


def test_alerts_test_command_sends_to_every_webhook(
    env: dict[str, str], receiver: Receiver, log_lines: io.StringIO
) -> None:
    from prometheus_client import REGISTRY

    from worker.cli.base import cli

    def actions() -> float:
        value = REGISTRY.get_sample_value("recon_operator_actions_total", {"action": "alerts_test"})
        return value or 0.0

    before = actions()
    out = CliRunner().invoke(cli, ["alerts", "test"])
    assert out.exit_code == 0, out.output
    assert actions() == before + 1  # an operator action, counted
    for prefix in PREFIX.values():
        assert len(receiver.ok(prefix)) == 1
    assert out.output.count(": sent") == 4
    assert_no_key(out.output + log_lines.getvalue())


def test_a_check_with_nothing_wrong_sends_nothing(env: dict[str, str], receiver: Receiver) -> None:
    from worker.tasks import check_alerts

    check_alerts.apply()  # an empty database: no nightly ever ran, nothing to say
    assert receiver.received == []


def assert_no_key(text: str) -> None:
    for fmt, key in KEYS.items():
        assert key not in text, f"the {fmt} webhook key leaked"
    assert "127.0.0.1:" not in text or "/hook/" not in text


def test_alerts_check_command_for_cron_and_embedded_mode(
    env: dict[str, str], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.cli.base import cli

    monkeypatch.delenv("REDIS_URL")  # embedded: no Redis, no broker
    get_settings.cache_clear()
    seed(_now())
    first = CliRunner().invoke(cli, ["alerts", "check"])
    assert first.exit_code == 0, first.output
    assert "4 new alert(s), sent to 4 webhook(s)" in first.output
    again = CliRunner().invoke(cli, ["alerts", "check"])
    assert "0 new alert(s)" in again.output
    assert len(receiver.received) == 16


def test_a_stalled_alert_is_sent_again_and_a_settled_one_is_not(
    env: dict[str, str], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send_alert message lost after its alert was recorded (a worker killed between the
    commit and the send): the periodic check sends it once it has been quiet for a while."""
    from worker.alerts import events, service
    from worker.db.models import Alert
    from worker.tasks import check_alerts

    hook = f"json={receiver.base()}/hook/{KEYS['json']}"
    monkeypatch.setenv("RECON_ALERT_WEBHOOKS", hook)
    get_settings.cache_clear()
    now = _now()
    with session_scope() as s:
        lost, given_up, _recent = service.record(
            s, [events.test_alert(now, n) for n in ("lost", "given-up", "recent")]
        )
        s.execute(
            Alert.__table__.update()
            .where(Alert.id.in_([lost, given_up]))
            .values(created_at=now - dt.timedelta(minutes=30))
        )
        label = service.targets(get_settings())[0].label
        s.add(
            AlertDelivery(
                alert_id=given_up, target=label, status="failed", attempts=9,
                updated_at=now - dt.timedelta(minutes=20),
            )
        )  # fmt: skip
    check_alerts.apply()
    check_alerts.apply()
    nonces = [r.body["facts"]["nonce"] for r in receiver.received]
    assert nonces == ["lost"]  # once; the given-up and the too-recent ones are left alone
