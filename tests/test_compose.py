"""docker-compose.yml without a Docker engine: its shape, and its commands run for real.

Each service's command must be one the package provides; the test runs the same commands with
the environment compose would give them (interpolated from the file's defaults), pointed at the
test Postgres, the test Redis database and a free port instead of the compose host names.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL, ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
BIN = Path(sys.executable).parent
APP_SERVICES = ("migrate", "worker", "beat", "simulator")


# -- compose semantics the tests need -------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:-|-|:\?|\?)?")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error} and $$, nested."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = _VAR.match(value, i)
        if not m:
            out.append(value[i])
            i += 1
            continue
        depth, j = 1, m.end()
        while depth:  # the default may itself hold ${...}
            if value.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth -= value[j] == "}"
            j += 1
        arg = value[m.end() : j - 1]
        name, op = m["name"], m["op"]
        current = env.get(name)
        if (op == ":-" and not current) or (op == "-" and current is None):
            out.append(interpolate(arg, env))
        elif op in (":?", "?") and not current:
            raise ValueError(f"{name}: {arg}")
        else:
            out.append(current or "")
        i = j
    return "".join(out)


def service_env(name: str, host_env: dict[str, str] | None = None) -> dict[str, str]:
    """The `environment` compose would give the service (no .env file)."""
    raw = SERVICES[name].get("environment", {})
    return {k: interpolate(str(v), host_env or {}) for k, v in raw.items()}


def command(name: str) -> list[str]:
    cmd = SERVICES[name]["command"]
    assert isinstance(cmd, list), f"{name}: use the exec (list) form"
    return [str(c) for c in cmd]


def with_option(cmd: list[str], option: str, value: str) -> list[str]:
    """`cmd` with the value of `option` replaced (a free port, a scratch path)."""
    i = cmd.index(option)
    return [*cmd[: i + 1], value, *cmd[i + 2 :]]


def executable(cmd: list[str]) -> list[str]:
    """The console scripts of the environment running the tests."""
    path = BIN / cmd[0]
    assert path.exists(), f"{cmd[0]} is not installed beside {sys.executable}"
    return [str(path), *cmd[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the file's shape -------------------------------------------------------------------------


def test_services() -> None:
    assert set(SERVICES) == {"postgres", "redis", "migrate", "worker", "beat", "simulator", "web"}
    for name in APP_SERVICES:
        assert SERVICES[name]["build"] == "."  # the image of Dockerfile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile and "USER midas" in dockerfile


def test_databases_have_healthchecks() -> None:
    pg = SERVICES["postgres"]["healthcheck"]["test"]
    assert pg[0] == "CMD" and pg[1] == "pg_isready"
    assert SERVICES["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("postgres", "redis", "simulator"):
        check = SERVICES[name]["healthcheck"]
        assert check["interval"] and check["retries"] >= 3


def test_exactly_one_beat_and_one_worker_command() -> None:
    beats = [
        n
        for n, s in SERVICES.items()
        if s.get("command", [])[:4] == ["celery", "-A", "worker", "beat"]
    ]
    assert beats == ["beat"]
    assert "replicas" not in SERVICES["beat"].get("deploy", {})
    assert command("worker")[:4] == ["celery", "-A", "worker", "worker"]
    queues = command("worker")[command("worker").index("-Q") + 1]
    assert queues == "recheck,nightly"


def test_start_order() -> None:
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["redis"] == {"condition": "service_healthy"}
    assert SERVICES["worker"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_simulator_is_dev_only_and_wired_in_by_default() -> None:
    from worker.simulator import SimConfig

    sim = SERVICES["simulator"]
    assert sim["profiles"] == ["dev"]
    assert all("profiles" not in SERVICES[n] for n in SERVICES if n != "simulator")
    cmd = command("simulator")
    sim_port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # noqa: S104  (reachable from other containers)
    env = service_env("worker")
    assert env["MIDAS_API_BASE"] == f"http://simulator:{sim_port}"
    # The default credentials are the simulator's, so its signatures check out on a first run.
    cfg = SimConfig()
    assert (env["MIDAS_APPID"], env["MIDAS_APP_SECRET"], env["MIDAS_OFFER_ID"]) == (
        cfg.appid,
        cfg.app_secret,
        cfg.offer_id,
    )
    assert env["MIDAS_APP_KEY"] == cfg.app_key(env["MIDAS_ENV"])


def test_compose_env_is_valid_settings_and_names_every_variable() -> None:
    from worker.config import Settings, load_settings

    env = service_env("worker")
    settings = load_settings(env)
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://midas:midas@postgres:5432/")
    assert settings.REDIS_URL == "redis://redis:6379/0" and not settings.embedded
    optional = {"MIDAS_ACCESS_TOKEN", "SESSION_KEY_ENCRYPTION_KEY"}  # from .env when set
    optional |= {n for n in Settings.model_fields if n.startswith("RECON_WEB_")}  # the console's
    assert set(Settings.model_fields) - optional <= set(env)
    assert env["METRICS_PORT"] and env["PROMETHEUS_MULTIPROC_DIR"]
    # .env values flow through: a password lands in the URL, a base URL replaces the default.
    custom = service_env("worker", {"POSTGRES_PASSWORD": "s3cret", "MIDAS_API_BASE": "https://x"})
    assert ":s3cret@postgres" in custom["DATABASE_URL"] and custom["MIDAS_API_BASE"] == "https://x"


def test_env_example_names_every_variable() -> None:
    from worker.config import Settings

    example = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", example, flags=re.M))
    missing = set(Settings.model_fields) - named
    assert not missing, f".env.example does not name {sorted(missing)}"
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    assert used - named == set(), f".env.example does not name {sorted(used - named)}"
    # Every uncommented value is accepted by the settings (the file works as it is).
    from worker.config import load_settings

    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example, flags=re.M))
    load_settings({k: v for k, v in values.items() if k in Settings.model_fields})


def test_interpolation_helper() -> None:
    env = {"A": "a", "E": ""}
    assert interpolate("${A}-${B:-b}-${E:-e}-${E-e}-$$x", env) == "a-b-e--$x"
    assert interpolate("${X:-p://${A}:${Y:-y}@h}", env) == "p://a:y@h"
    with pytest.raises(ValueError, match="need it"):
        interpolate("${N:?need it}", env)


# -- the commands are real --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["migrate", "simulator"])
def test_midas_recon_commands_exist(name: str) -> None:
    """`midas-recon <command> <compose options> --help`: the command and its options exist."""
    cmd = executable(command(name))
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: midas-recon" in out.stdout


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_celery_commands_exist(name: str) -> None:
    out = subprocess.run(
        [*executable(command(name)), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


def test_celery_app_has_the_queues() -> None:
    from worker.celery_app import app

    queues = {q.name for q in app.conf.task_queues or []}
    wanted = set(command("worker")[command("worker").index("-Q") + 1].split(","))
    assert wanted <= queues, f"the worker consumes {wanted}, the app declares {queues}"


# -- and they run -----------------------------------------------------------------------------


@pytest.fixture
def scratch_pg() -> Iterator[str]:
    """An empty Postgres database, as the compose `postgres` service starts."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"midas_recon_compose_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_env(name: str, **overrides: str) -> dict[str, str]:
    """The service's compose environment, with the host names swapped for the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(service_env(name))
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.integration
def test_migrate_runs_and_is_safe_to_run_again(scratch_pg: str) -> None:
    from worker.db.migrate import current, head

    env = run_env("migrate", DATABASE_URL=scratch_pg)
    first = subprocess.run(
        executable(command("migrate")), env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert current(scratch_pg) == head()
    again = subprocess.run(
        executable(command("migrate")), env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout


class Service:
    """A compose service's command running as a process, its output in a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_for(self, pattern: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text_ = self.log.read_text(errors="replace")
            if re.search(pattern, text_):
                return text_
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{text_[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the whole group: celery's pool too
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._fh.close()
        return self.proc.returncode


@pytest.mark.integration
@pytest.mark.slow
def test_worker_and_beat_come_up(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    metrics_port = free_port()
    hosts = {"DATABASE_URL": pg_url, "REDIS_URL": redis_url, "MIDAS_API_BASE": "http://127.0.0.1:9"}
    worker = Service(
        executable(command("worker")),
        run_env(
            "worker",
            **hosts,
            METRICS_PORT=str(metrics_port),
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        ),
        tmp_path / "worker.log",
    )
    beat_cmd = with_option(command("beat"), "--schedule", str(tmp_path / "celerybeat-schedule"))
    beat = Service(executable(beat_cmd), run_env("beat", **hosts), tmp_path / "beat.log")
    try:
        log = worker.wait_for(r"celery@\S+ ready\.")
        assert "recheck" in log and "nightly" in log
        ping = subprocess.run(
            [str(BIN / "celery"), "-A", "worker", "inspect", "ping", "--timeout", "10"],
            env=run_env("worker", **hosts),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
        beat.wait_for(r"beat: Starting")
        time.sleep(2)
        assert beat.proc.poll() is None, beat.log.read_text()[-3000:]
    finally:
        worker_rc, beat_rc = worker.stop(), beat.stop()
    assert worker_rc == 0 and beat_rc == 0


@pytest.mark.integration
def test_simulator_command_serves(tmp_path: Path) -> None:
    port = free_port()
    cmd = with_option(command("simulator"), "--port", str(port))
    cmd = with_option(cmd, "--players", "20")
    cmd = with_option(cmd, "--host", "127.0.0.1")  # compose listens on all; a test need not
    sim = Service(executable(cmd), run_env("simulator"), tmp_path / "simulator.log")
    try:
        log = sim.wait_for(r"MIDAS_APP_KEY=")
        assert f"MIDAS_API_BASE=http://simulator:{port}" in log
        assert f"MIDAS_APP_KEY={service_env('worker')['MIDAS_APP_KEY']}" in log
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/__sim/players", timeout=10) as r:
            players = json.loads(r.read())
        assert len(players) == 20
        # The worker's compose settings really talk to it: one balance, end to end.
        env = run_env("worker", MIDAS_API_BASE=f"http://127.0.0.1:{port}")
        env.pop("REDIS_URL")
        out = subprocess.run(
            [*executable(["midas-recon"]), "balance", players[0]["openid"], "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["balance"] == players[0]["counters"]["balance"]
    finally:
        assert sim.stop() == 0


@pytest.mark.integration
def test_web_command_serves_the_console(pg_url: str, redis_url: str, tmp_path: Path) -> None:
    web = SERVICES["web"]
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert all(p.startswith("127.0.0.1:") for p in web["ports"]), "loopback only on the host"
    port = free_port()
    cmd = with_option(with_option(command("web"), "--port", str(port)), "--host", "127.0.0.1")
    env = run_env("web", DATABASE_URL=pg_url, REDIS_URL=redis_url)
    server = Service(executable(cmd), env, tmp_path / "web.log")
    try:
        server.wait_for(r"console on http://")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=10) as r:
            assert r.status == 200 and b"csrf_token" in r.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10)
            raise AssertionError("the API answered an anonymous request")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
