"""What the operators' console and its command-line twins (`mismatches` with filters,
`account`) show: a page of cases under filters, and one account's history across runs.

One account's history is its snapshots over time, each beside the ledger's running sums at the
moment of the fetch (the same comparison the reconciliation makes, check by check), the ledger
entries between one fetch and the next, its cases with every event, and its login state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from worker.db import console as repo
from worker.db.models import BalanceSnapshot, LedgerEntry, MismatchCase, MismatchEvent
from worker.midas.types import COUNTER_FIELDS
from worker.recon.rules import Check, Difference, evaluate
from worker.vocabulary import CASE_STATUSES, LEDGER_KINDS, OPEN_CASE_STATUSES, SnapshotStatus

if TYPE_CHECKING:
    from worker.business_calendar import BusinessCalendar

# An account page covers a year of nights and a little more.
HISTORY_SNAPSHOTS = 400
MAX_PAGE_SIZE = 500


# -- cases --------------------------------------------------------------------------------------


# A status filter as operators give it: "open" (suspected, confirmed, acknowledged), "all",
# or one status.
STATUS_CHOICES = ("open", "all", *CASE_STATUSES)


def statuses_of(choice: str) -> Sequence[str] | None:
    """The case statuses a STATUS_CHOICES value stands for (None: every status)."""
    return OPEN_CASE_STATUSES if choice == "open" else None if choice == "all" else [choice]


def opened_between(
    first: dt.date | None, last: dt.date | None, calendar: BusinessCalendar
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Business dates (inclusive, in RECON_TIMEZONE) as the [from, before) instants to filter
    first_seen_at by."""
    start = None if first is None else calendar.day_bounds(first)[0]
    end = None if last is None else calendar.day_bounds(last)[1]
    return start, end


@dataclass(frozen=True, slots=True)
class CasePage:
    cases: list[MismatchCase]
    total: int  # matching cases over all pages
    page: int  # 1-based
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def find_cases(session: Session, query: repo.CaseQuery, *, page: int, per_page: int) -> CasePage:
    """One page of the matching cases and how many match in all."""
    if not 1 <= per_page <= MAX_PAGE_SIZE:
        raise ValueError(f"per_page must be 1 to {MAX_PAGE_SIZE}")
    page = max(1, page)
    paged = dataclasses.replace(query, limit=per_page, offset=(page - 1) * per_page)
    total = repo.count_cases(session, query)
    return CasePage(repo.search_cases(session, paged), total, page, per_page)


# -- one account --------------------------------------------------------------------------------


@dataclass
class Fetch:
    """One snapshot, the ledger's running sums at its moment, and the entries since the
    previous fetch of the account (the entries this fetch was the first to see)."""

    snapshot: BalanceSnapshot
    ledger_sums: dict[str, int]
    checks: list[Difference]  # both sides of every check; empty unless the snapshot is ok
    entries: list[LedgerEntry] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LoginState:
    known: bool  # the game told us about this account (accounts row)
    last_active_at: dt.datetime | None
    has_session_key: bool  # whether a session key is stored (never the key itself)
    session_key_updated_at: dt.datetime | None


@dataclass
class AccountHistory:
    openid: str
    zone_id: str
    login: LoginState
    check_names: list[str]
    fetches: list[Fetch]  # oldest first
    unseen_entries: list[LedgerEntry]  # after the newest fetch: no snapshot has seen them yet
    cases: list[tuple[MismatchCase, list[MismatchEvent]]]  # newest first
    truncated: bool  # older snapshots exist beyond the HISTORY_SNAPSHOTS shown


def account_history(
    session: Session,
    openid: str,
    zone_id: str,
    checks: Sequence[Check],
    *,
    limit: int = HISTORY_SNAPSHOTS,
) -> AccountHistory:
    """Everything the console's account page and `midas-recon account` show."""
    account = repo.get_account(session, openid, zone_id)
    login = LoginState(
        known=account is not None,
        last_active_at=account.last_active_at if account else None,
        has_session_key=bool(account and account.session_key_enc),
        session_key_updated_at=account.session_key_updated_at if account else None,
    )
    snapshots = repo.account_snapshots(session, openid, zone_id, limit=limit + 1)
    truncated = len(snapshots) > limit
    snapshots = snapshots[-limit:]

    # Running sums: the totals before the first fetch shown, then every entry after it, in
    # time order, each added as the fetches pass it (entries up to fetched_at inclusive count,
    # exactly as the reconciliation sums them).
    since = snapshots[0].fetched_at if snapshots else None
    sums = dict.fromkeys(LEDGER_KINDS, 0)
    if since is not None:
        sums.update(repo.ledger_sums_before(session, openid, zone_id, since))
    entries = repo.ledger_entries_since(session, openid, zone_id, since)
    fetches: list[Fetch] = []
    i = 0
    for snap in snapshots:
        seen: list[LedgerEntry] = []
        while i < len(entries) and entries[i].occurred_at <= snap.fetched_at:
            sums[entries[i].kind] += entries[i].amount
            seen.append(entries[i])
            i += 1
        points: list[Difference] = []
        if snap.status == SnapshotStatus.OK:
            midas = {name: getattr(snap, name) for name in COUNTER_FIELDS}
            points = evaluate(midas, sums, checks)
        fetches.append(Fetch(snap, dict(sums), points, seen))

    cases = repo.account_cases(session, openid, zone_id)
    events = repo.events_of_cases(session, [c.id for c in cases])
    return AccountHistory(
        openid=openid,
        zone_id=zone_id,
        login=login,
        check_names=[c.name for c in checks],
        fetches=fetches,
        unseen_entries=entries[i:],
        cases=[(c, events[c.id]) for c in cases],
        truncated=truncated,
    )
