"""docker-compose.yml without a Docker engine: its shape, and its commands run for real.

Each service's command must be one the package provides; the test runs the same commands with
the environment compose would give them (interpolated from the file's defaults), pointed at the
test Postgres, the test Redis database and a free port instead of the compose host names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SECRETS: dict[str, Any] = COMPOSE["secrets"]
BIN = Path(sys.executable).parent
APP_SERVICES = ("migrate", "worker", "beat", "flower", "simulator")
# What .env gives compose on a first run: .env.example's uncommented values.
EXAMPLE_ENV = dict(
    re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", (ROOT / ".env.example").read_text(), flags=re.M)
)


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
    """The `environment` compose would give the service (host_env: what .env says; by default
    .env.example's values)."""
    raw = SERVICES[name].get("environment", {})
    host = EXAMPLE_ENV if host_env is None else host_env
    return {k: interpolate(str(v), host) for k, v in raw.items()}


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
    assert set(SERVICES) == {
        "postgres",
        "redis",
        "migrate",
        "worker",
        "beat",
        "flower",
        "simulator",
        "web",
    }
    for name in APP_SERVICES:
        assert SERVICES[name]["build"] == "."  # the image of Dockerfile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "USER midas" in dockerfile


def test_image_installs_locked_dependencies_before_the_code() -> None:
    """Fast rebuilds and the same versions next month: the lock first, the code last."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    lock_at = dockerfile.index("RUN pip install --no-deps -r requirements.lock")
    assert lock_at < dockerfile.index("COPY worker ./worker")
    assert "pip check" in dockerfile  # the build fails when the lock misses a dependency
    pinned = {
        re.split(r"==", line)[0].lower().replace("_", "-")
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert all("==" in line for line in (ROOT / "requirements.lock").read_text().splitlines()
               if line and not line.startswith("#"))  # fmt: skip
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["ops"]
    names = {re.split(r"[<>=\[ ;]", dep)[0].lower().replace("_", "-") for dep in wanted}
    assert names <= pinned, f"requirements.lock lacks {sorted(names - pinned)}"


def test_healthchecks() -> None:
    pg = SERVICES["postgres"]["healthcheck"]["test"]
    assert pg[0] == "CMD" and pg[1] == "pg_isready"
    redis_check = SERVICES["redis"]["healthcheck"]["test"]
    assert redis_check[0] == "CMD-SHELL" and "redis-cli ping" in redis_check[1]
    assert "/run/secrets/redis_password" in redis_check[1]  # Redis wants its password
    # Worker and beat: a liveness file, not `celery inspect ping` (remote control is off).
    assert SERVICES["worker"]["healthcheck"]["test"] == ["CMD", "midas-recon", "health", "worker"]
    assert SERVICES["beat"]["healthcheck"]["test"] == ["CMD", "midas-recon", "health", "beat"]
    for name in ("postgres", "redis", "simulator", "worker", "beat"):
        check = SERVICES[name]["healthcheck"]
        assert check["interval"] and check["retries"] >= 3


def test_worker_outwaits_its_longest_task_and_logs_rotate() -> None:
    from worker.celery_app import FETCH_HARD_LIMIT_S

    grace = SERVICES["worker"]["stop_grace_period"]
    seconds = int(grace[:-1]) * {"s": 1, "m": 60}[grace[-1]]
    assert seconds > FETCH_HARD_LIMIT_S + 10
    for name, service in SERVICES.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 2


def test_the_worker_keeps_two_malloc_arenas() -> None:
    # Without it the pool processes' RSS grew with the accounts fetched (docs/benchmarks.md §4).
    assert SERVICES["worker"]["environment"]["MALLOC_ARENA_MAX"] == "2"


def test_two_beats_and_one_worker_command() -> None:
    from worker.celery_app import QUEUES, app

    # The schedule file's folder must exist in the image when beat opens it: the home of the
    # image's user (Dockerfile), not a folder something else creates later.
    schedule = command("beat")[command("beat").index("--schedule") + 1]
    assert schedule.startswith("/var/lib/midas-recon/")
    assert "--home-dir /var/lib/midas-recon" in (ROOT / "Dockerfile").read_text()

    beats = [
        n
        for n, s in SERVICES.items()
        if s.get("command", [])[:4] == ["celery", "-A", "worker", "beat"]
    ]
    assert beats == ["beat"]
    # Two may run: only the holder of the Redis lease schedules (tests/test_beat_failover.py).
    assert SERVICES["beat"]["deploy"]["replicas"] == 2
    assert app.conf.beat_scheduler == "worker.beat:LockedScheduler"
    assert command("worker")[:4] == ["celery", "-A", "worker", "worker"]
    queues = command("worker")[command("worker").index("-Q") + 1]
    assert queues.split(",") == list(QUEUES)  # the alerts lane is consumed too


def test_start_order() -> None:
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "beat"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["redis"] == {"condition": "service_healthy"}
    assert SERVICES["worker"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_credentials_come_only_from_secret_files() -> None:
    """No credential default anywhere: every secret variable is a NAME_FILE pointing at a
    declared compose secret that the service mounts."""
    from worker.config import SECRET_VARIABLES

    text = (ROOT / "docker-compose.yml").read_text()
    for name in SECRET_VARIABLES:
        assert f"${{{name}" not in text, f"{name} is interpolated: a value in compose"
    for service_name in ("migrate", "worker", "beat", "flower", "simulator"):
        env = SERVICES[service_name]["environment"]
        mounted = set(SERVICES[service_name].get("secrets", []))
        for name in SECRET_VARIABLES:
            assert name not in env, f"{service_name} sets {name}: the _FILE route would refuse"
        for key, value in env.items():
            if key.endswith("_FILE") and value:
                secret = value.removeprefix("/run/secrets/")
                assert value.startswith("/run/secrets/") and secret in SECRETS, key
                assert secret in mounted, f"{service_name}: {secret} is not mounted"
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/")
    for secret in SECRETS.values():
        assert secret["file"].startswith("./secrets/")
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()
    # Flower sees the broker only.
    flower = SERVICES["flower"]
    assert set(flower["secrets"]) == {"redis_password", "flower_basic_auth"}
    assert "FLOWER_BASIC_AUTH" in flower["command"][2] and flower["profiles"] == ["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # loopback of the host only


def test_redis_has_a_password_and_its_persistence_is_chosen() -> None:
    cmd = SERVICES["redis"]["command"][2]
    assert "requirepass" in cmd and "/run/secrets/redis_password" in cmd
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd
    # Every app service reaches Redis with that password.
    for name in ("migrate", "worker", "beat", "flower", "simulator"):
        env = service_env(name)
        assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password", name


def test_simulator_is_dev_only_and_its_credentials_live_in_the_dev_script(
    tmp_path: Path,
) -> None:
    from worker.simulator import SimConfig

    sim = SERVICES["simulator"]
    assert sim["profiles"] == ["dev"]
    assert {n for n in SERVICES if "profiles" in SERVICES[n]} == {"simulator", "flower"}
    cmd = command("simulator")
    sim_port = cmd[cmd.index("--port") + 1]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # noqa: S104  (reachable from other containers)
    env = service_env("worker")
    assert env["MIDAS_API_BASE"] == f"http://simulator:{sim_port}"
    cfg = SimConfig()
    assert (env["MIDAS_APPID"], env["MIDAS_OFFER_ID"]) == (cfg.appid, cfg.offer_id)
    files = dev_secrets(tmp_path)
    assert files["midas_app_key"] == cfg.app_key(env["MIDAS_ENV"])
    assert files["midas_app_secret"] == cfg.app_secret
    assert set(files) == set(SECRETS)
    # Without .env (a real deployment that forgot it), compose refuses to start.
    with pytest.raises(ValueError, match="MIDAS_API_BASE"):
        service_env("worker", {})


def dev_secrets(folder: Path) -> dict[str, str]:
    """Run scripts/dev-secrets.sh into `folder`; the files it wrote."""
    done = subprocess.run(
        ["sh", str(ROOT / "scripts" / "dev-secrets.sh")],
        env={**os.environ, "SECRETS_DIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_dev_secrets_script_keeps_what_exists(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    first = dev_secrets(tmp_path)
    Fernet(first["session_key_encryption_key"].encode())  # a valid key
    assert len(first["redis_password"]) >= 16 and first["alert_webhooks"] == ""
    assert first["flower_basic_auth"].startswith("admin:")
    (tmp_path / "midas_app_key").write_text("a-real-key-written-by-hand")
    again = dev_secrets(tmp_path)
    assert again["midas_app_key"] == "a-real-key-written-by-hand"
    assert again["redis_password"] == first["redis_password"]


def test_compose_env_is_valid_settings_and_names_every_variable(tmp_path: Path) -> None:
    from worker.config import SECRET_VARIABLES, Settings, load_settings

    env = with_secret_files(service_env("worker"), dev_secrets(tmp_path / "s"), tmp_path)
    settings = load_settings(env)
    password = (tmp_path / "s" / "postgres_password").read_text()
    assert (
        settings.DATABASE_URL == f"postgresql+psycopg://midas:{password}@postgres:5432/midas_recon"
    )
    redis_password = (tmp_path / "s" / "redis_password").read_text()
    assert settings.REDIS_URL == f"redis://:{redis_password}@redis:6379/0"
    assert settings.MIDAS_APP_KEY is not None
    assert settings.MIDAS_APP_KEY.get_secret_value() == "sim-sandbox-appkey"
    assert settings.RECON_ALERT_WEBHOOKS is None  # an empty file: no alerts, no error
    optional = {"MIDAS_ACCESS_TOKEN"}  # from .env when set
    named = set(env) | {k.removesuffix("_FILE") for k in env}
    assert set(Settings.model_fields) - optional - set(SECRET_VARIABLES) <= named
    assert env["METRICS_PORT"] == "9847" and env["PROMETHEUS_MULTIPROC_DIR"]
    # .env values flow through: a base URL replaces the default.
    custom = service_env("worker", {**EXAMPLE_ENV, "MIDAS_API_BASE": "https://x"})
    assert custom["MIDAS_API_BASE"] == "https://x"


def with_secret_files(env: dict[str, str], files: dict[str, str], tmp: Path) -> dict[str, str]:
    """`env` with each /run/secrets/NAME replaced by a file holding files[NAME], as compose
    mounts them."""
    folder = tmp / "run-secrets"
    folder.mkdir(exist_ok=True)
    out = dict(env)
    for key, value in env.items():
        if key.endswith("_FILE") and value.startswith("/run/secrets/"):
            name = value.removeprefix("/run/secrets/")
            (folder / name).write_text(files[name])
            out[key] = str(folder / name)
    return out


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

    load_settings({k: v for k, v in EXAMPLE_ENV.items() if k in Settings.model_fields})
    # And it holds no credential: those are files under ./secrets.
    from worker.config import SECRET_VARIABLES

    assert not set(SECRET_VARIABLES) & set(EXAMPLE_ENV)


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


@pytest.mark.parametrize("role", ["worker", "beat"])
def test_healthcheck_commands_exist(role: str) -> None:
    cmd = SERVICES[role]["healthcheck"]["test"][1:]
    out = subprocess.run([*executable(cmd), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


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


# -- and they run, with the secrets mounted as files --------------------------------------------


@pytest.fixture
def secret_files(tmp_path: Path) -> dict[str, str]:
    return dev_secrets(tmp_path / "secrets")


@pytest.fixture
def private_redis(tmp_path: Path, secret_files: dict[str, str]) -> Iterator[str]:
    """A redis-server of our own with the compose password (requirepass from a file, as the
    compose service does); its URL without the password, as compose gives it."""
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f'requirepass "{secret_files["redis_password"]}"\n')
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed"
    proc = subprocess.Popen(
        [server, str(conf), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password=secret_files["redis_password"])
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.1)
    # Without the password it refuses: the password is really required.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=20)


def run_env(name: str, secrets: dict[str, str], tmp: Path, **overrides: str) -> dict[str, str]:
    """The service's compose environment with the secrets mounted as files and the host
    names swapped for the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    env.update(with_secret_files(service_env(name), secrets, tmp))
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.integration
def test_migrate_runs_and_is_safe_to_run_again(
    scratch_pg_url: str, secret_files: dict[str, str], tmp_path: Path
) -> None:
    from worker.db.migrate import current, head

    env = run_env("migrate", secret_files, tmp_path, DATABASE_URL=scratch_pg_url)
    first = subprocess.run(
        executable(command("migrate")), env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert current(scratch_pg_url) == head()
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
def test_worker_and_two_beats_come_up_healthy(
    pg_url: str, private_redis: str, secret_files: dict[str, str], tmp_path: Path
) -> None:
    metrics_port = free_port()
    hosts = {
        "DATABASE_URL": pg_url,
        "REDIS_URL": private_redis,
        "MIDAS_API_BASE": "http://127.0.0.1:9",
    }
    worker_env = run_env(
        "worker",
        secret_files,
        tmp_path,
        **hosts,
        METRICS_PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        RECON_LIVENESS_DIR=str(tmp_path / "worker-alive"),
    )
    worker = Service(executable(command("worker")), worker_env, tmp_path / "worker.log")
    beats = []
    for i in range(SERVICES["beat"]["deploy"]["replicas"]):
        beat_cmd = with_option(command("beat"), "--schedule", str(tmp_path / f"schedule-{i}"))
        env = run_env(
            "beat", secret_files, tmp_path, **hosts, RECON_LIVENESS_DIR=str(tmp_path / f"b{i}")
        )
        beats.append((env, Service(executable(beat_cmd), env, tmp_path / f"beat-{i}.log")))

    def healthy(role: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        cmd = executable(SERVICES[role]["healthcheck"]["test"][1:])
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    try:
        log = worker.wait_for(r"celery@\S+ ready\.")
        assert "recheck" in log and "alerts" in log and "nightly" in log
        deadline = time.monotonic() + 30
        while (check := healthy("worker", worker_env)).returncode != 0:
            assert time.monotonic() < deadline, check.stdout + check.stderr
            time.sleep(0.5)
        assert "worker: alive" in check.stdout
        # The address compose sets: reachable on every interface of the container.
        assert worker_env["METRICS_ADDR"] == "0.0.0.0"  # noqa: S104
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
        for _env, beat in beats:
            beat.wait_for(r"beat: Starting")
        leaders = lambda: [b for _e, b in beats if '"beat_leading"' in b.log.read_text()]  # noqa: E731
        deadline = time.monotonic() + 30
        while not leaders():
            assert time.monotonic() < deadline, "no beat took the lease"
            time.sleep(0.5)
        time.sleep(6)  # a few ticks: the other stays a standby, both stay healthy
        assert len(leaders()) == 1
        for env, beat in beats:
            assert beat.proc.poll() is None, beat.log.read_text()[-3000:]
            check = healthy("beat", env)
            assert check.returncode == 0, check.stdout + check.stderr
        # A worker that is gone is reported: the file ages (here: an old file, a short limit).
        stale = healthy("worker", {**worker_env, "RECON_LIVENESS_DIR": str(tmp_path / "none")})
        assert stale.returncode == 1 and "no sign of life" in stale.stderr
    finally:
        worker_rc = worker.stop()
        beat_rcs = [b.stop() for _e, b in beats]
    assert worker_rc == 0 and beat_rcs == [0] * len(beats)
    everything = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for name in ("redis_password", "postgres_password", "midas_app_key", "midas_app_secret"):
        assert secret_files[name] not in everything, f"{name} in a log"


@pytest.mark.integration
def test_simulator_command_serves(tmp_path: Path, secret_files: dict[str, str]) -> None:
    port = free_port()
    cmd = with_option(command("simulator"), "--port", str(port))
    cmd = with_option(cmd, "--players", "20")
    cmd = with_option(cmd, "--host", "127.0.0.1")  # compose listens on all; a test need not
    sim = Service(
        executable(cmd), run_env("simulator", secret_files, tmp_path), tmp_path / "simulator.log"
    )
    try:
        log = sim.wait_for(r"MIDAS_APP_KEY=")
        assert f"MIDAS_API_BASE=http://simulator:{port}" in log
        assert f"MIDAS_APP_KEY={secret_files['midas_app_key']}" in log
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/__sim/players", timeout=10) as r:
            players = json.loads(r.read())
        assert len(players) == 20
        # The worker's compose settings, secrets from files, really talk to it: one balance.
        env = run_env("worker", secret_files, tmp_path, MIDAS_API_BASE=f"http://127.0.0.1:{port}")
        env.pop("REDIS_URL")
        env.pop("REDIS_PASSWORD_FILE")
        env["DATABASE_URL"] = f"sqlite:///{tmp_path}/unused.db"
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
def test_web_command_serves_the_console(
    pg_url: str, redis_url: str, secret_files: dict[str, str], tmp_path: Path
) -> None:
    web = SERVICES["web"]
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert all(p.startswith("127.0.0.1:") for p in web["ports"]), "loopback only on the host"
    port = free_port()
    cmd = with_option(with_option(command("web"), "--port", str(port)), "--host", "127.0.0.1")
    # The test's Redis has no password: the compose one does (the other tests start one).
    env = run_env(
        "web", secret_files, tmp_path, DATABASE_URL=pg_url, REDIS_URL=redis_url,
        REDIS_PASSWORD_FILE="",
    )  # fmt: skip
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
