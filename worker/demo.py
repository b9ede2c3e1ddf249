"""`midas-recon demo`: the whole product end to end on the embedded default, in seconds.

Nothing but the installed package: a fresh SQLite file, no Redis (in-process queue and
limiter), the Midas simulator on a free loopback port. The demo plants players whose Midas
counters and ledger agree, and a known few that do not:

- mismatched: the ledger and Midas really disagree (a top-up Midas never got, a gift the
  ledger never booked, a spend Midas never took); each shows on its counter's check and on
  `balance`, and stays different, so both cases are confirmed;
- payments in flight: a top-up the ledger has but Midas applies only after the account's first
  fetch, within the settle window; both cases are cleared by the confirming re-fetch;
- expired sessions (Midas answers 90016) and accounts that never logged in (no session key):
  with API v2 both are unobservable, never zeros;
- inactive accounts (last seen 45+ days ago): not planned at all.

Accounts and ledger go through the real CSV intake, two nightly runs through
`worker.recon.runs.run_embedded` (the production task code): yesterday's (a backfill, as a
team starting today would make it), then a day's payments booked on both sides, then
today's. The HTML statement of today compares the two nights (its day is not over, so it is
marked partial). The summary compares what was found with what was planted.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import os
import random
import string
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet

from worker import business_calendar as clock
from worker.config import SECRET_VARIABLES, Settings, get_settings
from worker.simulator import SimConfig, Simulator
from worker.vocabulary import CaseStatus, LedgerKind, RunStatus, SnapshotStatus

SETTLE_SECONDS = 3  # short, so the confirm pass runs within the demo
ZONES = ("1", "2")
_ALPHABET = string.ascii_letters + string.digits + "-_"
_TOP_UPS = (
    60,
    300,
    680,
    1280,
    3280,
    6480,
)  # coins per top-up, like a shop's price points
_GIFTS = (10, 50, 100, 500)

Account = tuple[str, str]  # (openid, zone_id)


class DemoError(Exception):
    """The demo could not run, or found something other than what it planted."""


@dataclass
class Plan:
    """Who is who among the synthetic players; the demo checks its findings against it."""

    players: int
    mismatched: set[Account] = field(default_factory=set)
    in_flight: dict[Account, tuple[str, int]] = field(default_factory=dict)  # bill_no, coins
    expired: set[Account] = field(default_factory=set)
    never_logged_in: set[Account] = field(default_factory=set)
    inactive: set[Account] = field(default_factory=set)

    @property
    def planned(self) -> int:
        return self.players - len(self.inactive)

    @property
    def unobservable(self) -> set[Account]:
        return self.expired | self.never_logged_in


@dataclass
class Result:
    folder: Path
    database: Path
    report: Path
    base_url: str
    plan: Plan
    first_run_id: int  # yesterday's nightly: the statement's opening side
    day_payments: int  # booked on both sides between the two nights
    run_id: int
    business_date: dt.date
    status: str
    planned: int
    ok: int
    unobservable: int
    error: int
    opened: int
    confirmed: set[tuple[str, str, str]]  # (openid, zone_id, check)
    cleared: set[tuple[str, str, str]]
    suspected_left: int
    unobservable_accounts: set[Account]
    # Today's statement: the top-ups in flight at the first night settled at Midas after its
    # fetch, with their ledger rows before it; nothing else moved unexplained.
    residual: int | None
    run_seconds: float
    seconds: float

    @property
    def as_planted(self) -> bool:
        """Found exactly what was planted: no more, no less, and the run complete."""
        p = self.plan
        return (
            self.status == RunStatus.COMPLETE
            and self.planned == p.planned
            and self.error == 0
            and {(o, z) for o, z, _ in self.confirmed} == p.mismatched
            and {(o, z) for o, z, _ in self.cleared} == set(p.in_flight)
            and self.unobservable_accounts == p.unobservable
            and self.suspected_left == 0
            and self.residual == sum(amount for _, amount in p.in_flight.values())
        )

    def summary(self) -> str:
        p = self.plan
        confirmed_accounts = len({(o, z) for o, z, _ in self.confirmed})
        cleared_accounts = len({(o, z) for o, z, _ in self.cleared})
        url = f"sqlite:///{self.database}"
        return "\n".join(
            [
                f"Simulator: {self.base_url} (API v2, sandbox), {p.players} players in zones "
                f"{' and '.join(ZONES)}",
                f"Planted: {len(p.mismatched)} mismatched, {len(p.in_flight)} payments in "
                f"flight, {len(p.expired)} expired sessions, {len(p.never_logged_in)} never "
                f"logged in, {len(p.inactive)} inactive",
                f"Nightly run #{self.first_run_id} for the day before, then {self.day_payments} "
                "payments booked on both sides, then",
                f"nightly run #{self.run_id} for {self.business_date}: {self.status} in "
                f"{self.run_seconds:.1f} s for both, confirm passes included",
                f"  planned {self.planned}, ok {self.ok}, unobservable {self.unobservable}, "
                f"error {self.error}",
                f"Mismatch cases: opened {self.opened}, confirmed {len(self.confirmed)} "
                f"({confirmed_accounts} accounts), cleared {len(self.cleared)} "
                f"({cleared_accounts} accounts), still suspected {self.suspected_left}",
                f"Statement of {self.business_date}: residual "
                f"{'n/a' if self.residual is None else f'{self.residual:,}'} coins, the "
                f"{len(p.in_flight)} top-ups in flight at the first night settling since",
                f"Found exactly what was planted: {'yes' if self.as_planted else 'NO'}",
                f"Report: {self.report}",
                f"Database: {self.database}",
                f"  e.g. DATABASE_URL={url} midas-recon report daily --date {self.business_date}",
                f"Took {self.seconds:.1f} s",
            ]
        )


def run_demo(
    output_dir: Path,
    *,
    players: int = 2500,
    seed: int = 7,
    echo: Callable[[str], None] = print,
) -> Result:
    """Plant, import, reconcile, report; returns what was found (see Result.as_planted)."""
    from worker.db.migrate import upgrade

    started = time.monotonic()
    output_dir = output_dir.expanduser().resolve()  # printed paths work from anywhere
    output_dir.mkdir(parents=True, exist_ok=True)
    # A new folder per run: running the demo twice never touches the first run's files.
    folder = Path(tempfile.mkdtemp(prefix="demo-", dir=output_dir))
    database = folder / "midas_recon.db"
    sim_config = SimConfig(seed=seed)
    sim = Simulator(sim_config)
    base_url = sim.start()
    try:
        with _demo_environment(_demo_env(database, base_url, sim_config)) as settings:
            echo(f"demo: folder {folder}")
            plan, accounts_csv, ledger_csv = _plant(sim, folder, players, seed)
            upgrade(settings.DATABASE_URL)
            _import(settings, accounts_csv, ledger_csv)
            for (
                openid,
                zone,
            ) in plan.expired:  # logged in once, then the session expired
                sim.expire_session(openid, zone)
            echo(f"demo: {players} players planted and imported; nightly run starting")
            result = _reconcile(settings, sim, plan, folder, database, base_url, echo)
    finally:
        sim.stop()
    result.seconds = time.monotonic() - started
    return result


# -- set-up ---------------------------------------------------------------------------------


def _demo_env(database: Path, base_url: str, sim: SimConfig) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{database}",
        "MIDAS_API_BASE": base_url,
        "MIDAS_API_VERSION": "v2",  # needs session keys: expired ones show as unobservable
        "MIDAS_ENV": "sandbox",
        "MIDAS_APPID": sim.appid,
        "MIDAS_APP_SECRET": sim.app_secret,
        "MIDAS_OFFER_ID": sim.offer_id,
        "MIDAS_APP_KEY": sim.app_key("sandbox"),
        "MIDAS_RATE_LIMIT": "2000",
        "MIDAS_MAX_IN_FLIGHT": "16",
        "MIDAS_TIMEOUT_S": "5",
        "RECON_SETTLE_SECONDS": str(SETTLE_SECONDS),
        "RECON_ACTIVE_DAYS": "30",
        # A fresh key per demo: the session keys in this throwaway database die with it.
        "SESSION_KEY_ENCRYPTION_KEY": Fernet.generate_key().decode("ascii"),
    }


@contextmanager
def _demo_environment(env: dict[str, str]) -> Iterator[Settings]:
    """The demo's settings, process-wide (code that reads get_settings() sees them too)."""
    names = set(Settings.model_fields) | {f"{n}_FILE" for n in SECRET_VARIABLES}
    saved = {k: v for k, v in os.environ.items() if k in names}
    for name in names:  # no REDIS_URL (embedded mode), no real credentials
        os.environ.pop(name, None)
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(saved)
        get_settings.cache_clear()


