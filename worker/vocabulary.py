"""The words stored in the status, state and kind columns, one StrEnum each.

A member equals its string ("nightly" == RunKind.NIGHTLY), so the values in the database, in
JSON and on the command line stay what they were; the CHECK constraints of worker.db.models
are generated from these. A leaf: it imports nothing of the project.
"""

from __future__ import annotations

from enum import StrEnum


class RunKind(StrEnum):
    NIGHTLY = "nightly"
    RECHECK = "recheck"  # after a payment, the ledger scan, an operator or a late ledger file
    CONFIRM = "confirm"  # the confirming re-fetch of suspected cases


class RunStatus(StrEnum):
    PLANNING = "planning"  # a nightly waiting for the night before it to finish
    RUNNING = "running"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"  # finished with accounts in error or deferred
    FAILED = "failed"  # stopped: every further call would fail too; resumable


class ItemState(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"  # held by one batch message (its claim token)
    DONE = "done"


class ItemOutcome(StrEnum):
    """A done item's outcome: its snapshot's status, or deferred without a fetch."""

    OK = "ok"
    UNOBSERVABLE = "unobservable"
    ERROR = "error"
    DEFERRED = "deferred"  # not fetched: capacity, the run's deadline, or a later night


class SnapshotStatus(StrEnum):
    OK = "ok"
    UNOBSERVABLE = "unobservable"  # Midas cannot answer for this account (no or stale key)
    ERROR = "error"


class CaseStatus(StrEnum):
    SUSPECTED = "suspected"
    CONFIRMED = "confirmed"
    CLEARED = "cleared"
    RESOLVED = "resolved"
    ACKNOWLEDGED = "acknowledged"


class LedgerKind(StrEnum):
    SAVE = "save"
    COST = "cost"
    CANCEL = "cancel"
    PRESENT = "present"


class DeliveryStatus(StrEnum):
    """An alert's delivery to one webhook."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


def values(*members: StrEnum) -> tuple[str, ...]:
    """Members as plain strings, in order: what click choices, templates and CHECK constraints
    take (click shows an Enum by its member *name*)."""
    return tuple(m.value for m in members)


RUN_KINDS = values(*RunKind)
RUN_STATUSES = values(*RunStatus)
ITEM_STATES = values(*ItemState)
SNAPSHOT_STATUSES = values(*SnapshotStatus)
CASE_STATUSES = values(*CaseStatus)
LEDGER_KINDS = values(*LedgerKind)
DELIVERY_STATUSES = values(*DeliveryStatus)
# A case that is open: a later difference of the same check updates it, not a new one.
OPEN_CASE_STATUSES = values(CaseStatus.SUSPECTED, CaseStatus.CONFIRMED, CaseStatus.ACKNOWLEDGED)
# Final: a later difference opens a new case.
CLOSED_CASE_STATUSES = values(CaseStatus.CLEARED, CaseStatus.RESOLVED)
