"""`midas-recon run`, `runs`, `recheck` in the embedded mode (no Redis): output and exit codes.
With Redis and workers, test_nightly and test_rechecks run the same commands as processes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.orchestration.conftest import plant, world_env
from worker.cli import cli
from worker.config import get_settings
from worker.simulator import Simulator

pytestmark = pytest.mark.integration

FIELDS = {
    "id", "business_date", "trigger", "status", "planned", "ok", "unobservable", "error",
    "mismatches_opened", "started_at", "finished_at",
}  # fmt: skip


@pytest.mark.parametrize("command", ["run", "runs", "recheck"])
def test_help(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_embedded_run_runs_and_recheck(
    sqlite_url: str, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = plant(
        sim, world_env(sqlite_url, None, sim.base_url), 40, mismatched=4, in_flight=0,
        expired=4, no_session=2, inactive=2, paying=0,
    )  # fmt: skip
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()

    done = runner.invoke(cli, ["run"])
    assert done.exit_code == 0, done.output
    assert "complete" in done.output and f"planned {world.planned}" in done.output

    listing = runner.invoke(cli, ["runs", "--format", "json"])
    assert listing.exit_code == 0
    (row,) = json.loads(listing.output)
    assert FIELDS <= set(row) and row["status"] == "complete" and row["trigger"] == "cli"
    assert row["planned"] == world.planned and row["error"] == 0
    assert row["mismatches_opened"] == len(world.expected_confirmed())
    # The night held everyone (50/s for 5.5 h) and said how it covered them.
    assert row["capacity"] > world.planned and row["deferred"] == 0
    assert row["coverage_verdict"] in ("covered", "behind") and row["note"] is None
    assert "capacity" in done.output and "deferred 0" in done.output
    table = runner.invoke(cli, ["runs", "--kind", "all"])
    assert table.exit_code == 0 and "nightly" in table.output and "confirm" in table.output

    account = world.ordinary()[0]
    checked = runner.invoke(cli, ["recheck", account[0], "--zone-id", account[1]])
    assert checked.exit_code == 0, checked.output
    assert checked.output.startswith("ok: balance ")
    expired = sorted(world.expired)[0]
    gone = runner.invoke(cli, ["recheck", expired[0], "--zone-id", expired[1]])
    assert gone.exit_code == 0 and gone.output.startswith("unobservable: errcode 90016")

    # Every answer an HTTP 500: retried, then `error`; the run is incomplete (exit 1).
    sim.inject("http500", rate=1.0)
    failed = runner.invoke(cli, ["run", "--date", "2026-01-02"])
    assert failed.exit_code == 1
    assert "incomplete" in failed.output and f"error {world.planned - len(world.no_session)}" in (
        failed.output
    )
    sim.clear_faults()

    bad = runner.invoke(cli, ["run", "--date", "2026-13-01"])
    assert bad.exit_code == 2 and "--date" in bad.output
    worse = runner.invoke(cli, ["runs", "--limit", "0"])
    assert worse.exit_code == 2