def _plant(sim: Simulator, folder: Path, players: int, seed: int) -> tuple[Plan, Path, Path]:
    """Create the players in the simulator and write the game's accounts and ledger files."""
    rng = random.Random(seed)
    now = clock.utcnow().replace(microsecond=0)
    accounts: list[Account] = []
    seen: set[str] = set()
    while len(accounts) < players:
        openid = "o" + "".join(rng.choices(_ALPHABET, k=27))
        if openid not in seen:
            seen.add(openid)
            accounts.append((openid, ZONES[0] if len(accounts) % 10 < 7 else ZONES[1]))

    # Disjoint groups, a fixed share each, at random positions.
    order = list(accounts)
    rng.shuffle(order)
    plan = Plan(players=players)
    shares = (
        ("inactive", 3),
        ("never_logged_in", 2),
        ("expired", 4),
        ("mismatched", 2),
        ("in_flight", 1),
    )
    position = 0
    groups: dict[str, list[Account]] = {}
    for name, percent in shares:
        size = max(1, players * percent // 100)
        groups[name] = order[position : position + size]
        position += size
    plan.inactive = set(groups["inactive"])
    plan.never_logged_in = set(groups["never_logged_in"])
    plan.expired = set(groups["expired"])
    plan.mismatched = set(groups["mismatched"])

    ledger: list[tuple[str, str, str, str, int, dt.datetime]] = []
    account_rows: list[tuple[str, str, str, str]] = []
    bills = iter(range(1, 10**9))

    def bill() -> str:
        return f"demo-{next(bills):08d}"

    def past(days: int) -> dt.datetime:
        return now - dt.timedelta(seconds=rng.randint(300, days * 86_400))

    for openid, zone in accounts:
        key = base64.b64encode(rng.randbytes(16)).decode("ascii")
        sim.add_player(openid, zone, session_key=key)
        inactive = (openid, zone) in plan.inactive
        last_active = now - dt.timedelta(days=rng.randint(45, 90)) if inactive else past(20)
        stored_key = "" if (openid, zone) in plan.never_logged_in else key
        account_rows.append((openid, zone, stored_key, last_active.isoformat()))
        # History: agreed top-ups, gifts, spends and a cancelled spend, booked on both sides.
        for _ in range(rng.randint(1, 3)):
            amount, no = rng.choice(_TOP_UPS), bill()
            sim.save(openid, zone, amount, no)
            ledger.append((no, openid, zone, LedgerKind.SAVE, amount, past(25)))
        if rng.random() < 0.4:
            amount, no = rng.choice(_GIFTS), bill()
            sim.present(openid, zone, amount, no)
            ledger.append((no, openid, zone, LedgerKind.PRESENT, amount, past(25)))
        for _ in range(rng.randint(0, 2)):
            balance = int(sim.counters(openid, zone)["balance"])
            amount, no, spent_at = (
                rng.randint(1, max(1, balance // 2)),
                bill(),
                past(20),
            )
            sim.pay(openid, zone, amount, no)
            ledger.append((no, openid, zone, LedgerKind.COST, amount, spent_at))
            if rng.random() < 0.1:  # refunded a few minutes later
                sim.cancelpay(openid, zone, no)
                cancel_at = spent_at + dt.timedelta(seconds=rng.randint(60, 240))
                ledger.append((f"{no}.cancel", openid, zone, LedgerKind.CANCEL, amount, cancel_at))

    for n, (openid, zone) in enumerate(sorted(plan.mismatched)):
        no = bill()
        if n % 3 == 0:  # a top-up the ledger booked and Midas never got
            ledger.append((no, openid, zone, LedgerKind.SAVE, rng.choice(_TOP_UPS), past(10)))
        elif n % 3 == 1:  # a gift Midas made that the ledger never booked
            sim.present(openid, zone, rng.choice(_GIFTS), no)
        else:  # a spend the ledger booked and Midas never took
            ledger.append((no, openid, zone, LedgerKind.COST, 1, past(10)))

    # Booked by the game seconds ago; Midas applies them only after the first fetch.
    for openid, zone in groups["in_flight"]:
        amount, no = rng.choice(_TOP_UPS), bill()
        plan.in_flight[(openid, zone)] = (no, amount)
        ledger.append((no, openid, zone, LedgerKind.SAVE, amount, now - dt.timedelta(seconds=2)))

    accounts_csv = folder / "accounts.csv"
    with accounts_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["openid", "zone_id", "session_key", "last_active_at"])
        writer.writerows(account_rows)
    ledger_csv = folder / "ledger.csv"
    with ledger_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["bill_no", "openid", "zone_id", "kind", "amount", "occurred_at"])
        for no, openid, zone, kind, amount, at in ledger:
            writer.writerow([no, openid, zone, kind, amount, at.isoformat()])
    return plan, accounts_csv, ledger_csv


def _import(settings: Settings, accounts_csv: Path, ledger_csv: Path) -> None:
    """Through the same intake code as `accounts import` and `ledger import`."""
    from worker.db.accounts import upsert_accounts
    from worker.db.crypto import SessionKeyCipher
    from worker.db.ledger import import_entries
    from worker.db.session import session_scope
    from worker.recon.intake import read_accounts_csv, read_ledger_csv

    cipher = SessionKeyCipher.from_settings(settings)
    with session_scope(settings.DATABASE_URL) as session:
        upsert_accounts(session, read_accounts_csv(accounts_csv, cipher=cipher))
        import_entries(session, read_ledger_csv(ledger_csv, calendar=settings.calendar))


# -- the run --------------------------------------------------------------------------------


def _reconcile(
    settings: Settings,
    sim: Simulator,
    plan: Plan,
    folder: Path,
    database: Path,
    base_url: str,
    echo: Callable[[str], None],
) -> Result:
    from worker.db.cases import list_cases
    from worker.db.runs import get_run
    from worker.db.session import session_scope
    from worker.db.snapshots import accounts_with_status
    from worker.recon.runs import RunProgress, run_embedded
    from worker.reports.render import render
    from worker.reports.statement import build_statement, build_trend

    stop = threading.Event()
    settler = threading.Thread(
        target=_settle_in_flight,
        args=(settings.DATABASE_URL, sim, plan, stop),
        name="demo-in-flight",
        daemon=True,
    )
    settler.start()
    began = time.monotonic()
    last_at, last_seen = 0.0, ("", -1)

    def progress(p: RunProgress) -> None:  # at most one line a second, and the last one
        nonlocal last_at, last_seen
        now, seen = time.monotonic(), (p.status, p.done)
        if seen != last_seen and (p.status != RunStatus.RUNNING or now - last_at >= 1):
            last_at, last_seen = now, seen
            echo(f"demo: run #{p.run_id} {p.status}, {p.done}/{p.planned} accounts fetched")

    today = settings.calendar.today()
    try:
        # Plans, fetches, finalizes, then waits for the settle window and runs the confirm
        # pass: the same functions the Celery tasks call. Yesterday first (a backfill).
        first = run_embedded(
            settings, today - dt.timedelta(days=1), trigger="demo", progress=progress
        )
        payments = _day_of_payments(settings, sim, plan, folder)
        echo(f"demo: {payments} payments booked on both sides; today's nightly run starting")
        run = run_embedded(settings, today, trigger="demo", progress=progress)
    finally:
        stop.set()
        settler.join(timeout=5)
    run_seconds = time.monotonic() - began

    with session_scope(settings.DATABASE_URL) as session:
        run_row = get_run(session, run.id)
        if run_row is None:
            raise DemoError(f"run #{run.id} vanished")
        cases = [(c.openid, c.zone_id, c.check, c.status) for c in list_cases(session)]
        unobservable = accounts_with_status(session, run.id, SnapshotStatus.UNOBSERVABLE)
        opened = len(cases)
        statement = build_statement(session, run_row.business_date, calendar=settings.calendar)
        trend = build_trend(session, run_row.business_date, calendar=settings.calendar)
        report = folder / f"statement-{run_row.business_date}.html"
        report.write_text(render(statement, "html", trend), encoding="utf-8")
        return Result(
            folder=folder,
            database=database,
            report=report,
            base_url=base_url,
            plan=plan,
            first_run_id=first.id,
            day_payments=payments,
            run_id=run_row.id,
            business_date=run_row.business_date,
            status=run_row.status,
            planned=run_row.planned,
            ok=run_row.ok,
            unobservable=run_row.unobservable,
            error=run_row.error,
            opened=opened,
            confirmed={(o, z, c) for o, z, c, s in cases if s == CaseStatus.CONFIRMED},
            cleared={(o, z, c) for o, z, c, s in cases if s == CaseStatus.CLEARED},
            suspected_left=sum(1 for *_, s in cases if s == CaseStatus.SUSPECTED),
            unobservable_accounts=unobservable,
            residual=statement.total.residual,
            run_seconds=run_seconds,
            seconds=0.0,
        )


def _day_of_payments(settings: Settings, sim: Simulator, plan: Plan, folder: Path) -> int:
    """A day between the two nights: top-ups and spends by a tenth of the observable,
    agreeing players, applied at Midas and imported into the ledger as a late file."""
    rng = random.Random(len(plan.mismatched))
    quiet = set(plan.mismatched) | set(plan.in_flight) | plan.unobservable | plan.inactive
    everyone = ((p["openid"], p["zone_id"]) for p in sim.players())
    players = sorted(a for a in everyone if a not in quiet)
    now = clock.utcnow()
    rows = []
    for n, (openid, zone) in enumerate(rng.sample(players, max(1, len(players) // 10))):
        no = f"demo-day-{n:06d}"
        balance = int(sim.counters(openid, zone)["balance"])
        if n % 3 == 2 and balance > 1:
            amount = rng.randint(1, balance // 2 or 1)
            sim.pay(openid, zone, amount, no)
            rows.append((no, openid, zone, LedgerKind.COST, amount, now))
        else:
            amount = rng.choice(_TOP_UPS)
            sim.save(openid, zone, amount, no)
            rows.append((no, openid, zone, LedgerKind.SAVE, amount, now))
    path = folder / "ledger-day.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["bill_no", "openid", "zone_id", "kind", "amount", "occurred_at"])
        for no, openid, zone, kind, amount, at in rows:
            writer.writerow([no, openid, zone, kind, amount, at.isoformat()])
    from worker.db.ledger import import_entries
    from worker.db.session import session_scope
    from worker.recon.intake import read_ledger_csv

    with session_scope(settings.DATABASE_URL) as session:
        import_entries(session, read_ledger_csv(path, calendar=settings.calendar))
    return len(rows)


def _settle_in_flight(url: str, sim: Simulator, plan: Plan, stop: threading.Event) -> None:
    """Apply each in-flight top-up at Midas once the account's first snapshot is stored.

    The confirming re-fetch comes SETTLE_SECONDS later; polling every 0.1 s applies the
    payment well inside that window, as a real payment in flight would settle.
    """
    from worker.db.session import session_scope
    from worker.db.snapshots import accounts_fetched

    waiting = dict(plan.in_flight)
    while waiting and not stop.wait(0.1):
        openids = [o for o, _ in waiting]
        with session_scope(url) as session:
            fetched = accounts_fetched(session, openids)
        for account in fetched & set(waiting):
            no, amount = waiting.pop(account)
            sim.save(account[0], account[1], amount, no)
