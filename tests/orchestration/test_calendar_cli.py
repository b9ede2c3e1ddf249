"""The command line across the calendar: future dates, backfills, late ledger files, guard-rails
(an unknown openid, a wait with no worker), each with its exit code and one line."""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from tests.orchestration.conftest import World, plant, world_env
from worker.cli import cli
from worker.config import get_settings
from worker.db.models import Account, MismatchCase, Run
from worker.db.session import session_scope
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def use(world: World, monkeypatch: pytest.MonkeyPatch, redis: bool = False) -> None:
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    if not redis:
        monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()


def small_world(url: str, sim: Simulator, redis_url: str | None = None) -> World:
    return plant(
        sim, world_env(url, redis_url, sim.base_url), 12, mismatched=0, in_flight=0,
        expired=0, no_session=0, inactive=0, paying=0,
    )  # fmt: skip


def count(url: str, what: object) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(what)) or 0)  # type: ignore[arg-type]


def test_a_run_for_a_date_that_has_not_begun_is_refused(
    sqlite_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(sqlite_url, sim)
    use(world, monkeypatch)
    tomorrow = get_settings().calendar.today() + dt.timedelta(days=2)
    result = CliRunner().invoke(cli, ["run", "--date", tomorrow.isoformat()])
    assert result.exit_code == 2, result.output
    assert f"{tomorrow} has not begun in Asia/Shanghai" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert count(sqlite_url, Run) == 0  # nothing planned


def test_a_backfill_says_what_it_does(
    sqlite_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(sqlite_url, sim)
    use(world, monkeypatch)
    today = get_settings().calendar.today()
    runner = CliRunner()
    assert runner.invoke(cli, ["run"]).exit_code == 0
    yesterday = today - dt.timedelta(days=1)
    result = runner.invoke(cli, ["run", "--date", yesterday.isoformat()])
    assert result.exit_code == 0, result.output
    assert f"backfill: {yesterday} is earlier than the runs of {today}" in result.stderr
    assert f"the statement of {today} compares against them" in result.stderr
    with session_scope(sqlite_url) as session:
        dates = set(session.scalars(select(Run.business_date).where(Run.kind == "nightly")))
    assert dates == {today, yesterday}


def test_recheck_of_an_unknown_openid_enrolls_nobody(
    sqlite_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(sqlite_url, sim)
    use(world, monkeypatch)
    before = count(sqlite_url, Account)
    result = CliRunner().invoke(cli, ["recheck", "o7_typo-plr", "--zone-id", "1"])
    assert result.exit_code == 2
    assert "no account o7_typo-plr in zone 1" in result.stderr and "--enroll" in result.stderr
    assert count(sqlite_url, Account) == before and count(sqlite_url, Run) == 0
    # Enrolling on purpose still works (the game's payment before its first login).
    sim.add_player("o7_new-plr", "1")
    enrolled = CliRunner().invoke(cli, ["recheck", "o7_new-plr", "--enroll"])
    assert enrolled.exit_code == 0, enrolled.output
    assert count(sqlite_url, Account) == before + 1


def test_waiting_with_no_worker_gives_up_with_a_hint(
    db_url: str, redis_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(db_url, sim, redis_url)
    use(world, monkeypatch, redis=True)
    began = time.monotonic()
    result = CliRunner().invoke(cli, ["run", "--wait", "--timeout", "3"])
    assert result.exit_code == 1
    assert "stopped waiting after 3 s at 0/12" in result.stderr
    assert "Is a worker running" in result.stderr
    assert time.monotonic() - began < 20
    openid, zone = world.players[0]
    result = CliRunner().invoke(
        cli, ["recheck", openid, "--zone-id", zone, "--wait", "--timeout", "2"]
    )
    assert result.exit_code == 1 and "not done after 2 s" in result.stderr, result.stderr


def test_a_late_ledger_file_rechecks_the_accounts_it_made_stale(
    sqlite_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Embedded mode has no ledger scan: the import itself re-fetches, and the confirmed
    cases the missing rows caused are resolved."""
    world = small_world(sqlite_url, sim)
    use(world, monkeypatch)
    spender, other = world.players[0], world.players[1]
    sim.pay(spender[0], spender[1], 7, "late-1")  # Midas has it; the ledger does not yet
    runner = CliRunner()
    assert runner.invoke(cli, ["run"]).exit_code == 0  # confirmed: the ledger lacks the spend
    with session_scope(sqlite_url) as session:
        statuses = set(session.scalars(select(MismatchCase.status)))
    assert statuses == {"confirmed"}
    spent_at = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    late = tmp_path / "late.csv"
    late.write_text(
        "bill_no,openid,zone_id,kind,amount,occurred_at\n"
        f"late-1,{spender[0]},{spender[1]},cost,7,{spent_at}\n"
        # A row after every fetch needs no recheck: the next fetch sees it.
        f"late-2,{other[0]},{other[1]},save,60,{dt.datetime.now(dt.UTC).isoformat()}\n"
    )
    sim.save(other[0], other[1], 60, "late-2")
    result = runner.invoke(cli, ["ledger", "import", str(late)])
    assert result.exit_code == 0, result.output
    assert "1 accounts compared before these rows, fetching" in result.output
    with session_scope(sqlite_url) as session:
        statuses = set(session.scalars(select(MismatchCase.status)))
    assert statuses == {"resolved"}


def test_intake_refuses_ledger_rows_beyond_the_tolerated_skew(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=7)).isoformat()
    path = tmp_path / "ahead.csv"
    path.write_text(f"bill_no,openid,zone_id,kind,amount,occurred_at\nB1,o1,1,save,60,{ahead}\n")
    result = CliRunner().invoke(cli, ["ledger", "import", str(path)])
    assert result.exit_code == 2
    assert "row 2: occurred_at" in result.stderr and "RECON_CLOCK_SKEW_SECONDS" in result.stderr
    monkeypatch.setenv("RECON_CLOCK_SKEW_SECONDS", "600")
    get_settings.cache_clear()
    assert CliRunner().invoke(cli, ["ledger", "import", str(path)]).exit_code == 0


def test_the_start_task_refuses_a_future_date_without_retrying(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    from worker import dispatch, tasks

    monkeypatch.setattr(dispatch, "_runtime", None)
    future = (get_settings().calendar.today() + dt.timedelta(days=3)).isoformat()
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        tasks.start_nightly.run(business_date=future, trigger="beat")
    assert any(r.getMessage() == "nightly_refused" for r in caplog.records)
    assert count(db_url, Run) == 0
