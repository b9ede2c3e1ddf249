"""Rechecks: debounced bursts, the ledger scan, the confirm pass planner, and a recheck served
ahead of a deep nightly backlog."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select, text

from tests.orchestration.conftest import Procs, World, plant, wait_for, world_env
from tests.orchestration.test_nightly import GETBALANCE, MIDAS_RECON, done_items
from worker.celery_app import make_app
from worker.db.models import Account, LedgerEntry, MismatchCase, Run, RunItem
from worker.db.session import session_scope
from worker.dispatch import QUEUED_CLAIM_TTL_MS, claim_key
from worker.intake import seal_session_key
from worker.recon import rechecks
from worker.recon.batches import Batch
from worker.recon.runs import pump, start_nightly
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def recheck_runs(url: str, account: tuple[str, str]) -> list[Run]:
    """The account's recheck runs, planned or finished."""
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(Run)
                .join(RunItem, RunItem.run_id == Run.id)
                .join(Account, Account.id == RunItem.account_id)
                .where(
                    Run.kind == "recheck",
                    Account.openid == account[0],
                    Account.zone_id == account[1],
                )
            )
        )


def settled(url: str, redis_url: str, account: tuple[str, str]) -> bool:
    """Every recheck message consumed (each one either planned a run or was absorbed by the
    debounce) and the account's recheck runs finished."""
    client = redis.Redis.from_url(redis_url)
    try:
        if client.llen("recheck"):
            return False
    finally:
        client.close()
    found = recheck_runs(url, account)
    return bool(found) and all(r.status != "running" for r in found)


