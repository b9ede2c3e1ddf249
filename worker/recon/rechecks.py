"""Rechecks after payments, the ledger scan that finds payments, and the confirm pass.

- A recheck is a run of kind `recheck` with one account. Payments come in bursts (a top-up,
  then a gift, a purchase...), so rechecks are debounced per account: the first one of a
  burst plans the fetch RECHECK_DELAY_S later, the others within that window are absorbed
  by it (their payments happened before the fetch does).
- The ledger scan turns new ledger rows into rechecks, one per account per scan.
- The confirm pass re-fetches the accounts of suspected cases once their settle window is
  over (PRODUCT.md §5): one run of kind `confirm` per pass.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.config import Settings
from worker.db import accounts as accounts_repo
from worker.db import confirm as confirm_repo
from worker.db import ledger as ledger_repo
from worker.db import ledger_scan as scan_repo
from worker.db import runs as repo
from worker.db.accounts import AccountRow, upsert_accounts
from worker.recon.batches import Batch
from worker.recon.cases import close_cases_of_removed_checks
from worker.recon.intake import check_bill_no, check_openid, check_zone_id
from worker.recon.rules import checks_from_settings
from worker.vocabulary import RunKind

log = logging.getLogger(__name__)

# The debounce window and the delay before a recheck's fetch, in one: Midas needs a moment
# to show a payment the game has just booked, and the payments of a burst (top-up, gift,
# purchase) arrive within seconds of each other; all of them land in one fetch.
RECHECK_DELAY_S = 5
# An account whose confirming re-fetch was unobservable or an error is tried again after
# this long, not on every pass (an expired session stays expired until the next login).
CONFIRM_RETRY_S = 600
# How many accounts one confirm run takes at most; the next pass takes the rest.
CONFIRM_PASS_LIMIT = 5000

LEDGER_CURSOR = "ledger_scan"
SCAN_LIMIT = 5000
# A ledger id may become visible after higher ids (its transaction committed later); a gap
# in the ids is watched this long for a late row before it is taken as a rollback.
LEDGER_GAP_GRACE_S = 300
MAX_GAPS = 1000

_TRIGGER = re.compile(r"[a-z0-9_-]{1,32}")


class RecheckRejected(ValueError):
    """The recheck's arguments are malformed; retrying cannot help."""


@dataclass(frozen=True, slots=True)
class RecheckRequest:
    openid: str
    zone_id: str
    trigger: str  # runs.trigger: the reason when it is a short name, else "recheck"
    bill_no: str | None


def validate_recheck(
    openid: object, zone_id: object = "1", reason: object = None, bill_no: object = None
) -> RecheckRequest:
    """Task arguments come from the game: check every one (RecheckRejected says which)."""
    try:
        oid, zid = check_openid(openid), check_zone_id(zone_id)
        bill = None if bill_no is None else check_bill_no(bill_no)
    except ValueError as exc:
        raise RecheckRejected(str(exc)) from None
    if reason is None:
        trigger = "payment" if bill is not None else "recheck"
    elif isinstance(reason, str) and _TRIGGER.fullmatch(reason):
        trigger = reason
    else:
        raise RecheckRejected("reason must be a short name (a-z, 0-9, _ or -, up to 32)")
    return RecheckRequest(oid, zid, trigger, bill)


class SetNX(Protocol):
    """The Redis calls the debounce needs (redis.Redis satisfies it)."""

    def set(self, name: str, value: str, *, nx: bool = ..., px: int | None = ...) -> object: ...

    def delete(self, *names: str) -> object: ...


def debounce_key(openid: str, zone_id: str) -> str:
    # openid and zone_id are validated identifiers without ':'; the key is unambiguous.
    return f"midas_recon:recheck:{zone_id}:{openid}"


def first_of_burst(redis: SetNX, openid: str, zone_id: str) -> bool:
    """True for the first recheck of an account within RECHECK_DELAY_S (it plans the fetch).

    The key lives exactly as long as the delay: the fetch runs after it expired, so every
    payment it absorbed happened before the fetch, and the next payment starts a new burst.
    """
    return bool(redis.set(debounce_key(openid, zone_id), "1", nx=True, px=RECHECK_DELAY_S * 1000))


def forget_burst(redis: SetNX, openid: str, zone_id: str) -> None:
    """Drop the burst's key after its fetch could not be planned: the key stands for a planned
    fetch, and without one the retry (or the next payment) must plan it, not be absorbed."""
    redis.delete(debounce_key(openid, zone_id))


