"""Metrics counted in worker processes are served, summed, by worker.metrics_server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _env(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("METRICS_PORT",)}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(folder), PYTHONPATH=str(ROOT), **extra)
    return env


def _count_in_child(folder: Path, code: str) -> None:
    subprocess.run([sys.executable, "-c", code], env=_env(folder), check=True, timeout=60)


def _scrape(port: int) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode("utf-8")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _serve(folder: Path, code: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=_env(folder), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving metrics on"), line
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def test_counts_from_two_processes_are_summed(tmp_path: Path) -> None:
    count = (
        "import worker.metrics as m; m.SNAPSHOTS.labels('ok').inc({n}); "
        "m.MIDAS_REQUESTS.labels('getbalance', '45011').inc()"
    )
    _count_in_child(tmp_path, count.format(n=3))
    _count_in_child(tmp_path, count.format(n=2))
    proc, port = _serve(tmp_path, "from worker.metrics_server import main; main(['--port', '0'])")
    try:
        text = _scrape(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert 'recon_snapshots_total{status="ok"} 5.0' in text
    assert 'midas_requests_total{endpoint="getbalance",errcode="45011"} 2.0' in text


def test_celery_hooks_reset_the_folder_serve_and_drop_dead_gauges(tmp_path: Path) -> None:
    # A child process counts and holds a live gauge, then "exits" through the hook.
    code = (
        "import os, worker.metrics as m\n"
        "from worker.metrics_server import on_worker_init, on_worker_process_shutdown\n"
        "m.RUN_ITEMS_DONE.labels('nightly').inc(2)\n"  # the parent's own file must survive
        "on_worker_init()\n"
        "print('serving metrics on 127.0.0.1:%d/metrics' % __import__("
        "'worker.metrics_server', fromlist=['x'])._started_on, flush=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    m.SNAPSHOTS.labels('unobservable').inc(4); m.LIMITER_IN_FLIGHT.inc(7)\n"
        "    on_worker_process_shutdown(pid=os.getpid()) if os.environ.get('DROP') else None\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('child exited', flush=True)\n"
        "import threading; threading.Event().wait()\n"
    )
    for drop, in_flight in (("", "7.0"), ("1", None)):
        folder = tmp_path / f"run{drop or 0}"
        folder.mkdir()
        (folder / "counter_99999.db").write_bytes(b"stale from a previous worker")
        env = _env(folder, METRICS_PORT="0", DROP=drop)
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        try:
            line = proc.stdout.readline()
            port = int(line.rsplit(":", 1)[1].split("/")[0])
            assert not (folder / "counter_99999.db").exists()  # reset before serving
            assert proc.stdout.readline().strip() == "child exited"
            text = _scrape(port)
            assert 'recon_snapshots_total{status="unobservable"} 4.0' in text
            assert 'recon_run_items_done_total{kind="nightly"} 2.0' in text
            gauge = [ln for ln in text.splitlines() if ln.startswith("midas_limiter_in_flight ")]
            if in_flight is None:
                assert gauge in ([], ["midas_limiter_in_flight 0.0"])
            else:
                assert gauge == [f"midas_limiter_in_flight {in_flight}"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_no_port_no_server(tmp_path: Path) -> None:
    code = (
        "from worker import metrics_server as s; s.on_worker_init(); "
        "assert s._started_on is None; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "ok"


def test_every_metric_is_documented() -> None:
    from prometheus_client import metrics as pm

    import worker.metrics as m

    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    names = [v._name for v in vars(m).values() if isinstance(v, pm.MetricWrapperBase)]
    assert names
    missing = [n for n in names if n not in text]
    assert not missing, f"docs/metrics.md does not describe {missing}"


def test_the_metrics_server_listens_on_loopback_by_default(tmp_path: Path) -> None:
    """A worker on a host serves nobody else unless METRICS_ADDR says so (compose does)."""
    from worker.metrics_server import DEFAULT_ADDR, DEFAULT_PORT

    assert DEFAULT_ADDR == "127.0.0.1" and DEFAULT_PORT != 9100  # 9100: node_exporter's
    code = "from worker.metrics_server import main; main(['--port', '0'])"
    env = {k: v for k, v in _env(tmp_path).items() if k != "METRICS_ADDR"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving metrics on 127.0.0.1:"), line
        assert _scrape(int(line.rsplit(":", 1)[1].split("/")[0]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
