"""The console's pages and API with the Flask test client on the test Postgres: bulk
acknowledge, the API's filters against the command line's, progress figures, health in both
modes, and the login throttle's window."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.web.conftest import OPERATOR, csrf_of, log_in, make_client
from tests.web.test_cli import CASES
from worker.cli.base import cli
from worker.config import get_settings
from worker.db.models import MismatchCase, MismatchEvent, Run
from worker.db.session import session_scope
from worker.recon.runs import RunProgress
from worker.web.present import CASE_FIELDS, Progress
from worker.web.throttle import LoginThrottle

pytestmark = pytest.mark.integration


@pytest.fixture
def seeded_cases(app_env: dict[str, str]) -> dict[str, int]:
    ids = {}
    with session_scope(app_env["DATABASE_URL"]) as session:
        for openid, zone, check, status, delta, seen in CASES:
            case = MismatchCase(
                openid=openid,
                zone_id=zone,
                check=check,
                status=status,
                midas_value=delta,
                ledger_value=0,
                delta=delta,
                first_seen_at=seen,
                last_seen_at=seen,
            )
            session.add(case)
            session.flush()
            ids[f"{openid}/{check}"] = case.id
    return ids


@pytest.fixture
def client(app_env: dict[str, str]) -> Any:
    c = make_client(app_env)
    assert log_in(c).status_code == 302
    return c


def test_bulk_acknowledge_with_one_note(
    client: Any, seeded_cases: dict[str, int], app_env: dict[str, str]
) -> None:
    ids = [seeded_cases["a/balance"], seeded_cases["d/cost_sum"], seeded_cases["c/balance"]]
    token = csrf_of(client, "/cases")
    empty = client.post("/cases/ack", data={"csrf_token": token, "case_id": ids, "note": " "})
    assert empty.status_code == 302
    page = client.get("/cases").get_data(as_text=True)
    assert "a note is required" in page
    answer = client.post(
        "/cases/ack",
        data={
            "csrf_token": token,
            "case_id": [str(i) for i in ids],
            "note": "OPS-12 batch",
            "next": "/cases?status=all",
        },
    )
    assert answer.status_code == 302 and answer.headers["Location"] == "/cases?status=all"
    page = client.get("/cases?status=all").get_data(as_text=True)
    assert f"Acknowledged 2 case(s): {ids[0]}, {ids[1]}." in page
    assert f"case {ids[2]} is resolved" in page, "the closed one is refused, with why"
    with session_scope(app_env["DATABASE_URL"]) as session:
        statuses = {c.id: c.status for c in session.scalars(select(MismatchCase))}
        events = session.scalars(select(MismatchEvent).order_by(MismatchEvent.id)).all()
    assert [statuses[i] for i in ids] == ["acknowledged", "acknowledged", "resolved"]
    assert [(e.case_id, e.actor, e.note) for e in events] == [
        (ids[0], f"operator:{OPERATOR}", "OPS-12 batch"),
        (ids[1], f"operator:{OPERATOR}", "OPS-12 batch"),
    ]


@pytest.mark.parametrize(
    "query, args",
    [
        ("", []),
        ("status=all&sort=age", ["--status", "all", "--sort", "age"]),
        ("check=balance&zone_id=1", ["--check", "balance", "--zone-id", "1"]),
        (
            "status=all&opened_from=2026-11-24&opened_to=2026-11-25&min_delta=60",
            [
                "--status",
                "all",
                "--opened-from",
                "2026-11-24",
                "--opened-to",
                "2026-11-25",
                "--min-delta",
                "60",
            ],
        ),
        ("openid=a", ["--openid", "a"]),
    ],
)
def test_api_cases_match_the_command_line(
    client: Any,
    seeded_cases: dict[str, int],
    app_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    query: str,
    args: list[str],
) -> None:
    doc = client.get(f"/api/cases?{query}").get_json()
    for name, value in app_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["mismatches", "--format", "json", *args])
    assert result.exit_code == 0, result.output
    from_cli = json.loads(result.output)
    assert [c["id"] for c in doc["cases"]] == [c["id"] for c in from_cli]
    assert doc["total"] == len(from_cli) and doc["page"] == 1
    for case in doc["cases"]:
        assert list(case)[: len(CASE_FIELDS)] == list(CASE_FIELDS)
    assert doc["cases"] == [{**c, "opened_run_id": None} for c in from_cli]


def test_paging_and_bad_filters(client: Any, seeded_cases: dict[str, int]) -> None:
    first = client.get("/api/cases?status=all&per_page=2").get_json()
    second = client.get("/api/cases?status=all&per_page=2&page=2").get_json()
    assert (first["total"], first["pages"]) == (5, 3)
    assert not {c["id"] for c in first["cases"]} & {c["id"] for c in second["cases"]}
    page = client.get("/cases?status=all&per_page=2&page=2").get_data(as_text=True)
    assert 'id="prev-page"' in page and 'id="next-page"' in page
    for bad in (
        "status=nope",
        "sort=size",
        "page=0",
        "per_page=501",
        "min_delta=x",
        "opened_from=24-11-2026",
    ):
        answer = client.get(f"/api/cases?{bad}")
        assert answer.status_code == 400 and answer.get_json()["error"], bad
        assert client.get(f"/cases?{bad}").status_code == 400, bad


def test_progress_figures() -> None:
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    run = Run(status="running", started_at=now - dt.timedelta(seconds=10))
    p = Progress.of(run, RunProgress(1, "running", 100, 40, 35, 3, 2), now)
    assert (p.planned, p.done, p.rate_per_s, p.eta_s, p.percent) == (100, 40, 4.0, 15.0, 40.0)
    done = Progress.of(
        Run(status="complete", started_at=now), RunProgress(1, "complete", 5, 5, 5, 0, 0), now
    )
    assert done.rate_per_s is None and done.eta_s is None and done.percent == 100.0


def test_run_api_and_page(client: Any, app_env: dict[str, str]) -> None:
    with session_scope(app_env["DATABASE_URL"]) as session:
        run = Run(
            business_date=dt.date(2026, 11, 24),
            kind="nightly",
            trigger="test",
            status="failed",
            api_version="v2",
            failure_reason="90017 <quota> used up",
        )
        session.add(run)
        session.flush()
        run_id = run.id
    doc = client.get(f"/api/runs/{run_id}").get_json()
    assert doc["status"] == "failed" and doc["failure_reason"] == "90017 <quota> used up"
    assert doc["progress"]["planned"] == 0 and doc["progress"]["rate_per_s"] is None
    page = client.get(f"/runs/{run_id}").get_data(as_text=True)
    assert "90017 &lt;quota&gt; used up" in page
    assert client.get("/api/runs/999999").status_code == 404
    # A date without a nightly run has no statement: the page says so, it shows no zeros.
    assert client.get("/api/statements/2026-11-20").status_code == 404
    missing = client.get("/statements/2026-11-20")
    assert missing.status_code == 404 and "2026-11-20" in missing.get_data(as_text=True)
    assert client.get("/statements/not-a-date").status_code == 400


def test_health_in_embedded_mode_and_with_redis_but_no_worker(
    app_env: dict[str, str], redis_url: str
) -> None:
    embedded = make_client(app_env)
    log_in(embedded)
    doc = embedded.get("/api/health").get_json()
    assert doc["embedded"] is True and doc["database"]["ok"] is True
    assert doc["limiter_paused"] is False and doc["last_complete_nightly"] is None

    fleet = make_client({**app_env, "REDIS_URL": redis_url})
    log_in(fleet)
    doc = fleet.get("/api/health").get_json()
    assert doc["embedded"] is False
    assert doc["database"]["ok"] is True and doc["redis"]["ok"] is True
    assert doc["workers"] == {"ok": False, "detail": "no worker answered a ping within 1 s"}
    page = fleet.get("/health").get_data(as_text=True)
    assert "no worker answered" in page

    down = make_client({**app_env, "REDIS_URL": "redis://127.0.0.1:9/0"})
    log_in(down)
    assert down.get("/api/health").get_json()["redis"]["ok"] is False


def test_login_throttle_window() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window_s=10, clock=lambda: now[0])
    throttle.failed("ip:1", "name:a")
    assert not throttle.blocked("ip:1")
    throttle.failed("ip:1", "name:b")
    assert throttle.blocked("ip:1") and not throttle.blocked("name:a")
    now[0] = 10.5
    assert not throttle.blocked("ip:1"), "failures older than the window are forgotten"


def test_console_settings_fail_with_one_line_naming_the_variable(tmp_path: Any) -> None:
    from worker.config import ConfigError, load_settings

    for name, value in (
        ("RECON_WEB_TRUSTED_PROXIES", "10.0.0.0/8, not-an-address"),
        ("RECON_WEB_AUTH_HEADER", "X Remote: User"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings({name: value})
        assert str(err.value).startswith(f"{name}:") and value not in str(err.value)
    secret_file = tmp_path / "session-secret"
    secret_file.write_text("from-a-docker-secret-0123456789\n")
    settings = load_settings(
        {"RECON_WEB_SESSION_SECRET_FILE": str(secret_file), "RECON_WEB_TRUSTED_PROXIES": "::1"}
    )
    assert "from-a-docker-secret-0123456789" in settings.secret_values(), "redacted from logs"
    assert [str(n) for n in settings.trusted_proxies] == ["::1/128"]
    assert load_settings({"RECON_WEB_AUTH_HEADER": ""}).RECON_WEB_AUTH_HEADER is None


def test_bulk_acknowledge_of_a_full_page_keeps_the_session(
    client: Any, app_env: dict[str, str]
) -> None:
    with session_scope(app_env["DATABASE_URL"]) as session:
        for i in range(120):
            seen = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)
            session.add(
                MismatchCase(
                    openid=f"p{i:04d}",
                    zone_id="1",
                    check="balance",
                    status="resolved" if i % 2 else "confirmed",
                    midas_value=i,
                    ledger_value=0,
                    delta=i,
                    first_seen_at=seen,
                    last_seen_at=seen,
                )
            )
    ids = [
        str(c["id"]) for c in client.get("/api/cases?status=all&per_page=500").get_json()["cases"]
    ]
    token = csrf_of(client, "/cases")
    answer = client.post("/cases/ack", data={"csrf_token": token, "case_id": ids, "note": "n"})
    assert answer.status_code == 302
    page = client.get("/cases")
    assert page.status_code == 200, "still logged in: the flashes fit in the cookie"
    body = page.get_data(as_text=True)
    assert "Acknowledged 60 case(s)." in body and "… and 50 more refused." in body
