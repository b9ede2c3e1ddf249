"""The mismatch lifecycle (PRODUCT.md §5): snapshots open, confirm, clear and resolve cases;
operators acknowledge and resolve them with a note. Every transition is an event row.

    (new difference) ─► suspected ─┬─ agrees ───────────────────────────► cleared
                                   ├─ same difference, settled ─────────► confirmed
                                   └─ operator ack ─────────────────────► acknowledged
    confirmed / acknowledged ── agrees ──► resolved (system)
    any open ── operator resolve ──► resolved
    any open of a check no longer in RECON_CHECKS ──► resolved (system, with a note)

When is a difference confirmed? This module is the one place that decides: a suspected case
is confirmed by an `ok` snapshot fetched at or after its `confirm_due_at` that shows the same
difference (same check, same delta), while the account has no ledger row dated after
`fetched_at - skew` (a row the game's clock dated near or after the fetch may be a payment
still in flight). A different delta is a new cause: the case takes the new numbers and its
settle window starts again; so does a hold for recent ledger rows. Each restart is an event
(suspected -> suspected, with a note). A confirming re-fetch that cannot observe the account
parks the case until the account's next login.

Only `ok` snapshots move a case, and only the account's newest one: an `unobservable` or
`error` answer says nothing about the coins, and an older snapshot must not undo what a newer
one showed. cleared and resolved are final; a later difference opens a new case.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.db import cases as repo
from worker.db.ledger_totals import AccountAt, accounts_with_entries_after, ledger_sums
from worker.db.models import BalanceSnapshot, MismatchCase
from worker.metrics import CASE_TRANSITIONS
from worker.midas.types import COUNTER_FIELDS
from worker.recon.rules import Check, Difference, evaluate
from worker.text import strip_controls
from worker.vocabulary import OPEN_CASE_STATUSES, CaseStatus

SYSTEM = "system"
OPERATOR_PREFIX = "operator:"
MAX_NOTE = 2000
# mismatch_events.actor holds 64 characters, "operator:" included.
_OPERATOR_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,55}")


class CaseError(Exception):
    """An operator action that cannot be done; the message says why in one line."""


class CaseNotFound(CaseError):
    pass


class TransitionRefused(CaseError):
    """The case is not in a status the action applies to (e.g. already closed)."""


@dataclass
class ReconcileResult:
    """What one batch did; `confirm_due` lists the accounts to re-fetch and when."""

    opened: int = 0
    confirmed: int = 0
    cleared: int = 0
    resolved: int = 0
    restarted: int = 0  # suspected cases whose settle window started again
    # Snapshots not compared: not `ok`, unknown, or overtaken by a newer ok snapshot.
    skipped: int = 0
    confirm_due: list[tuple[str, str, dt.datetime]] = field(default_factory=list)


def reconcile_snapshots(
    session: Session,
    snapshot_ids: Sequence[int],
    *,
    checks: Sequence[Check],
    settle_seconds: int,
    now: dt.datetime,
    skew: dt.timedelta = dt.timedelta(0),
    actor: str = SYSTEM,
    business_date: dt.date | None = None,
) -> ReconcileResult:
    """Compare a batch of snapshots with the ledger and move their accounts' cases.

    A few queries for the whole batch (account locks, snapshots, ledger totals, open cases,
    recent ledger rows), then one INSERT per new case and the updates. Runs in the caller's
    transaction. `skew` is the tolerated clock skew (BusinessCalendar.skew). `business_date`,
    when all the snapshots are of one run's date, lets Postgres read only that month.
    """
    if len({c.name for c in checks}) != len(checks):
        raise ValueError("two checks share a name; a case is keyed by its check's name")
    ids = list(dict.fromkeys(snapshot_ids))
    # The accounts first, then which snapshot is newest (see the repository's docstring).
    repo.lock_accounts_of_snapshots(session, ids, business_date)
    snapshots = repo.current_ok_snapshots(session, ids, business_date)
    result = ReconcileResult(skipped=len(ids) - len(snapshots))
    if not snapshots:
        return result
    sums = ledger_sums(session, [_at(s) for s in snapshots])
    accounts = {(s.openid, s.zone_id) for s in snapshots}
    open_cases = {
        (c.openid, c.zone_id, c.check): c for c in repo.lock_open_cases(session, accounts)
    }
    due: dict[tuple[str, str], dt.datetime] = {}
    settle = dt.timedelta(seconds=settle_seconds)
    # Accounts whose suspected case this batch may confirm: do their ledgers hold rows the
    # game dated within the skew of the fetch (or after it)? One query for the batch.
    first_due: dict[tuple[str, str], dt.datetime] = {}
    for (openid, zone_id, _), c in open_cases.items():
        if c.status == CaseStatus.SUSPECTED and c.confirm_due_at is not None:
            key = (openid, zone_id)
            first_due[key] = min(first_due.get(key, c.confirm_due_at), c.confirm_due_at)
    deciding = [
        AccountAt(s.openid, s.zone_id, s.fetched_at - skew)
        for s in snapshots
        if (s.openid, s.zone_id) in first_due and s.fetched_at >= first_due[s.openid, s.zone_id]
    ]
    in_flight = accounts_with_entries_after(session, deciding) if deciding else set()
    step = _Step(now=now, actor=actor, settle=settle, in_flight=in_flight, result=result, due=due)

    for snap in snapshots:
        midas = {name: getattr(snap, name) for name in COUNTER_FIELDS}
        for diff in evaluate(midas, sums[_at(snap)], checks):
            case = open_cases.get((snap.openid, snap.zone_id, diff.check))
            if case is None:
                if diff.agrees:
                    continue
                case, created = _open(
                    session, snap, diff, due_at=snap.fetched_at + settle, now=now, actor=actor
                )
                if created:
                    result.opened += 1
                    _schedule(due, case)
                    continue
            _advance(session, case, snap, diff, step)

    result.confirm_due = sorted(
        ((openid, zone_id, at) for (openid, zone_id), at in due.items()),
        key=lambda d: (d[2], d[0], d[1]),
    )
    return result


def park_unobserved(
    session: Session,
    accounts: Sequence[tuple[str, str, str]],
    *,
    now: dt.datetime,
    actor: str = SYSTEM,
) -> int:
    """Park the due suspected cases of accounts a re-fetch could not observe.

    `accounts` holds (openid, zone_id, why). Such an account (an expired session) stays
    unobservable until the player logs in again; re-fetching it every pass would spend quota
    on a known answer. The case keeps its status and waits, with the reason, for the next
    login (repo: due confirm accounts); the event says so.
    """
    why = {(o, z): reason for o, z, reason in accounts}
    parked = 0
    for case in repo.lock_suspected_of(session, list(why)):
        due = case.confirm_due_at
        if due is not None and due > now:
            continue
        # Parked again after a login whose session did not work either: the new time keeps
        # it waiting for the next login; the first parking is the one worth an event.
        first = case.parked_at is None
        reason = f"unobservable at the confirming re-fetch ({why[case.openid, case.zone_id]}); "
        reason += "waiting for the player's next login"
        case.parked_at, case.parked_reason = now, reason[:500]
        if first:
            _event(
                session,
                case,
                CaseStatus.SUSPECTED,
                CaseStatus.SUSPECTED,
                at=now,
                actor=actor,
                note=reason,
            )
            parked += 1
    return parked


def close_cases_of_removed_checks(
    session: Session, checks: Sequence[Check], *, now: dt.datetime, actor: str = SYSTEM
) -> int:
    """Resolve, with a system note, the open cases of checks RECON_CHECKS no longer names.

    Nothing compares them any more, so they could never move, and a suspected one would be
    re-fetched by every confirm pass. The events keep what they showed; if the check comes
    back and the difference is still there, the next snapshot opens a new case.
    """
    closed = 0
    for case in repo.lock_open_cases_of_other_checks(session, [c.name for c in checks]):
        note = f"check {case.check!r} is no longer in RECON_CHECKS; closed without a verdict"
        note += f" (was {case.status})"
        _transition(session, case, CaseStatus.RESOLVED, at=now, actor=actor, note=note)
        closed += 1
    return closed


def acknowledge(
    session: Session, case_id: int, note: str, actor: str, *, now: dt.datetime | None = None
) -> MismatchCase:
    """An operator takes note of a suspected or confirmed case (it stays open)."""
    note, who = _operator_input(note, actor)
    case = _lock(session, case_id)
    if case.status not in (CaseStatus.SUSPECTED, CaseStatus.CONFIRMED):
        raise TransitionRefused(
            f"case {case_id} is {case.status}; only a suspected or confirmed case can be "
            "acknowledged"
        )
    _transition(
        session, case, CaseStatus.ACKNOWLEDGED, at=now or clock.utcnow(), actor=who, note=note
    )
    return case


def resolve(
    session: Session, case_id: int, note: str, actor: str, *, now: dt.datetime | None = None
) -> MismatchCase:
    """An operator closes an open case (e.g. the ledger or Midas was corrected by hand)."""
    note, who = _operator_input(note, actor)
    case = _lock(session, case_id)
    if case.status not in OPEN_CASE_STATUSES:
        raise TransitionRefused(f"case {case_id} is already {case.status}; it cannot be resolved")
    _transition(session, case, CaseStatus.RESOLVED, at=now or clock.utcnow(), actor=who, note=note)
    return case


# -- the lifecycle -------------------------------------------------------------------------


def _open(
    session: Session,
    snap: BalanceSnapshot,
    diff: Difference,
    *,
    due_at: dt.datetime,
    now: dt.datetime,
    actor: str,
) -> tuple[MismatchCase, bool]:
    """A new suspected case (True), or the open case another worker has just opened."""
    for _ in range(3):
        case = repo.insert_open_case(
            session,
            openid=snap.openid,
            zone_id=snap.zone_id,
            check=diff.check,
            status=CaseStatus.SUSPECTED,
            midas_value=diff.midas_value,
            ledger_value=diff.ledger_value,
            delta=diff.delta,
            first_seen_at=snap.fetched_at,
            last_seen_at=snap.fetched_at,
            opened_run_id=snap.run_id,
            # The re-fetch after the settle window decides: payments in flight between the
            # ledger and Midas have landed by then, so a difference still there is real.
            confirm_due_at=due_at,
        )
        if case is not None:
            _event(
                session, case, None, CaseStatus.SUSPECTED, at=now, actor=actor, diff=diff, snap=snap
            )
            return case, True
        # Lost the race: the other worker's case is committed now and is ours to advance.
        # (Were it closed again meanwhile, the next INSERT succeeds.)
        case = repo.lock_open_case(session, snap.openid, snap.zone_id, diff.check)
        if case is not None:
            return case, False
    raise RuntimeError(f"cannot open or find the open {diff.check} case of snapshot {snap.id}")


@dataclass
class _Step:
    """What every case of one batch is advanced with."""

    now: dt.datetime
    actor: str
    settle: dt.timedelta
    in_flight: set[tuple[str, str]]  # accounts with ledger rows near or after their fetch
    result: ReconcileResult
    due: dict[tuple[str, str], dt.datetime]


def _advance(
    session: Session, case: MismatchCase, snap: BalanceSnapshot, diff: Difference, step: _Step
) -> None:
    """Move one open case by what an ok snapshot shows for its check."""
    if snap.fetched_at < case.last_seen_at:
        # A newer snapshot (committed by another worker after we chose ours) already spoke.
        return
    case.parked_at = case.parked_reason = None  # observed again: no longer waiting for a login
    if diff.agrees:
        to = CaseStatus.CLEARED if case.status == CaseStatus.SUSPECTED else CaseStatus.RESOLVED
        _transition(session, case, to, at=step.now, actor=step.actor, diff=diff, snap=snap)
        if to == CaseStatus.CLEARED:
            step.result.cleared += 1
        else:
            step.result.resolved += 1
        return
    same_cause = diff.delta == case.delta
    case.midas_value = diff.midas_value
    case.ledger_value = diff.ledger_value
    case.delta = diff.delta
    case.last_seen_at = snap.fetched_at
    if case.status != CaseStatus.SUSPECTED:
        return  # confirmed or acknowledged: still differing, nothing new to decide
    restart = None
    if not same_cause:
        restart = f"the difference changed to {diff.delta:+d}: a new cause, settling again"
    elif case.confirm_due_at is not None and snap.fetched_at < case.confirm_due_at:
        # Seen again inside the settle window (a recheck after a payment): not yet proof.
        _schedule(step.due, case)
        return
    elif (snap.openid, snap.zone_id) in step.in_flight:
        restart = "ledger rows dated within the clock skew of the fetch: payments may be in flight"
    if restart is None:
        _transition(
            session, case, CaseStatus.CONFIRMED, at=step.now, actor=step.actor, diff=diff, snap=snap
        )
        step.result.confirmed += 1
        return
    case.confirm_due_at = snap.fetched_at + step.settle
    _event(
        session,
        case,
        CaseStatus.SUSPECTED,
        CaseStatus.SUSPECTED,
        at=step.now,
        actor=step.actor,
        diff=diff,
        snap=snap,
        note=restart,
    )
    step.result.restarted += 1
    _schedule(step.due, case)


def _transition(
    session: Session,
    case: MismatchCase,
    to: str,
    *,
    at: dt.datetime,
    actor: str,
    diff: Difference | None = None,
    snap: BalanceSnapshot | None = None,
    note: str | None = None,
) -> None:
    """Change a case's status and record the event; nothing is ever deleted."""
    before = case.status
    case.status = to
    _event(session, case, before, to, at=at, actor=actor, diff=diff, snap=snap, note=note)