def plan_recheck(
    session: Session,
    settings: Settings,
    request: RecheckRequest,
    *,
    enroll: bool = True,
    now: dt.datetime | None = None,
) -> Batch:
    """A one-account recheck run, its item already claimed for the batch that fetches it.

    A payment can come before the account's first login reaches us: the account is then
    created (activity unknown), which also puts it into the next nightly runs. An operator's
    recheck (`enroll=False`) of an account nobody has named is refused (RecheckRejected):
    a mistyped openid must not become a player.
    """
    now = now or clock.utcnow()
    account = accounts_repo.account_id(session, request.openid, request.zone_id)
    if account is None and not enroll:
        raise RecheckRejected(
            f"no account {request.openid} in zone {request.zone_id}; check the openid and "
            "zone, or pass --enroll to add it"
        )
    if account is None:
        upsert_accounts(session, [AccountRow(request.openid, request.zone_id)], now=now)
        account = accounts_repo.account_id(session, request.openid, request.zone_id)
        assert account is not None
    run_id = repo.insert_run(
        session,
        kind=RunKind.RECHECK,
        business_date=settings.calendar.today(now),
        trigger=request.trigger,
        api_version=settings.MIDAS_API_VERSION,
        now=now,
    )
    repo.plan_accounts(session, run_id, [account])
    repo.mark_running(session, run_id, planned=1, now=now)
    claimed = repo.claim_pending(session, run_id, limit=1, claim=now)
    log.info(
        "recheck_planned",
        extra={"run_id": run_id, "account_id": account, "trigger": request.trigger},
    )
    return Batch(run_id, claimed, now)


def plan_late_ledger_rechecks(
    session: Session,
    settings: Settings,
    *,
    after_id: int,
    size: int,
    trigger: str = "ledger-import",
    now: dt.datetime | None = None,
) -> list[Batch]:
    """One recheck run for the accounts a late ledger file made stale, claimed in batches
    (none when every new row is later than the account's last comparison).

    Rows newer than ledger id `after_id` that are dated before an ok snapshot of their
    account were missing when that snapshot was compared: its cases (perhaps confirmed) may
    be wrong now. Fetching those accounts again compares them with the whole ledger, which
    resolves or confirms their cases the usual way. Rows dated after every fetch need
    nothing: the next fetch sees them.
    """
    now = now or clock.utcnow()
    accounts = ledger_repo.accounts_compared_without(session, after_id)
    return _claimed_run(session, settings, RunKind.RECHECK, trigger, accounts, size=size, now=now)


def plan_confirm_pass(
    session: Session,
    settings: Settings,
    *,
    size: int,
    now: dt.datetime | None = None,
) -> list[Batch]:
    """One confirm run for every account due for its confirming re-fetch, claimed in batches
    (none when nothing is due)."""
    now = now or clock.utcnow()
    confirm_repo.serialize_confirm_planning(session)
    # Cases nobody can decide any more cost no request: closed before the due ones are taken.
    close_cases_of_removed_checks(session, checks_from_settings(settings), now=now)
    accounts = confirm_repo.due_confirm_accounts(
        session,
        now=now,
        retry_after=now - dt.timedelta(seconds=CONFIRM_RETRY_S),
        limit=CONFIRM_PASS_LIMIT,
    )
    return _claimed_run(
        session, settings, RunKind.CONFIRM, "confirm-pass", accounts, size=size, now=now
    )


def _claimed_run(
    session: Session,
    settings: Settings,
    kind: str,
    trigger: str,
    accounts: list[int],
    *,
    size: int,
    now: dt.datetime,
) -> list[Batch]:
    """A running run of `kind` over `accounts`, all claimed in batches of `size` (none for no
    accounts): the fast lane's planners hand these straight to fetch batches."""
    if not accounts:
        return []
    run_id = repo.insert_run(
        session,
        kind=kind,
        business_date=settings.calendar.today(now),
        trigger=trigger,
        api_version=settings.MIDAS_API_VERSION,
        now=now,
    )
    repo.plan_accounts(session, run_id, accounts)
    repo.mark_running(session, run_id, planned=len(accounts), now=now)
    batches = []
    while ids := repo.claim_pending(session, run_id, limit=size, claim=now):
        batches.append(Batch(run_id, ids, now))
    log.info("run_planned", extra={"run_id": run_id, "planned": len(accounts), "kind": kind})
    return batches


