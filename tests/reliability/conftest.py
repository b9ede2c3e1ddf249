"""Fixtures of the reliability suite: a planted world driven through the production batch code
against the simulator, private Redis and Postgres servers to restart, and a witness that
collects every log line and error text the suite produces, for the secret check that runs
last (test_zz_secrets.py).

The world reuses tests/orchestration/conftest.py (`plant`, `world_env`); only the credentials
differ: long, distinctive values, so that a leak of any of them is found by a plain search.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.orchestration.conftest import Procs, World, nightly_run, plant, wait_for, world_env
from tests.orchestration.conftest import procs as procs  # the Celery processes fixture
from worker.db.models import BalanceSnapshot, Run
from worker.db.session import session_scope
from worker.recon import runs as service
from worker.recon.fetch import RetryPolicy
from worker.simulator import SimConfig, Simulator

APP_SECRET = "rel-app-secret-7c1d9e0f3a"
APP_KEY = "rel-sandbox-appkey-5b2a8e41"
PROD_APP_KEY = "rel-production-appkey-09d3c7"
ENCRYPTION_KEY = Fernet.generate_key().decode()
FAST_RETRY = RetryPolicy(base_s=0.05, cap_s=0.4)
GETBALANCE = "/wxa/game/getbalance"
RATE = 400  # high where the rate is not what a test is about; the simulator enforces it too


# -- the witness ----------------------------------------------------------------------------------


class Witness:
    """Every text the suite produced that could carry a secret, and every secret it used."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.secrets: set[str] = {APP_SECRET, APP_KEY, PROD_APP_KEY, ENCRYPTION_KEY}

    def add(self, text: str | None) -> None:
        if text:
            self.texts.append(text)

    def exception(self, exc: BaseException) -> None:
        self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]

    def secret(self, value: str | None) -> None:
        if value:
            self.secrets.add(value)

    def simulator(self, sim: Simulator) -> None:
        """The session keys and access tokens a simulator knew."""
        for player in sim.players():
            self.secret(player["session_key"])
        # The tokens it handed out (stable_token, issue_token): read from its state, the only
        # place that lists them all.
        for token in list(sim._state._tokens):
            self.secret(token)


class _RawHandler(logging.Handler):
    """Each record as it was logged (all attributes, traceback), before any redaction."""

    def __init__(self, witness: Witness) -> None:
        super().__init__(logging.DEBUG)
        self.witness = witness

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.getMessage()} {record.__dict__!r}"
        except Exception as exc:  # a broken format string is itself worth keeping
            text = f"{record.msg!r} {record.args!r} ({exc})"
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception(record.exc_info[1]))
        self.witness.add(text)


WITNESS = Witness()


@pytest.fixture(scope="package", autouse=True)
def _witness_logs() -> Iterator[Witness]:
    """Every record of every logger while the suite runs, the project's before redaction."""
    handler = _RawHandler(WITNESS)
    root, ours = logging.getLogger(), logging.getLogger("worker")
    # On `worker` the handler sees the project's records before any handler's filter runs.
    ours.addHandler(handler)
    previous = ours.level
    ours.setLevel(logging.DEBUG)
    other = _RawHandler(WITNESS)
    other.addFilter(lambda r: not r.name.startswith("worker"))
    root.addHandler(other)
    yield WITNESS
    ours.removeHandler(handler)
    ours.setLevel(previous)
    root.removeHandler(other)


@pytest.fixture
def witness() -> Witness:
    return WITNESS


def record(name: str, **figures: object) -> None:
    """Figures for docs/reliability.md: appended as JSON lines to $RELIABILITY_FIGURES."""
    path = os.environ.get("RELIABILITY_FIGURES")
    print(f"\n{name}: {figures}")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": name, **figures}) + "\n")


# -- the world --------------------------------------------------------------------------------


def rel_env(db_url: str, redis_url: str | None, base_url: str, **extra: str) -> dict[str, str]:
    ours = {
        "MIDAS_APP_SECRET": APP_SECRET,
        "MIDAS_APP_KEY": APP_KEY,
        "MIDAS_RATE_LIMIT": str(RATE),
        "SESSION_KEY_ENCRYPTION_KEY": ENCRYPTION_KEY,
    }
    return world_env(db_url, redis_url, base_url, **{**ours, **extra})


def make_sim(**config: object) -> Simulator:
    settings: dict[str, object] = {
        "app_secret": APP_SECRET,
        "app_key_sandbox": APP_KEY,
        "app_key_production": PROD_APP_KEY,
        "rate_limit": RATE,
        "latency_ms": 2.0,
        "timeout_fault_s": 2.0,
    }
    settings.update(config)
    sim = Simulator(SimConfig(**settings))  # type: ignore[arg-type]
    sim.start()
    return sim


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = make_sim()
    yield simulator
    WITNESS.simulator(simulator)
    simulator.stop()


def small_world(sim: Simulator, env: dict[str, str], n: int = 150, seed: int = 11) -> World:
    """`n` players: a few differences, expired sessions, never-logged-in and idle accounts;
    nobody pays during the run, so every ok snapshot must equal the simulator's counters."""
    return plant(
        sim,
        env,
        n,
        seed=seed,
        mismatched=5,
        in_flight=0,
        expired=8,
        no_session=4,
        inactive=3,
        paying=0,
    )