def _event(
    session: Session,
    case: MismatchCase,
    before: str | None,
    to: str,
    *,
    at: dt.datetime,
    actor: str,
    diff: Difference | None = None,
    snap: BalanceSnapshot | None = None,
    note: str | None = None,
) -> None:
    repo.add_event(
        session,
        case_id=case.id,
        at=at,
        actor=actor,
        from_status=before,
        to_status=to,
        # The numbers seen: the snapshot's for the system, the case's last seen for a person.
        midas_value=diff.midas_value if diff else case.midas_value,
        ledger_value=diff.ledger_value if diff else case.ledger_value,
        snapshot_id=snap.id if snap else None,
        run_id=snap.run_id if snap else None,
        note=note,
    )
    # Counted before the commit: a batch that rolls back over-counts, which a rate tolerates.
    CASE_TRANSITIONS.labels(to_status=to).inc()


def _schedule(due: dict[tuple[str, str], dt.datetime], case: MismatchCase) -> None:
    # One re-fetch per account however many of its checks differ: the earliest due time.
    assert case.confirm_due_at is not None
    key = (case.openid, case.zone_id)
    due[key] = min(due.get(key, case.confirm_due_at), case.confirm_due_at)


# -- helpers ------------------------------------------------------------------------------


def _at(snap: BalanceSnapshot) -> AccountAt:
    return AccountAt(snap.openid, snap.zone_id, snap.fetched_at)


def _lock(session: Session, case_id: int) -> MismatchCase:
    case = repo.lock_case(session, case_id)
    if case is None:
        raise CaseNotFound(f"no mismatch case {case_id}")
    return case


def _operator_input(note: str, actor: str) -> tuple[str, str]:
    """The stripped note and the event's actor, or CaseError saying which is wrong."""
    note = strip_controls(note).strip()
    if not note:
        raise CaseError("a note is required: say why (e.g. the ticket or the finding)")
    if len(note) > MAX_NOTE:
        raise CaseError(f"the note is longer than {MAX_NOTE} characters")
    name = strip_controls(actor).strip().removeprefix(OPERATOR_PREFIX)
    if not _OPERATOR_NAME.fullmatch(name):
        raise CaseError("the actor must be a name of 1 to 55 characters without spaces")
    return note, OPERATOR_PREFIX + name
