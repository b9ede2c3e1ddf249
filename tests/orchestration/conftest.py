"""A planted world for the orchestration tests: simulator players, accounts and a ledger whose
differences are known in advance, plus real Celery worker and beat processes.

Everything a worker process needs comes from its environment (`world.env`): the test
database, the test Redis db (TEST_REDIS_URL), the simulator's URL and fake credentials.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from worker.config import Settings, load_settings
from worker.db.accounts import AccountRow, upsert_accounts
from worker.db.crypto import SessionKeyCipher
from worker.db.ledger import LedgerRow, import_entries
from worker.db.models import BalanceSnapshot, MismatchCase, Run
from worker.db.session import session_scope
from worker.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).with_name("celery"))
LOG_LEVEL = os.environ.get("TEST_CELERY_LOG_LEVEL", "WARNING")  # INFO to debug a test
Account = tuple[str, str]

RATE = 200  # MIDAS_RATE_LIMIT and the simulator's own 45011 threshold
LATENCY_MS = 5.0
SETTLE_S = 3
DIFFERING_CHECKS = {"save": ("save_sum", "balance"), "present": ("present_sum", "balance")}


@dataclass
class World:
    """Who is who; the tests check the findings against it."""

    sim: Simulator
    env: dict[str, str]
    players: list[Account] = field(default_factory=list)
    # Planted differences: (account, kind of the coins one side never saw).
    mismatched: dict[Account, str] = field(default_factory=dict)
    # Top-ups the ledger has and Midas applies only after the account's first snapshot.
    in_flight: dict[Account, tuple[str, int]] = field(default_factory=dict)
    expired: set[Account] = field(default_factory=set)  # session expired at Midas: 90016
    no_session: set[Account] = field(default_factory=set)  # never logged in: no key at all
    inactive: set[Account] = field(default_factory=set)  # idle for 45 days: not planned
    paying: list[Account] = field(default_factory=list)  # get a payment during the run
    bills: int = 0

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    @property
    def url(self) -> str:
        return self.env["DATABASE_URL"]

    @property
    def planned(self) -> int:
        return len(self.players) - len(self.inactive)

    @property
    def unobservable(self) -> set[Account]:
        return self.expired | self.no_session

    def ordinary(self) -> list[Account]:
        """Players nothing was planted on: Midas and the ledger agree, the session is live."""
        special = (
            set(self.mismatched) | set(self.in_flight) | self.unobservable | self.inactive
        ) | set(self.paying)
        return [p for p in self.players if p not in special]

    def expected_confirmed(self) -> set[tuple[str, str, str]]:
        return {
            (o, z, c) for (o, z), kind in self.mismatched.items() for c in DIFFERING_CHECKS[kind]
        }

    def expected_cleared(self) -> set[tuple[str, str, str]]:
        return {(o, z, c) for (o, z) in self.in_flight for c in DIFFERING_CHECKS["save"]}

    def bill(self) -> str:
        self.bills += 1
        return f"T{self.bills:07d}"

    def ledger(self, account: Account, kind: str, amount: int, at: dt.datetime) -> str:
        bill_no = self.bill()
        with session_scope(self.url) as session:
            import_entries(session, [LedgerRow(bill_no, account[0], account[1], kind, amount, at)])
        return bill_no

    def pay_now(self, account: Account, amount: int) -> None:
        """A top-up as it happens: the game books it, Midas has it a moment later."""
        bill_no = self.ledger(account, "save", amount, dt.datetime.now(dt.UTC))
        self.sim.save(account[0], account[1], amount, bill_no)


def world_env(db_url: str, redis_url: str | None, base_url: str, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": db_url,
        "MIDAS_API_BASE": base_url,
        "MIDAS_API_VERSION": "v2",
        "MIDAS_ENV": "sandbox",
        "MIDAS_APPID": "wxsim0000000000",
        "MIDAS_APP_SECRET": "sim-app-secret",
        "MIDAS_OFFER_ID": "1450000000",
        "MIDAS_APP_KEY": "sim-sandbox-appkey",
        "MIDAS_RATE_LIMIT": str(RATE),
        "MIDAS_MAX_IN_FLIGHT": "32",
        "MIDAS_TIMEOUT_S": "5",
        "RECON_SETTLE_SECONDS": str(SETTLE_S),
        # Test worlds compress time: a 3 s settle window, and a clock skew to match (rows
        # the game dated within 2 minutes of a fetch would otherwise hold every confirmation).
        "RECON_CLOCK_SKEW_SECONDS": "1",
        "RECON_TIMEZONE": "Asia/Shanghai",
        "SESSION_KEY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "SESSION_KEY_TRANSPORT_KEY": Fernet.generate_key().decode(),
    }
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


def plant(
    sim: Simulator,
    env: dict[str, str],
    n: int,
    *,
    seed: int = 7,
    mismatched: int = 20,
    in_flight: int = 20,
    expired: int = 20,
    no_session: int = 10,
    inactive: int = 10,
    paying: int = 20,
) -> World:
    """`n` players that agree with the ledger, except the planted few."""
    rng = random.Random(seed)
    world = World(sim, env)
    cipher = SessionKeyCipher.from_settings(world.settings)
    now = dt.datetime.now(dt.UTC)
    players = [(f"o{seed}_{i:05d}-plr", "1" if i % 3 else "2") for i in range(n)]
    world.players = players
    special = rng.sample(players, mismatched + in_flight + expired + no_session + inactive + paying)
    take = iter(special)
    for _ in range(mismatched):
        world.mismatched[next(take)] = rng.choice(["save", "present"])
    for _ in range(in_flight):
        world.in_flight[next(take)] = ("", rng.choice((60, 300, 680)))
    world.expired = {next(take) for _ in range(expired)}
    world.no_session = {next(take) for _ in range(no_session)}
    world.inactive = {next(take) for _ in range(inactive)}
    world.paying = [next(take) for _ in range(paying)]

    accounts: list[AccountRow] = []
    ledger: list[LedgerRow] = []
    long_ago = now - dt.timedelta(days=2)
    for account in players:
        openid, zone = account
        save, present = rng.choice((0, 60, 300, 6480)), rng.choice((0, 10, 100))
        cost = rng.randint(0, save + present)
        key = None if account in world.no_session else f"sk{rng.getrandbits(64):016x}"
        midas_save, midas_present = save, present
        kind = world.mismatched.get(account)
        extra = 500 + rng.randint(1, 99)
        if kind == "save":  # a top-up the ledger has and Midas never got
            ledger.append(LedgerRow(world.bill(), openid, zone, "save", extra, long_ago))
        elif kind == "present":  # a gift Midas has and the ledger never booked
            midas_present += extra
        sim.add_player(
            openid, zone, save=midas_save, present=midas_present, cost=cost, session_key=key
        )
        if account in world.expired:
            sim.expire_session(openid, zone)
        for what, amount in (("save", save), ("present", present), ("cost", cost)):
            if amount:
                ledger.append(LedgerRow(world.bill(), openid, zone, what, amount, long_ago))
        if account in world.in_flight:
            bill_no, amount = world.bill(), world.in_flight[account][1]
            world.in_flight[account] = (bill_no, amount)
            ledger.append(
                LedgerRow(bill_no, openid, zone, "save", amount, now - dt.timedelta(seconds=30))
            )
        active = now - dt.timedelta(days=45 if account in world.inactive else 1)
        accounts.append(
            AccountRow(
                openid,
                zone,
                last_active_at=active,
                session_key_enc=cipher.encrypt(key) if key else None,
                session_key_at=active if key else None,
            )
        )
    with session_scope(world.url) as session:
        upsert_accounts(session, accounts, now=now)
        import_entries(session, ledger)
    return world


class Settler:
    """Applies each in-flight top-up at Midas once the account's first snapshot is stored,
    well inside the settle window, as a payment in flight between the game and Midas would."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.waiting = dict(world.in_flight)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="settler", daemon=True)

    def __enter__(self) -> Settler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while self.waiting and not self.stop.wait(0.1):
            openids = [o for o, _ in self.waiting]
            with session_scope(self.world.url) as session:
                fetched = {
                    (o, z)
                    for o, z in session.execute(
                        select(BalanceSnapshot.openid, BalanceSnapshot.zone_id).where(
                            BalanceSnapshot.openid.in_(openids)
                        )
                    )
                }
            for account in fetched & set(self.waiting):
                bill_no, amount = self.waiting.pop(account)
                self.world.sim.save(account[0], account[1], amount, bill_no)