def last_confirm_due(session: Session, *, until: dt.datetime) -> dt.datetime | None:
    return confirm_repo.last_confirm_due(session, until=until)


# -- the ledger scan ----------------------------------------------------------------------------


@dataclass
class ScanState:
    """Where the scan is: every id <= `high` was read, except inside `gaps`.

    Gaps are id ranges [lo, hi] not visible when they were passed, kept with the time they
    were first seen (unix seconds): a transaction that took the id may still commit.
    """

    high: int
    gaps: list[tuple[int, int, float]] = field(default_factory=list)

    def dumps(self) -> str:
        return json.dumps({"high": self.high, "gaps": self.gaps})

    @classmethod
    def loads(cls, raw: str | bytes) -> ScanState:
        data = json.loads(raw)
        return cls(int(data["high"]), [(int(a), int(b), float(t)) for a, b, t in data["gaps"]])


@dataclass
class ScanResult:
    accounts: list[tuple[str, str]]  # distinct (openid, zone_id) with new ledger rows
    state: ScanState  # save it after the commit
    rows: int = 0
    busy: bool = False  # another scan holds the cursor


def scan_ledger(
    session: Session,
    state: ScanState | None,
    *,
    now: dt.datetime | None = None,
    limit: int = SCAN_LIMIT,
    grace_s: float = LEDGER_GAP_GRACE_S,
) -> ScanResult:
    """New ledger rows since the last scan, as accounts to recheck.

    Ids are handed out when a row is inserted but become visible when its transaction
    commits, so a lower id can appear after a higher one was read. A plain "id > last seen"
    cursor would skip it; a re-read overlap would recheck rows twice. Instead the scan keeps
    the ids it passed without seeing (gaps) for `grace_s` and reads them again each time.

    The durable cursor (table `cursors`) is the low-water mark: every id at or below it has
    been read or given up on. `state` (kept in Redis) adds the high-water mark and the gaps;
    when it is lost the scan restarts from the low-water mark and may recheck some accounts
    twice, which the debounce and a spare fetch absorb.
    """
    now = now or clock.utcnow()
    # The first scan ever starts at the ledger's end: history is the nightly run's job.
    low = scan_repo.lock_cursor(
        session, LEDGER_CURSOR, initial=scan_repo.max_ledger_id(session), now=now
    )
    if low is None:
        return ScanResult([], state or ScanState(0), busy=True)
    if state is None or state.high < low:
        state = ScanState(low)
    rows = scan_repo.ledger_rows_after(
        session, high=state.high, gaps=[(a, b) for a, b, _ in state.gaps], limit=limit
    )
    seen = [i for i, _, _ in rows]
    above = [i for i in seen if i > state.high]
    # With the limit reached, ids beyond the last row read are simply not read yet.
    high = above[-1] if above else state.high
    gaps = _remaining_gaps(state, seen, high, now.timestamp())
    fresh = now.timestamp() - grace_s
    gaps = [g for g in gaps if g[2] >= fresh][-MAX_GAPS:]
    low_water = min(g[0] for g in gaps) - 1 if gaps else high
    if low_water != low:
        scan_repo.set_cursor(session, LEDGER_CURSOR, low_water, now=now)
    accounts = list(dict.fromkeys((openid, zone_id) for _, openid, zone_id in rows))
    if accounts:
        log.info("ledger_scanned", extra={"rows": len(rows), "accounts": len(accounts)})
    return ScanResult(accounts, ScanState(high, gaps), rows=len(rows))


def _remaining_gaps(
    state: ScanState, seen: list[int], high: int, now_ts: float
) -> list[tuple[int, int, float]]:
    """Old gaps minus the ids now seen, plus the new holes between state.high and high."""
    ordered = sorted(seen)
    out: list[tuple[int, int, float]] = []
    for lo, hi, since in state.gaps:
        start = lo
        for i in ordered[bisect_left(ordered, lo) : bisect_right(ordered, hi)]:
            if i > start:
                out.append((start, i - 1, since))
            start = i + 1
        if start <= hi:
            out.append((start, hi, since))
    previous = state.high
    for i in ordered[bisect_right(ordered, state.high) : bisect_right(ordered, high)]:
        if i > previous + 1:
            out.append((previous + 1, i - 1, now_ts))
        previous = i
    return sorted(out)
