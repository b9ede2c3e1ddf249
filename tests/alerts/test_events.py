"""The alerts' words, keys and formats (pure), and the missed-deadline rule on Postgres."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from worker.alerts import events
from worker.alerts.events import ClosedRun, ConfirmedCase
from worker.alerts.formats import render
from worker.alerts.targets import Format, parse_targets, secret_parts

AT = dt.datetime(2026, 12, 4, 3, 10, tzinfo=dt.UTC)


def run(kind: str, status: str, reason: str | None = None, **kw: object) -> ClosedRun:
    fields = {"planned": 10, "ok": 7, "unobservable": 1, "error": 2, "finished_at": AT}
    fields.update(kw)
    return ClosedRun(
        kw.get("id", 1),  # type: ignore[arg-type]
        kind,
        dt.date(2026, 12, 3),
        status,
        fields["planned"],  # type: ignore[arg-type]
        fields["ok"],  # type: ignore[arg-type]
        fields["unobservable"],  # type: ignore[arg-type]
        fields["error"],  # type: ignore[arg-type]
        reason,
        fields["finished_at"],  # type: ignore[arg-type]
    )


def test_a_stopping_errcode_is_named_with_what_to_do() -> None:
    alert = events.run_closed(run("nightly", "failed", "errcode 45009: quota"), None)
    assert alert is not None and alert.kind is events.AlertKind.RUN_STOPPED
    assert "45009" in alert.title and any("quota" in line for line in alert.lines)
    other = events.run_closed(run("nightly", "failed", "configuration: MIDAS_APP_KEY"), None)
    assert other is not None and other.kind is events.AlertKind.RUN_FAILED


def test_failing_rechecks_make_one_alert_per_kind_cause_and_hour() -> None:
    reason = "errcode 90011: signature"
    keys = {
        events.run_closed(run("recheck", "failed", reason, id=i), None).key  # type: ignore[union-attr]
        for i in range(1, 50)
    }
    assert len(keys) == 1
    later = run("recheck", "failed", reason, id=99, finished_at=AT + dt.timedelta(hours=1))
    assert events.run_closed(later, None).key not in keys  # type: ignore[union-attr]
    nightly = {events.run_closed(run("nightly", "failed", reason, id=i), None).key for i in (1, 2)}  # type: ignore[union-attr]
    assert len(nightly) == 2


def test_only_nightly_runs_report_incomplete() -> None:
    assert events.run_closed(run("recheck", "incomplete"), None) is None
    assert events.run_closed(run("nightly", "complete", error=0), None) is None
    alert = events.run_closed(run("nightly", "incomplete"), "https://c.example")
    assert alert is not None and alert.link == "https://c.example/runs/1"
    assert alert.facts["error"] == 2


def test_digest_orders_by_size_and_counts_the_rest() -> None:
    cases = [ConfirmedCase(i, f"o{i}", "1", "balance", d) for i, d in enumerate(range(-4, 4))]
    digest = events.cases_confirmed(7, cases, None)
    assert digest is not None and digest.key == "confirmed:run:7"
    assert digest.lines[0].startswith("#0 ") and "-4" in digest.lines[0]
    assert digest.lines[-1] == f"... and {len(cases) - events.DIGEST_CASES} more"
    assert events.cases_confirmed(7, [], None) is None


@pytest.mark.parametrize("fmt", list(Format))
def test_every_format_renders_json_with_the_title(fmt: Format) -> None:
    alert = events.nightly_late(dt.date(2026, 12, 3), AT, None)
    body = render(alert, fmt)
    text = json.dumps(body, ensure_ascii=False)
    assert "2026-12-03" in text
    assert events.Alert.loads(alert.dumps()) == alert


def test_targets_parse_labels_and_secret_parts() -> None:
    (a, b) = parse_targets("lark=https://open.larksuite.com/open-apis/bot/v2/hook/abc-123-def \n"
                           "https://example.com/x?token=tok-0123456789")  # fmt: skip
    assert a.format is Format.FEISHU and b.format is Format.JSON
    assert a.label.startswith("feishu#1:") and "abc" not in a.label and "abc" not in repr(a)
    assert "tok-0123456789" in secret_parts(b.url) and "abc-123-def" in secret_parts(a.url)


@pytest.mark.parametrize(
    ("tz", "start", "deadline", "now_local", "expected"),
    [
        # 08:30 on the 4th: the 4th's deadline (08:00) has passed.
        ("Asia/Shanghai", "02:30", "08:00", "2026-12-04T08:30", "2026-12-04"),
        # 07:50 on the 4th: not yet; the 3rd's is the newest passed.
        ("Asia/Shanghai", "02:30", "08:00", "2026-12-04T07:50", "2026-12-03"),
        # Start 23:30, deadline 06:00 the next morning: at 05:00 on the 4th, the 3rd's run is
        # still within its time, so the newest passed deadline is the 2nd's.
        ("Asia/Shanghai", "23:30", "06:00", "2026-12-04T05:00", "2026-12-02"),
        ("America/New_York", "23:30", "06:00", "2026-12-04T06:01", "2026-12-03"),
    ],
)
def test_the_missed_deadline_is_the_newest_date_past_it(
    db_url: str, tz: str, start: str, deadline: str, now_local: str, expected: str
) -> None:
    from zoneinfo import ZoneInfo

    from worker.alerts.service import late_nightly
    from worker.config import load_settings
    from worker.db.models import Run
    from worker.db.session import session_scope

    settings = load_settings(
        {
            "DATABASE_URL": db_url,
            "RECON_TIMEZONE": tz,
            "RECON_NIGHTLY_AT": start,
            "RECON_NIGHTLY_DEADLINE": deadline,
        }
    )
    now = dt.datetime.fromisoformat(now_local).replace(tzinfo=ZoneInfo(tz)).astimezone(dt.UTC)
    with session_scope(db_url) as s:
        assert late_nightly(s, settings, now) is None  # no nightly ever ran: nothing to say
        s.add(Run(business_date=dt.date(2026, 11, 1), kind="nightly", trigger="beat",
                  status="complete", api_version="v1"))  # fmt: skip
        s.flush()
        alert = late_nightly(s, settings, now)
        assert alert is not None and alert.facts == {"business_date": expected, "status": None}
        s.add(Run(business_date=dt.date.fromisoformat(expected), kind="nightly", trigger="beat",
                  status="running", api_version="v1"))  # fmt: skip
        s.flush()
        running = late_nightly(s, settings, now)
        assert running is not None and "is running" in running.title
        s.execute(Run.__table__.update().values(status="complete"))
        assert late_nightly(s, settings, now) is None
