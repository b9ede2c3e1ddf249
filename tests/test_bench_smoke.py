"""The benchmarks do not rot: `python -m bench.run_all --smoke` runs every benchmark's real code
(Celery workers, the simulator, the task bodies, the report CLI) at tiny sizes, and the JSON
figures it writes must be there and make sense. The figures themselves are docs/benchmarks.md's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import MISMATCH_EVERY, windows_above
from tests.conftest import PG_ADMIN_URL, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_windows_above_counts_what_midas_would_refuse() -> None:
    # Limit 2: the arrival at 0.99 is the third within one second (refused), the one at 1.6
    # sees only 0.99 before it in (0.6, 1.6] and passes.
    times = [0.0, 0.5, 0.99, 1.6, 5.0]
    assert windows_above(times, 2) == {
        "max_in_any_1s_window": 3,
        "seconds_above_limit": 1,  # second [0, 1) held 3
        "arrivals_over_limit": 1,
    }
    assert windows_above([], 2)["max_in_any_1s_window"] == 0


def mismatched(n: int) -> int:
    """Accounts 1..n whose Midas side differs from the ledger (bench.common.midas_counters)."""
    return sum(1 for i in range(1, n + 1) if i % MISMATCH_EVERY == 1)


def test_smoke_run_writes_sane_figures(tmp_path: Path, redis_url: str) -> None:
    env = {
        **os.environ,
        "BENCH_REDIS_URL": redis_url,
        "BENCH_PG_ADMIN_URL": PG_ADMIN_URL,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(res) == {
        "rate", "pipeline", "naive", "memory", "scale", "reports", "console", "planning",
        "partitions",
    }  # fmt: skip
    for data in res.values():
        assert data["machine"]["nproc"] >= 1 and data["command"].startswith("python -m bench")

    rate = res["rate"]["figures"]["rates"]["50"]
    [ours] = rate["ours"]  # one run at the default margin
    for label, f in (
        ("ours", ours),
        ("celery_rate_limit_R_per_worker", rate["celery_rate_limit_R_per_worker"]),
        ("celery_rate_limit_R_over_4_per_worker", rate["celery_rate_limit_R_over_4_per_worker"]),
    ):
        assert f["requests"] == rate["accounts"], label
        assert 0 < f["utilisation"] < 5, label
    # The limiter's promise holds even at this size: no one-second window above R, counted
    # by the kernel's receive time; every request stamped at both ends.
    assert ours["max_in_any_1s_window"] <= 50
    assert ours["arrivals_over_limit"] == 0
    assert ours["without_kernel_stamp"] == 0
    assert ours["client_requests"] == rate["accounts"]
    assert ours["lag_ms"]["handler_minus_kernel"]["p50_ms"] >= 0
    assert ours["lag_ms"]["send_minus_sched"]["p50_ms"] >= 0

    pipe = res["pipeline"]["figures"]
    n = pipe["accounts"]
    assert pipe["snapshots"] == n and pipe["accounts_per_s"] > 0
    assert pipe["rows_per_account"]["balance_snapshots"] == 1.0
    assert pipe["cases_opened"] == 2 * mismatched(n)  # save_sum and balance differ
    assert 0 < pipe["worker_cpu_ms_per_account"] < 1000
    stages = pipe["stages"]["stage_cpu_us_per_account"]
    for stage in ("fetch (all of the client)", "store snapshots", "compare + case update"):
        assert stages[stage] > 0, stage

    naive = res["naive"]["figures"]
    assert naive["naive"]["errors"] == 0
    assert naive["naive"]["accounts_differing"] == mismatched(naive["naive"]["accounts"])
    assert naive["ratio"] > 0
    slow = naive["naive_at_50ms_latency"]
    assert slow["errors"] == 0 and slow["accounts_differing"] == mismatched(slow["accounts"])
    # One account at a time waits out every answer: never faster than 1 / 50 ms.
    assert 0 < slow["accounts_per_s"] <= 20

    by_months = res["partitions"]["figures"]["by_months"]
    assert set(by_months) == {"1", "2"}
    for months in by_months.values():
        assert months["current_ok_snapshots"]["median_ms"] > 0
        assert "Execution Time" in months["explain"]["current_ok_snapshots"][-1]

    memory = res["memory"]["figures"]["runs"]
    assert memory and all(20 < r["worker_peak_rss_mib"] < 2000 for r in memory.values())

    for size, run in res["scale"]["figures"]["runs"].items():
        # One run item and one snapshot per account, plus the cases of the mismatched few.
        assert 2.0 <= run["rows_per_account"] < 2.1, size
        assert run["bytes_per_account"] > 0 and run["broker_peak_bytes"] > 0, size
        # Its own process per size: a night's peak RSS, with the driver and task bodies.
        assert 20 < run["night_peak_rss_mib"] < 2000 and run["peak_rss_covers"] == "the night"

    reports = res["reports"]["figures"]
    assert reports["snapshots"] == 30 * reports["accounts"]
    assert set(reports["seconds_by_format"]) == {"table", "json", "csv", "html"}
    # The per-query breakdown saw the statement's queries, slowest first.
    seconds = [spent for spent, _sql in reports["queries_s"]]
    assert seconds == sorted(seconds, reverse=True)
    assert any("ledger_entries" in sql for _spent, sql in reports["queries_s"])

    # Planning: 895 a night over 2,000 accounts; the modelled week sees them all by night 3
    # and then keeps every one within the week, the movers the night after.
    planning = res["planning"]["figures"]
    planned = planning["plan"]["2000"]
    assert planned["capacity"] == 895 and planned["planned"] + planned["deferred"] == 2000
    assert planned["tiers"]["moved"]["planned"] == planned["tiers"]["moved"]["active"] == 20
    nights = planning["week"]["nights"]
    assert [n["planned"] for n in nights[:3]] == [895, 895, 895]
    never = [n["never_observed"] for n in nights[:3]]
    assert never[0] == 1105 and 0 < never[1] < 1105 - 800 and never[2] == 0
    assert all(n["verdict"] == "covered" for n in nights[3:])
    assert all(n["moved"]["not_observed"] == 0 for n in nights[1:])
