"""`alerts test` (a test message now), `alerts check` (what is due, from cron) and `alerts list`
(what was sent, and where).

Targets are shown by label (format#position:hash), never by URL: the URL holds the bot's key.
Exit codes: 0 every webhook took the message; 1 one did not; 2 none configured.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import click

from worker import business_calendar as clock
from worker.cli.base import (
    JobFailed,
    UsageError,
    cli,
    database_errors,
    format_option,
    handle_errors,
    settings,
)
from worker.metrics import OPERATOR_ACTIONS


@cli.group("alerts")
def alerts() -> None:
    """Webhook alerts (RECON_ALERT_WEBHOOKS): send a test message, list what was sent."""


@alerts.command("test")
@handle_errors
def test_cmd() -> None:
    """Send a test message to every configured webhook now, from this process.

    It is recorded like any alert (see `alerts list`). Exit 1 if a webhook did not take it.
    """
    from worker.alerts import events
    from worker.alerts.service import deliver, record, targets
    from worker.db.session import session_scope

    cfg = settings()
    to = targets(cfg)
    if not to:
        raise UsageError("RECON_ALERT_WEBHOOKS is not set; nothing to test")
    now = clock.utcnow()
    with database_errors():
        with session_scope(cfg.DATABASE_URL) as session:
            (alert_id,) = record(session, [events.test_alert(now, uuid.uuid4().hex[:12])])
        failed = deliver(
            lambda: session_scope(cfg.DATABASE_URL),
            alert_id,
            to,
            now=clock.utcnow,
        )
    OPERATOR_ACTIONS.labels("alerts_test").inc()
    for target in to:
        click.echo(f"{target.label}: {'FAILED' if target.label in failed else 'sent'}")
    if failed:
        raise JobFailed(f"{len(failed)} of {len(to)} webhook(s) did not take the test alert")


@alerts.command("check")
@handle_errors
def check_cmd() -> None:
    """Record and send the alerts due now, from this process (cron, embedded mode).

    What beat's `midas_recon.check_alerts` does every minute where Celery runs; without
    Redis the 45011 storm alert is not checked. Exit 1 if a webhook did not take an alert.
    """
    from worker.alerts.service import deliver, due_alerts, record, targets
    from worker.db.session import session_scope

    cfg = settings()
    now = clock.utcnow()
    pauses = 0
    if cfg.REDIS_URL is not None:
        import redis

        from worker.midas.limiter import fleet_pauses_since

        client = redis.Redis.from_url(cfg.REDIS_URL, socket_timeout=10.0)
        try:
            pauses = fleet_pauses_since(client, now.timestamp() - 3600)
        finally:
            client.close()
    with database_errors():
        with session_scope(cfg.DATABASE_URL) as session:
            new = record(session, due_alerts(session, cfg, now, pauses_last_hour=pauses))
        to = targets(cfg)
        failed = [
            label
            for alert_id in new
            for label in deliver(
                lambda: session_scope(cfg.DATABASE_URL),
                alert_id,
                to,
                now=clock.utcnow,
            )
        ]
    click.echo(f"{len(new)} new alert(s), sent to {len(to)} webhook(s)")
    if failed:
        raise JobFailed(f"{len(failed)} delivery(ies) failed; `alerts list` shows them")


@alerts.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@format_option("json: a list of objects.")
@handle_errors
def list_cmd(limit: int, fmt: str) -> None:
    """The newest alerts, each with its deliveries: sent, pending (retrying) or failed."""
    from worker.db import alerts as repo
    from worker.db.session import session_scope

    with database_errors(), session_scope(settings().DATABASE_URL) as session:
        rows = repo.recent(session, limit)
    if fmt == "json":
        out = [
            {
                "id": a.id,
                "created_at": a.created_at.isoformat(),
                "kind": a.kind,
                "title": a.title,
                "deliveries": [
                    {"target": t, "status": st, "attempts": n, "last_error": err}
                    for t, st, n, err in a.deliveries
                ],
            }
            for a in rows
        ]
        click.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo("no alerts yet")
        return
    for a in rows:
        stamp = a.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"#{a.id}  {stamp}Z  {a.kind}  {a.title}")
        for target, status, attempts, error in a.deliveries or (("-", "not sent", 0, None),):
            tail = f"  ({error})" if error else ""
            click.echo(f"    {target}  {status}  attempts={attempts}{tail}")