def case_sets(url: str) -> dict[str, set[tuple[str, str, str]]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(
                MismatchCase.openid, MismatchCase.zone_id, MismatchCase.check, MismatchCase.status
            )
        ).all()
    out: dict[str, set[tuple[str, str, str]]] = {}
    for openid, zone, check, status in rows:
        out.setdefault(status, set()).add((openid, zone, check))
    return out


def wait_for(predicate, timeout: float, what: str, every: float = 0.25, world=None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = diagnose(world) if world is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{state}")
        time.sleep(every)


def diagnose(world: World) -> str:
    """Where the work is stuck: broker lists, runs and their items by state, live claims."""
    import redis

    from worker.db.models import RunItem

    lines = []
    client = redis.Redis.from_url(world.env["REDIS_URL"])
    for key in ("nightly", "recheck", "unacked", "unacked_index"):
        kind = client.type(key).decode()
        size = {"list": client.llen, "hash": client.hlen, "zset": client.zcard}.get(kind)
        lines.append(f"{key}: {kind} {size(key) if size else ''}")
    lines.append("claim keys: " + ", ".join(k.decode() for k in client.keys("midas_recon:*")))
    with session_scope(world.url) as session:
        for run in session.scalars(select(Run).order_by(Run.id)):
            states = session.execute(
                select(RunItem.state, RunItem.claimed_at, func.count())
                .where(RunItem.run_id == run.id)
                .group_by(RunItem.state, RunItem.claimed_at)
            ).all()
            summary = [(s, c.isoformat() if c else None, n) for s, c, n in states if s != "done"]
            lines.append(f"run {run.id} {run.kind} {run.status}: open {summary}")
    client.close()
    return "\n" + "\n".join(lines)


def no_suspected(url: str) -> bool:
    with session_scope(url) as session:
        return not session.scalar(
            select(func.count()).select_from(MismatchCase).where(MismatchCase.status == "suspected")
        )


def nightly_run(url: str) -> Run | None:
    with session_scope(url) as session:
        return session.scalars(select(Run).where(Run.kind == "nightly")).one_or_none()


# -- the worker's clock ----------------------------------------------------------------------


class Clock:
    """The worker's clock (worker.business_calendar.utcnow) under a test's control: set to a
    moment, a millisecond further at every read, so that every timestamp the worker takes is
    distinct and in order. Time only moves forward."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, start: dt.datetime) -> Clock:
        import worker.business_calendar as bc

        clock = cls(start)
        monkeypatch.setattr(bc, "utcnow", clock)
        return clock

    def set(self, moment: dt.datetime) -> None:
        assert moment >= self.now, "time only moves forward"
        self.now = moment

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(milliseconds=1)
        return self.now


# -- processes ----------------------------------------------------------------------------------


class Procs:
    """Celery worker and beat processes of one test; all terminated at teardown."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = {**os.environ, **env}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def configure(self, env: dict[str, str]) -> None:
        self.env.update(env)

    def worker(
        self,
        name: str,
        concurrency: int = 2,
        level: str = LOG_LEVEL,
        *,
        events: bool = False,
        app: str = "worker",  # bench.rate_probe: the same app, timed (benchmark 1)
    ) -> subprocess.Popen[bytes]:
        cmd = [
            CELERY, "-A", app, "worker", "--pool", "prefork",
            "--concurrency", str(concurrency), "-Q", "recheck,nightly", "-n", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", level,
        ]  # fmt: skip
        if events:
            cmd.append("-E")  # task events, as `celery events` and Flower see them
        return self._start(name, cmd)

    def beat(self) -> subprocess.Popen[bytes]:
        cmd = [
            CELERY, "-A", "worker", "beat", "-l", LOG_LEVEL,
            "-s", str(self.folder / "celerybeat-schedule"),
        ]  # fmt: skip
        return self._start("beat", cmd)

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "ab")  # closed below: the child has its copy
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the whole process group: the worker's parent and its pool children."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()  # the parent only: a warm shutdown stops its pool itself
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            self.procs.pop(name)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(SimConfig(rate_limit=RATE, latency_ms=LATENCY_MS))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    holder = Procs({}, tmp_path)
    yield holder
    holder.stop_all()
    keep = os.environ.get("TEST_KEEP_LOGS")  # a folder to copy the process logs to
    if keep:
        import shutil

        shutil.copytree(tmp_path, Path(keep) / tmp_path.name, dirs_exist_ok=True)
    for name in ("w1", "w2", "beat"):
        text = holder.log(name)
        if "Traceback" in text or "ERROR" in text:
            print(f"--- {name}.log ---\n{text[-5000:]}")