def test_a_burst_of_payments_makes_one_fetch(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    world = plant(sim, world_env(db_url, redis_url, sim.base_url), 100, paying=0, in_flight=0)
    procs.configure(world.env)
    procs.worker("w1")
    sender = make_app(world.settings)
    payer, booker = world.ordinary()[:2]
    sim.reset_stats()

    # 20 payment messages in a burst, as the game's payment handler sends them.
    for i in range(20):
        world.pay_now(payer, 60)
        sender.send_task(
            "midas_recon.recheck",
            kwargs={
                "openid": payer[0],
                "zone_id": payer[1],
                "reason": "payment",
                "bill_no": f"P{i}",
            },
        )
    wait_for(lambda: settled(world.url, redis_url, payer), 30, "the payer's recheck")
    assert sim.stats()["by_path"].get(GETBALANCE, 0) == 1
    (run,) = recheck_runs(world.url, payer)
    assert run.status == "complete" and run.trigger == "payment" and run.mismatches_opened == 0

    # 20 ledger rows the game wrote directly, found by the scan: one recheck, one fetch.
    sender.send_task("midas_recon.scan_ledger")  # the first scan starts at the ledger's end
    wait_for(lambda: _cursor(world.url) is not None, 15, "the first scan")
    for _ in range(20):
        world.pay_now(booker, 10)
    sim.reset_stats()
    sender.send_task("midas_recon.scan_ledger")
    wait_for(lambda: settled(world.url, redis_url, booker), 30, "the ledger scan's recheck")
    assert sim.stats()["by_path"].get(GETBALANCE, 0) == 1
    (run,) = recheck_runs(world.url, booker)
    assert run.trigger == "ledger" and run.status == "complete"

    # A login from the game's login handler: the account is known, its key stored encrypted.
    sealed = seal_session_key("c2Vzc2lvbmtleQ==", world.env["SESSION_KEY_TRANSPORT_KEY"])
    sender.send_task(
        "midas_recon.record_login",
        kwargs={"openid": "newcomer", "zone_id": "1", "session_key": sealed},
    )
    stored = wait_for(lambda: _session_key_enc(world.url, "newcomer"), 15, "the login")
    assert "c2Vzc2lvbmtleQ" not in stored

    # An operator's recheck is not delayed and prints what Midas says.
    sim.reset_stats()
    out = subprocess.run(
        [MIDAS_RECON, "recheck", payer[0], "--zone-id", payer[1], "--wait"],
        env={**os.environ, **world.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("ok: balance ")
    assert sim.stats()["by_path"].get(GETBALANCE, 0) == 1
    bad = subprocess.run(
        [MIDAS_RECON, "recheck", "bad openid!"], env={**os.environ, **world.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "openid" in bad.stderr
    sender.close()


def _session_key_enc(url: str, openid: str) -> str | None:
    with session_scope(url) as session:
        return session.scalar(select(Account.session_key_enc).where(Account.openid == openid))


def _cursor(url: str) -> int | None:
    with session_scope(url) as session:
        return session.execute(
            text("SELECT value FROM cursors WHERE name = :n"), {"n": rechecks.LEDGER_CURSOR}
        ).scalar_one_or_none()


def test_a_recheck_is_served_ahead_of_a_deep_nightly_backlog(
    db_url: str, redis_url: str, sim: Simulator, procs: Procs
) -> None:
    env = world_env(db_url, redis_url, sim.base_url, MIDAS_RATE_LIMIT="60")
    world = plant(sim, env, 1000, paying=0, in_flight=0, mismatched=0)
    settings = world.settings
    # A backlog the pump would never build: the whole night queued at once, 25 batches.
    with session_scope(world.url) as session:
        started = start_nightly(session, settings, trigger="test")
        planned = pump(session, started.run_id, room=lambda _kind: 100, size=40)
    sender = make_app(settings)
    client = redis.Redis.from_url(redis_url)
    for batch in planned.batches:
        _send_batch(sender, client, batch)
    assert client.llen("nightly") == len(planned.batches) == 25

    procs.configure(world.env)
    procs.worker("w1")
    wait_for(lambda: done_items(world.url, started.run_id) > 0, 30, "the night to start")
    target = world.ordinary()[0]
    sent = time.monotonic()
    sender.send_task("midas_recon.recheck", kwargs={"openid": target[0], "zone_id": target[1]})
    wait_for(
        lambda: any(r.status == "complete" for r in recheck_runs(world.url, target)),
        30,
        "the recheck",
        every=0.1,
    )
    latency = time.monotonic() - sent
    waiting = client.llen("nightly")
    left = world.planned - done_items(world.url, started.run_id)
    print(f"\nrecheck served in {latency:.1f} s with {waiting} batches still queued, {left} to go")
    assert waiting >= 5 and left > 200, "the backlog was gone before the recheck was served"
    assert latency < rechecks.RECHECK_DELAY_S + 3
    client.close()
    sender.close()


def _send_batch(sender, client: redis.Redis, batch: Batch) -> None:  # type: ignore[no-untyped-def]
    client.set(claim_key(batch.run_id, batch.claim), "1", px=QUEUED_CLAIM_TTL_MS)
    sender.send_task(
        "midas_recon.fetch_batch",
        args=(batch.run_id, batch.account_ids, batch.claim_token),
        queue="nightly",
    )


# -- services without workers -------------------------------------------------------------------


def _ledger_row(bill_no: str, openid: str) -> dict[str, object]:
    return {
        "bill_no": bill_no,
        "openid": openid,
        "zone_id": "1",
        "kind": "save",
        "amount": 60,
        "occurred_at": dt.datetime.now(dt.UTC),
    }


def test_the_ledger_scan_finds_rows_committed_out_of_id_order(db_url: str) -> None:
    insert = LedgerEntry.__table__.insert()
    engine = create_engine(db_url)
    with session_scope(db_url) as session:
        first = rechecks.scan_ledger(session, None)
    assert first.accounts == [] and first.state.high == 0

    slow = engine.connect()
    slow_tx = slow.begin()
    slow.execute(insert, _ledger_row("B-slow", "slowpayer"))  # takes id 1, commits last
    with engine.begin() as fast:
        fast.execute(insert, _ledger_row("B-fast", "fastpayer"))  # id 2, visible first
    with session_scope(db_url) as session:
        second = rechecks.scan_ledger(session, first.state)
    assert second.accounts == [("fastpayer", "1")]
    assert second.state.high == 2 and [g[:2] for g in second.state.gaps] == [(1, 1)]
    assert _cursor(db_url) == 0  # the low-water mark waits below the gap

    slow_tx.commit()
    slow.close()
    with session_scope(db_url) as session:
        third = rechecks.scan_ledger(session, second.state)
    assert third.accounts == [("slowpayer", "1")]
    assert third.state.gaps == [] and _cursor(db_url) == 2

    with session_scope(db_url) as session:
        fourth = rechecks.scan_ledger(session, third.state)
    assert fourth.accounts == []  # nothing is reported twice

    # A gap nobody fills (a rolled-back insert) is given up after the grace period.
    with engine.begin() as conn:
        conn.execute(text("SELECT nextval(pg_get_serial_sequence('ledger_entries', 'id'))"))
        conn.execute(insert, _ledger_row("B-4", "later"))
    with session_scope(db_url) as session:
        fifth = rechecks.scan_ledger(session, fourth.state)
    assert fifth.accounts == [("later", "1")] and [g[:2] for g in fifth.state.gaps] == [(3, 3)]
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=rechecks.LEDGER_GAP_GRACE_S + 1)
    with session_scope(db_url) as session:
        sixth = rechecks.scan_ledger(session, fifth.state, now=later)
    assert sixth.state.gaps == [] and _cursor(db_url) == 4
    engine.dispose()


def test_recheck_arguments_are_validated() -> None:
    ok = rechecks.validate_recheck("oABC_123", "2", None, "B-1")
    assert (ok.openid, ok.zone_id, ok.trigger, ok.bill_no) == ("oABC_123", "2", "payment", "B-1")
    assert rechecks.validate_recheck("oABC", "1").trigger == "recheck"
    for args in (
        ("", "1", None, None),
        ("o 1", "1", None, None),
        ("oABC", 1, None, None),
        ("oABC", "1", "Drop Table", None),
        ("oABC", "1", None, "bill no"),
    ):
        with pytest.raises(rechecks.RecheckRejected):
            rechecks.validate_recheck(*args)


def test_the_debounce_lets_one_recheck_per_window(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert rechecks.first_of_burst(client, "oA", "1")
    assert not any(rechecks.first_of_burst(client, "oA", "1") for _ in range(19))
    assert rechecks.first_of_burst(client, "oA", "2")  # another zone, another account
    ttl = client.pttl(rechecks.debounce_key("oA", "1"))
    assert 0 < ttl <= rechecks.RECHECK_DELAY_S * 1000
    client.close()


def test_confirm_pass_takes_due_cases_once(db_url: str, sim: Simulator) -> None:
    world: World = plant(sim, world_env(db_url, None, sim.base_url), 10, mismatched=0,
                         in_flight=0, expired=0, no_session=0, inactive=0, paying=0)  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    with session_scope(world.url) as session:
        for i, (openid, zone) in enumerate(world.players[:3]):
            session.add(
                MismatchCase(
                    openid=openid, zone_id=zone, check="balance", status="suspected",
                    midas_value=1, ledger_value=0, delta=1, first_seen_at=now,
                    last_seen_at=now, confirm_due_at=now + dt.timedelta(seconds=60 * (i - 1)),
                )
            )  # fmt: skip
    with session_scope(world.url) as session:
        batches = rechecks.plan_confirm_pass(session, world.settings, size=50, now=now)
    assert len(batches) == 1 and len(batches[0].account_ids) == 2  # the third is not due
    with session_scope(world.url) as session:
        again = rechecks.plan_confirm_pass(session, world.settings, size=50, now=now)
        runs = session.scalar(select(func.count()).select_from(Run).where(Run.kind == "confirm"))
    assert again == [] and runs == 1  # in flight in the first confirm run: not planned twice


def test_a_recheck_whose_planning_failed_is_planned_by_its_retry(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The debounce key was set before the plan was committed: a database error, then
    Celery's retry inside the window found the key, logged recheck_debounced, and the recheck
    was gone."""
    from sqlalchemy.exc import OperationalError

    from worker import dispatch, tasks
    from worker.config import get_settings

    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    get_settings.cache_clear()
    monkeypatch.setattr(dispatch, "_runtime", None)
    real = rechecks.plan_recheck
    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, Exception("the server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rechecks, "plan_recheck", flaky)
    with pytest.raises(OperationalError):
        tasks.recheck.run("oLost", "1", "payment")
    tasks.recheck.run("oLost", "1", "payment")  # the retry, well inside the debounce window
    assert len(calls) == 2
    with session_scope(db_url) as session:
        kinds = list(session.scalars(select(Run.trigger).where(Run.kind == "recheck")))
    assert kinds == ["payment"]
    # And the burst is debounced again from the planned fetch on.
    tasks.recheck.run("oLost", "1", "payment")
    assert len(calls) == 2
