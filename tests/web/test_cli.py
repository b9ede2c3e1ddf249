"""The console's command-line twins: `operators`, `account`, and `mismatches` with the
console's filters and --limit; plus the case query itself (filters, sorts, paging)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from tests.web.conftest import MIDAS_RECON, PASSWORD, Seeded
from worker.cli.base import cli
from worker.config import get_settings
from worker.db import console as queries
from worker.db.models import BalanceSnapshot, MismatchCase, Operator
from worker.db.session import session_scope
from worker.recon.console import find_cases, opened_between

pytestmark = pytest.mark.integration

SHANGHAI_MIDNIGHT = dt.datetime(2026, 11, 23, 16, 0, tzinfo=dt.UTC)  # 11-24 00:00 +08:00


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("RECON_TIMEZONE", "Asia/Shanghai")
    get_settings.cache_clear()
    return db_url


# (openid, zone, check, status, delta, first seen)
CASES = [
    ("a", "1", "balance", "confirmed", 500, SHANGHAI_MIDNIGHT - dt.timedelta(minutes=1)),
    ("a", "1", "save_sum", "suspected", -40, SHANGHAI_MIDNIGHT),
    ("b", "2", "balance", "acknowledged", -900, SHANGHAI_MIDNIGHT + dt.timedelta(hours=23)),
    ("c", "1", "balance", "resolved", 7000, SHANGHAI_MIDNIGHT + dt.timedelta(days=1)),
    ("d", "2", "cost_sum", "confirmed", 60, SHANGHAI_MIDNIGHT + dt.timedelta(days=2)),
]


@pytest.fixture
def cases(env: str) -> dict[str, int]:
    ids = {}
    with session_scope(env) as session:
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


def listed(*args: str) -> list[str]:
    result = run("mismatches", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return [f"{c['openid']}/{c['check']}" for c in json.loads(result.output)]


def test_mismatches_filters_and_limit(cases: dict[str, int]) -> None:
    assert listed() == ["b/balance", "a/balance", "d/cost_sum", "a/save_sum"]
    assert listed("--status", "all", "--limit", "2") == ["c/balance", "b/balance"]
    assert listed("--check", "balance") == ["b/balance", "a/balance"]
    assert listed("--zone-id", "2") == ["b/balance", "d/cost_sum"]
    assert listed("--openid", "a") == ["a/balance", "a/save_sum"]
    assert listed("--min-delta", "60") == ["b/balance", "a/balance", "d/cost_sum"]
    assert listed("--sort", "age") == ["a/balance", "a/save_sum", "b/balance", "d/cost_sum"]
    # Business dates in RECON_TIMEZONE: 11-24 runs from 16:00 UTC on the 23rd, for 24 hours.
    assert listed("--opened-from", "2026-11-24", "--opened-to", "2026-11-24") == [
        "b/balance",
        "a/save_sum",
    ]
    assert listed("--status", "all", "--opened-from", "2026-11-25") == [
        "c/balance",
        "d/cost_sum",
    ]
    bad = CliRunner().invoke(cli, ["mismatches", "--opened-from", "24/11/2026"])
    assert bad.exit_code == 2 and "YYYY-MM-DD" in bad.output


def test_the_case_query_pages_and_counts(cases: dict[str, int], env: str) -> None:
    query = queries.CaseQuery(statuses=None, sort="delta")
    with session_scope(env) as session:
        pages = [find_cases(session, query, page=p, per_page=2) for p in (1, 2, 3, 4)]
    assert [p.total for p in pages] == [5, 5, 5, 5]
    assert [p.pages for p in pages] == [3, 3, 3, 3]
    ids = [c.id for p in pages for c in p.cases]
    assert len(ids) == 5 == len(set(ids)), "every case once across the pages"
    assert pages[3].cases == []
    start, end = opened_between(dt.date(2026, 11, 24), None, get_settings().calendar)
    assert start == SHANGHAI_MIDNIGHT and end is None


def test_operators_add_list_disable(env: str) -> None:
    added = run("operators", "add", "alice", stdin=PASSWORD + "\n")
    assert added.exit_code == 0 and "operator alice added" in added.output
    with session_scope(env) as session:
        row = session.scalars(select(Operator)).one()
        assert row.password_hash.startswith("$argon2id$") and PASSWORD not in row.password_hash
    again = CliRunner().invoke(cli, ["operators", "add", "alice"], input=PASSWORD + "\n")
    assert again.exit_code == 2 and "exists already" in again.output
    short = CliRunner().invoke(cli, ["operators", "add", "bob"], input="short\n")
    assert short.exit_code == 2 and "at least 12" in short.output
    spaced = CliRunner().invoke(cli, ["operators", "add", "bo b"], input=PASSWORD + "\n")
    assert spaced.exit_code == 2 and "without spaces" in spaced.output
    empty = CliRunner().invoke(cli, ["operators", "add", "carol"], input="")
    assert empty.exit_code == 2 and "no password" in empty.output

    listed_ = json.loads(run("operators", "list", "--format", "json").output)
    assert [o["name"] for o in listed_] == ["alice"] and listed_[0]["disabled_at"] is None
    assert "hash" not in json.dumps(listed_) and PASSWORD not in json.dumps(listed_)
    assert run("operators", "disable", "alice").exit_code == 0
    assert json.loads(run("operators", "list", "--format", "json").output)[0]["disabled_at"]
    missing = CliRunner().invoke(cli, ["operators", "disable", "nobody"])
    assert missing.exit_code == 2 and "no operator" in missing.output


def test_account_shows_the_history_the_console_shows(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in seeded.env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    openid, zone = next(iter(seeded.world.mismatched))
    result = run("account", openid, "--zone-id", zone, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    with session_scope(seeded.url) as session:
        snaps = session.scalars(
            select(BalanceSnapshot)
            .where(BalanceSnapshot.openid == openid, BalanceSnapshot.zone_id == zone)
            .order_by(BalanceSnapshot.fetched_at)
        ).all()
        cases = session.scalars(
            select(MismatchCase).where(MismatchCase.openid == openid, MismatchCase.zone_id == zone)
        ).all()
    assert [f["id"] for f in doc["fetches"]] == [s.id for s in snaps]
    assert doc["login"]["known"] and doc["login"]["has_session_key"]
    assert "session_key_enc" not in result.output
    # Each fetch's check values are the comparison the reconciliation made.
    differing = {c.check for c in cases}
    last = doc["fetches"][-1]
    assert {p["check"] for p in last["checks"] if p["delta"]} == differing
    assert sorted(c["id"] for c in doc["cases"]) == sorted(c.id for c in cases)
    assert all(c["events"] for c in doc["cases"])

    table = run("account", openid, "--zone-id", zone)
    assert table.exit_code == 0
    assert f"account {openid} (zone {zone})" in table.output
    assert "balance midas/ledger" in table.output and "system" in table.output
    nobody = run("account", "nobody-at-all")
    assert (
        nobody.exit_code == 0 and "no snapshots" in nobody.output and "known: no" in nobody.output
    )


def test_web_refuses_a_placeholder_session_secret_in_production(env: str) -> None:
    result = subprocess.run(
        [MIDAS_RECON, "web", "--port", "0"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": env,
            "MIDAS_ENV": "production",
            "RECON_WEB_SESSION_SECRET": "changeme",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "midas-recon: RECON_WEB_SESSION_SECRET holds a placeholder value; set the real secret"
    )
