"""`midas-recon simulator` as a real process: prints what a worker needs, serves, stops."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from worker.midas.signing import v1_sig

pytestmark = pytest.mark.integration

COMMAND = [str(Path(sys.executable).parent / "midas-recon"), "simulator"]


def launch(*args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start the command and read its NAME=value lines up to MIDAS_APP_KEY."""
    proc = subprocess.Popen(
        [*COMMAND, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    env: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while "MIDAS_APP_KEY" not in env and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "=" in line and not line.startswith("#"):
            name, value = line.rstrip("\n").split("=", 1)
            env[name] = value
    if "MIDAS_APP_KEY" not in env:
        proc.kill()
        pytest.fail(f"the simulator printed no settings; stderr: {proc.communicate()[1]}")
    return proc, env


@pytest.fixture
def running() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    proc, env = launch("--port", "0", "--players", "5", "--seed", "2", "--rate-limit", "500")
    yield proc, env
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def signed_getbalance(env: dict[str, str], openid: str, token: str) -> dict[str, object]:
    path = "/cgi-bin/midas/sandbox/getbalance"
    body: dict[str, object] = {
        "openid": openid,
        "appid": env["MIDAS_APPID"],
        "offer_id": env["MIDAS_OFFER_ID"],
        "ts": int(time.time()),
        "zone_id": "1",
        "pf": "android",
    }
    body["sig"] = v1_sig(body, path, env["MIDAS_APP_KEY"])
    r = requests.post(
        f"{env['MIDAS_API_BASE']}{path}", params={"access_token": token}, json=body, timeout=5
    )
    return dict(r.json())


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_serves_with_the_printed_settings_and_stops_cleanly(
    running: tuple[subprocess.Popen[str], dict[str, str]], stop_signal: signal.Signals
) -> None:
    proc, env = running
    assert env["MIDAS_ENV"] == "sandbox"
    base = env["MIDAS_API_BASE"]
    token = requests.post(
        f"{base}/cgi-bin/stable_token",
        json={
            "grant_type": "client_credential",
            "appid": env["MIDAS_APPID"],
            "secret": env["MIDAS_APP_SECRET"],
        },
        timeout=5,
    ).json()["access_token"]
    players = requests.get(f"{base}/__sim/players", timeout=5).json()
    assert len(players) == 5
    answer = signed_getbalance(env, players[0]["openid"], token)
    assert answer["errcode"] == 0
    assert answer["balance"] == players[0]["counters"]["balance"]
    proc.send_signal(stop_signal)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "stopped after 2 requests" in err  # token + balance; control calls not counted
    assert "Traceback" not in err


def test_api_base_host_and_production_key() -> None:
    proc, env = launch("--players", "0", "--api-base-host", "simulator", "--env", "production")
    try:
        assert env["MIDAS_API_BASE"].startswith("http://simulator:")
        assert env["MIDAS_APP_KEY"] == "sim-prod-appkey"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_fault_rate_injects_the_fault_kind() -> None:
    proc, env = launch("--players", "1", "--fault-rate", "1", "--fault-kind", "quota_day")
    try:
        token = requests.post(f"{env['MIDAS_API_BASE']}/__sim/token", timeout=5).json()
        answer = signed_getbalance(env, "oANY", token["access_token"])
        assert answer["errcode"] == 45009
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*COMMAND, "--port", str(port)], capture_output=True, text=True, timeout=20
        )
    assert done.returncode == 2
    assert done.stderr.startswith(f"midas-recon: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_and_bad_options() -> None:
    done = subprocess.run([*COMMAND, "--help"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0
    assert "fake" in done.stdout
    bad = subprocess.run(
        [*COMMAND, "--fault-rate", "2"], capture_output=True, text=True, timeout=20
    )
    assert bad.returncode == 2
