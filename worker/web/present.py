"""Rows as JSON for /api/...: the same fields the command line prints, timestamps in UTC ISO
8601, coins as integers, never a secret (no session key, no hash, no credential)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from worker.db.models import BalanceSnapshot, LedgerEntry, MismatchCase, MismatchEvent, Run
from worker.db.snapshots import VALUE_FIELDS
from worker.fields import CASE_FIELDS, RUN_FIELDS
from worker.recon.console import AccountHistory, CasePage
from worker.recon.runs import RunProgress
from worker.vocabulary import RunStatus

EVENT_FIELDS = (
    "at",
    "actor",
    "from_status",
    "to_status",
    "midas_value",
    "ledger_value",
    "snapshot_id",
    "run_id",
    "note",
)
SNAPSHOT_FIELDS = ("id", "run_id", "fetched_at", "status", "errcode", "errmsg", *VALUE_FIELDS)
LEDGER_FIELDS = ("bill_no", "kind", "amount", "occurred_at")


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def pick(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: jsonable(getattr(row, name)) for name in names}


def case(c: MismatchCase, events: list[MismatchEvent] | None = None) -> dict[str, Any]:
    out = pick(c, CASE_FIELDS)
    out["opened_run_id"] = c.opened_run_id
    if events is not None:
        out["events"] = [pick(e, EVENT_FIELDS) for e in events]
    return out


def case_page(page: CasePage) -> dict[str, Any]:
    return {
        "total": page.total,
        "page": page.page,
        "per_page": page.per_page,
        "pages": page.pages,
        "cases": [case(c) for c in page.cases],
    }


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A run's progress as the console shows it: the CLI's progress line, as numbers."""

    planned: int
    done: int
    ok: int
    unobservable: int
    error: int
    rate_per_s: float | None  # done per second since the run started, while it runs
    eta_s: float | None

    @classmethod
    def of(cls, run: Run, p: RunProgress, now: dt.datetime) -> Progress:
        rate = eta = None
        if run.status == RunStatus.RUNNING and run.started_at is not None:
            elapsed = (now - run.started_at).total_seconds()
            rate = p.done / elapsed if elapsed > 0 else None
            left = max(0, p.planned - p.done)
            eta = left / rate if rate else None
        return cls(p.planned, p.done, p.ok, p.unobservable, p.error, rate, eta)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.planned if self.planned else 0.0


def run(r: Run, progress: Progress | None = None) -> dict[str, Any]:
    out = pick(r, RUN_FIELDS)
    if progress is not None:
        out["progress"] = dataclasses.asdict(progress)
    return out


def snapshot(s: BalanceSnapshot) -> dict[str, Any]:
    return pick(s, SNAPSHOT_FIELDS)


def ledger_entry(e: LedgerEntry) -> dict[str, Any]:
    return pick(e, LEDGER_FIELDS)


def history(h: AccountHistory) -> dict[str, Any]:
    return {
        "openid": h.openid,
        "zone_id": h.zone_id,
        "login": jsonable(dataclasses.asdict(h.login)),
        "checks": h.check_names,
        "truncated": h.truncated,
        "fetches": [
            {
                **snapshot(f.snapshot),
                "ledger_sums": f.ledger_sums,
                "checks": [
                    {
                        "check": p.check,
                        "midas_value": p.midas_value,
                        "ledger_value": p.ledger_value,
                        "delta": p.delta,
                    }
                    for p in f.checks
                ],
                "ledger_entries": [ledger_entry(e) for e in f.entries],
            }
            for f in h.fetches
        ],
        "unseen_ledger_entries": [ledger_entry(e) for e in h.unseen_entries],
        "cases": [case(c, events) for c, events in h.cases],
    }
