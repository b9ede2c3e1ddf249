"""The mismatch lifecycle (PRODUCT.md §5): snapshots open, confirm, clear and resolve cases;
operators acknowledge and resolve them with a note. Every transition is an event row.

    (new difference) ─► suspected ─┬─ agrees ───────────────────────────► cleared
                                   ├─ differs at/after confirm_due_at ──► confirmed
                                   └─ operator ack ─────────────────────► acknowledged
    confirmed / acknowledged ── agrees ──► resolved (system)
    any open ── operator resolve ──► resolved

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

from worker.db import cases as repo
from worker.db.ledger_totals import AccountAt, ledger_sums
from worker.db.models import OPEN_CASE_STATUSES, BalanceSnapshot, MismatchCase
from worker.metrics import CASE_TRANSITIONS
from worker.midas.types import COUNTER_FIELDS
from worker.recon.rules import Check, Difference, evaluate
from worker.text import strip_controls

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
    actor: str = SYSTEM,
) -> ReconcileResult:
    """Compare a batch of snapshots with the ledger and move their accounts' cases.

    Three queries for the whole batch (snapshots, ledger totals, open cases, the last one
    locking), then one INSERT per new case and the updates. Runs in the caller's transaction.
    """
    if len({c.name for c in checks}) != len(checks):
        raise ValueError("two checks share a name; a case is keyed by its check's name")
    ids = list(dict.fromkeys(snapshot_ids))
    snapshots = repo.current_ok_snapshots(session, ids)
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
            _advance(session, case, snap, diff, now=now, actor=actor, result=result, due=due)

    result.confirm_due = sorted(
        ((openid, zone_id, at) for (openid, zone_id), at in due.items()),
        key=lambda d: (d[2], d[0], d[1]),
    )
    return result


def acknowledge(
    session: Session, case_id: int, note: str, actor: str, *, now: dt.datetime | None = None
) -> MismatchCase:
    """An operator takes note of a suspected or confirmed case (it stays open)."""
    note, who = _operator_input(note, actor)
    case = _lock(session, case_id)
    if case.status not in ("suspected", "confirmed"):
        raise TransitionRefused(
            f"case {case_id} is {case.status}; only a suspected or confirmed case can be "
            "acknowledged"
        )
    _transition(session, case, "acknowledged", at=now or _now(), actor=who, note=note)
    return case


def resolve(
    session: Session, case_id: int, note: str, actor: str, *, now: dt.datetime | None = None
) -> MismatchCase:
    """An operator closes an open case (e.g. the ledger or Midas was corrected by hand)."""
    note, who = _operator_input(note, actor)
    case = _lock(session, case_id)
    if case.status not in OPEN_CASE_STATUSES:
        raise TransitionRefused(f"case {case_id} is already {case.status}; it cannot be resolved")
    _transition(session, case, "resolved", at=now or _now(), actor=who, note=note)
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
            status="suspected",
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
            _event(session, case, None, "suspected", at=now, actor=actor, diff=diff, snap=snap)
            return case, True
        # Lost the race: the other worker's case is committed now and is ours to advance.
        # (Were it closed again meanwhile, the next INSERT succeeds.)
        case = repo.lock_open_case(session, snap.openid, snap.zone_id, diff.check)
        if case is not None:
            return case, False
    raise RuntimeError(f"cannot open or find the open {diff.check} case of snapshot {snap.id}")


def _advance(
    session: Session,
    case: MismatchCase,
    snap: BalanceSnapshot,
    diff: Difference,
    *,
    now: dt.datetime,
    actor: str,
    result: ReconcileResult,
    due: dict[tuple[str, str], dt.datetime],
) -> None:
    """Move one open case by what an ok snapshot shows for its check."""
    if snap.fetched_at < case.last_seen_at:
        # A newer snapshot (committed by another worker after we chose ours) already spoke.
        return
    if diff.agrees:
        to = "cleared" if case.status == "suspected" else "resolved"
        _transition(session, case, to, at=now, actor=actor, diff=diff, snap=snap)
        if to == "cleared":
            result.cleared += 1
        else:
            result.resolved += 1
        return
    case.midas_value = diff.midas_value
    case.ledger_value = diff.ledger_value
    case.delta = diff.delta
    case.last_seen_at = snap.fetched_at
    if case.status != "suspected":
        return  # confirmed or acknowledged: still differing, nothing new to decide
    if case.confirm_due_at is None or snap.fetched_at >= case.confirm_due_at:
        _transition(session, case, "confirmed", at=now, actor=actor, diff=diff, snap=snap)
        result.confirmed += 1
    else:
        # Seen again inside the settle window (a recheck after a payment): not yet proof.
        _schedule(due, case)


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
