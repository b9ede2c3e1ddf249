"""The console benchmark does not rot: `python -m bench.run_all --only console --smoke` seeds
its world at a tiny size, serves the console on waitress and times every URL; the JSON it
writes must be there and make sense. The figures themselves are docs/benchmarks.md's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_console_benchmark_smoke(tmp_path: Path, redis_url: str) -> None:
    env = {**os.environ, "BENCH_REDIS_URL": redis_url, "BENCH_PG_ADMIN_URL": PG_ADMIN_URL}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run_all",
            "--only",
            "console",
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "console.json").read_text())
    figures = data["figures"]
    assert data["command"].startswith("python -m bench.run_all")
    assert figures["accounts"] == 3000 and figures["cases"] == 600
    # One snapshot of the latest night for every account without a history, a night of each
    # run for the 1,000 with one; three ledger rows a night for those, one for the others.
    assert figures["snapshots"] == (3000 - 1000) + 30 * 1000
    assert figures["ledger_entries"] == (3000 - 1000) + 30 * 1000 * 3
    assert len(figures["timings"]) == 6
    for label, timing in figures["timings"].items():
        assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p95_ms"], label
        assert timing["bytes"] > 0, label
    assert figures["timings"]["cases, default (open, largest |delta|, page 1)"]["bytes"] > 10_000