def make_deps(
    world: World, redis_client: redis.Redis | None = None, policy: RetryPolicy | None = None
) -> service.FetchDeps:
    """What a worker process builds for its batches, with the fleet limiter in Redis when
    given a client."""
    from worker.midas.limiter import make_limiter

    settings = world.settings
    limiter = make_limiter(settings, redis=redis_client)
    deps = service.FetchDeps.from_settings(settings, limiter=limiter, redis=redis_client)
    # The production bounds (attempts, quota waits) with a shorter backoff: the tail of
    # retries costs a fraction of a second instead of four (tests/orchestration/test_fetch.py
    # covers the backoff itself).
    deps.policy = policy or FAST_RETRY
    return deps


def drive_nightly(
    world: World, redis_client: redis.Redis | None = None, policy: RetryPolicy | None = None
) -> Run:
    """One nightly run through the production batch code (plan, pump, run_batch), in this
    process."""
    settings = world.settings
    deps = make_deps(world, redis_client, policy)
    db = partial(session_scope, world.url)
    with db() as session:
        started = service.start_nightly(session, settings, trigger="cli")
    service.drive(db, deps, started.run_id, size=service.batch_size(settings), poll_s=0.2)
    return load_run(world.url, started.run_id)


def load_run(url: str, run_id: int) -> Run:
    with session_scope(url) as session:
        run = session.get(Run, run_id)
        assert run is not None
        session.expunge(run)
    return run


def start_celery_night(world: World, procs: Procs) -> None:
    """A worker (2 processes) and beat on the world's settings; the night started as beat
    would start it."""
    from worker.celery_app import make_app

    procs.configure(world.env)
    procs.worker("w1")
    procs.beat()
    sender = make_app(world.settings)
    sender.send_task("midas_recon.start_nightly", kwargs={"trigger": "cli"})
    sender.close()


def fetched(sim: Simulator) -> int:
    """getbalance requests the simulator received so far."""
    return int(sim.stats()["by_path"].get(GETBALANCE, 0))


def finished_run(url: str) -> Run | None:
    """The nightly run once it is no longer running (None before, or while the database
    cannot answer)."""
    try:
        run = nightly_run(url)
    except Exception:  # a pool connection from before a restart may fail once
        return None
    return run if run is not None and run.status != "running" else None


def stop_and_witness(procs: Procs) -> str:
    """Stop the processes; their logs go to the witness. Returns the worker's log."""
    procs.stop_all()
    for name in ("w1", "beat"):
        WITNESS.add(procs.log(name))
    return procs.log("w1")


@dataclass(frozen=True)
class Snap:
    openid: str
    zone_id: str
    status: str
    values: dict[str, int | bool | None]
    errcode: int | None
    errmsg: str | None


def snapshots(url: str, run_id: int) -> list[Snap]:
    fields = ("balance", "gen_balance", "save_amt", "save_sum", "cost_sum", "present_sum")
    with session_scope(url) as session:
        rows = session.scalars(select(BalanceSnapshot).where(BalanceSnapshot.run_id == run_id))
        out = [
            Snap(
                r.openid,
                r.zone_id,
                r.status,
                {f: getattr(r, f) for f in (*fields, "first_save")},
                r.errcode,
                r.errmsg,
            )
            for r in rows
        ]
    for snap in out:
        WITNESS.add(snap.errmsg)
    return out


def assert_honest(world: World, run: Run) -> dict[str, int]:
    """Every planned account has exactly one snapshot; an ok one says what Midas holds (no
    one paid meanwhile), the others carry no value; the run's verdict and figures follow."""
    snaps = snapshots(world.url, run.id)
    planned = set(world.players) - world.inactive
    keys = [(s.openid, s.zone_id) for s in snaps]
    assert len(keys) == len(set(keys)), "an account has two snapshots in one run"
    assert set(keys) == planned, "a planned account has no snapshot"
    by_status = {"ok": 0, "unobservable": 0, "error": 0}
    for s in snaps:
        by_status[s.status] += 1
        if s.status == "ok":
            truth = world.sim.counters(s.openid, s.zone_id)
            assert s.values == {k: truth[k] for k in s.values}, (s.openid, s.values, truth)
        else:
            assert set(s.values.values()) == {None}
            assert s.errmsg
        if (s.openid, s.zone_id) in world.unobservable:
            assert s.status in ("unobservable", "error"), s
        else:
            assert s.status in ("ok", "error"), s
    assert run.planned == len(planned) == sum(by_status.values())
    assert (run.ok, run.unobservable, run.error) == (
        by_status["ok"],
        by_status["unobservable"],
        by_status["error"],
    )
    assert run.status == ("complete" if by_status["error"] == 0 else "incomplete")
    return by_status


# -- private servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test only, without persistence: a restart loses every key."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: the restart tests need it", pytrace=False)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, 10, "the private redis-server", every=0.05)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class PrivateCluster:
    """A Postgres cluster of this test only (initdb, pg_ctl as the postgres user), to restart."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            pytest.fail("pg_ctl is not installed: the Postgres restart test needs it")
        self.bin = found[-1].parent
        self.port = free_port()
        # Outside the test's tmp_path: the postgres user must own the folder and its parents
        # must be traversable by it.
        self.folder = Path(tempfile.mkdtemp(prefix="midas-rel-pg-"))
        os.chmod(self.folder, 0o755)  # noqa: S103 (postgres must reach its data folder)
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *cmd: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def init(self) -> None:
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off"
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.folder / "log"), "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    cluster.init()
    yield cluster
    cluster.destroy()
