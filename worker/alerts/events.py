"""The events worth a message, and their words. Pure: rows in, `Alert` out (no I/O).

An alert's `key` is its identity: the same event seen twice (a periodic check and a hook, two
workers) has the same key, and Postgres keeps one (worker.db.alerts).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from worker import business_calendar as clock
from worker.vocabulary import RunKind, RunStatus


class AlertKind(StrEnum):
    RUN_FAILED = "run_failed"
    RUN_STOPPED = "run_stopped"  # failed on 90011/45009/90017: needs a person, not a retry
    RUN_INCOMPLETE = "run_incomplete"
    CASES_CONFIRMED = "cases_confirmed"
    NIGHTLY_LATE = "nightly_late"
    PAUSE_STORM = "pause_storm"
    TEST = "test"


class Severity(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


# Midas answers that stop a run (PRODUCT.md §6) and what an operator does about each.
STOP_CODES: dict[int, str] = {
    90011: "the AppKey or signature is wrong: check MIDAS_APP_KEY and MIDAS_ENV",
    45009: "the daily API quota is spent: resume tomorrow or raise the quota",
    90017: "the request was refused (parameters or permissions): check MIDAS_APPID/OFFER_ID",
}
_ERRCODE = re.compile(r"errcode (-?\d+)")
# Cases named one by one in a digest; the rest are counted.
DIGEST_CASES = 5


@dataclass(frozen=True)
class Alert:
    kind: AlertKind
    key: str
    severity: Severity
    title: str
    lines: tuple[str, ...] = ()
    link: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # machine-readable, for the JSON format

    def text(self) -> str:
        """Title, lines and link as plain text (for formats without markup)."""
        body = [self.title, *self.lines]
        if self.link:
            body.append(self.link)
        return "\n".join(body)

    def dumps(self) -> str:
        return json.dumps(
            {
                "kind": self.kind.value,
                "key": self.key,
                "severity": self.severity.value,
                "title": self.title,
                "lines": list(self.lines),
                "link": self.link,
                "facts": self.facts,
            },
            ensure_ascii=False,
            sort_keys=True,
        )

    @classmethod
    def loads(cls, raw: str) -> Alert:
        d = json.loads(raw)
        return cls(
            AlertKind(d["kind"]),
            d["key"],
            Severity(d["severity"]),
            d["title"],
            tuple(d["lines"]),
            d["link"],
            d["facts"],
        )


@dataclass(frozen=True)
class ClosedRun:
    """What an alert needs of a run (worker.db.alerts reads it)."""

    id: int
    kind: str
    business_date: dt.date
    status: str
    planned: int
    ok: int
    unobservable: int
    error: int
    failure_reason: str | None
    finished_at: dt.datetime | None = None


@dataclass(frozen=True)
class ConfirmedCase:
    id: int
    openid: str
    zone_id: str
    check: str
    delta: int


def stop_code(reason: str | None) -> int | None:
    """The stopping Midas errcode a failure reason names, if any."""
    m = _ERRCODE.search(reason or "")
    return int(m.group(1)) if m and int(m.group(1)) in STOP_CODES else None


def run_closed(run: ClosedRun, web_base: str | None) -> Alert | None:
    """A failed run (any kind), or an incomplete nightly; None for anything else."""
    link = f"{web_base}/runs/{run.id}" if web_base else None
    counts = {k: getattr(run, k) for k in ("planned", "ok", "unobservable", "error")}
    facts: dict[str, Any] = {
        "run_id": run.id,
        "run_kind": run.kind,
        "business_date": run.business_date.isoformat(),
        **counts,
    }
    what = f"{run.kind} run {run.id} ({run.business_date.isoformat()})"
    coverage = f"{run.ok} ok, {run.unobservable} unobservable, {run.error} errors of {run.planned}"
    if run.status == RunStatus.FAILED:
        code = stop_code(run.failure_reason)
        # A nightly is one per date: one alert each. Recheck and confirm runs come by the
        # hundred while Midas refuses (every payment makes one): one alert per kind, cause and
        # hour, or a 90011 would flood the channel.
        key = f"run:{run.id}:failed"
        if run.kind != RunKind.NIGHTLY:
            hour = (run.finished_at or clock.utcnow()).astimezone(dt.UTC)
            key = f"runs:{run.kind}:failed:{code or 'other'}:{hour:%Y-%m-%dT%H}"
        reason = run.failure_reason or "no reason recorded"
        lines = [f"Reason: {reason}", f"So far: {coverage}"]
        if code is not None:
            lines.append(f"What to do: {STOP_CODES[code]}, then `midas-recon run --date D`.")
            return Alert(
                AlertKind.RUN_STOPPED,
                key,
                Severity.CRITICAL,
                f"Midas errcode {code} stopped the {what}",
                tuple(lines),
                link,
                {**facts, "errcode": code, "reason": reason},
            )
        lines.append("What to do: fix the cause, then `midas-recon run --date D` resumes it.")
        return Alert(
            AlertKind.RUN_FAILED,
            key,
            Severity.CRITICAL,
            f"The {what} failed",
            tuple(lines),
            link,
            {**facts, "reason": reason},
        )
    if run.status == RunStatus.INCOMPLETE and run.kind == RunKind.NIGHTLY:
        return Alert(
            AlertKind.RUN_INCOMPLETE,
            f"run:{run.id}:incomplete",
            Severity.WARNING,
            f"The {what} is incomplete: {run.error} accounts could not be fetched",
            (f"Coverage: {coverage}", "Errored accounts are retried by tomorrow's run."),
            link,
            facts,
        )
    return None


def cases_confirmed(
    run_id: int, cases: Sequence[ConfirmedCase], web_base: str | None
) -> Alert | None:
    """One digest for the cases a run confirmed: the largest differences first."""
    if not cases:
        return None
    biggest = sorted(cases, key=lambda c: (-abs(c.delta), c.id))[:DIGEST_CASES]
    lines = [
        f"#{c.id} {c.openid} zone {c.zone_id} {c.check}: Midas - ledger = {c.delta:+d} coins"
        + (f" {account_page(web_base, c)}" if web_base else "")
        for c in biggest
    ]
    if len(cases) > len(biggest):
        lines.append(f"... and {len(cases) - len(biggest)} more")
    total = sum(c.delta for c in cases)
    return Alert(
        AlertKind.CASES_CONFIRMED,
        f"confirmed:run:{run_id}",
        Severity.WARNING,
        f"{len(cases)} coin mismatch case(s) confirmed (net {total:+d} coins)",
        tuple(lines),
        f"{web_base}/cases" if web_base else None,
        {
            "run_id": run_id,
            "confirmed": len(cases),
            "net_delta": total,
            "cases": [{"id": c.id, "check": c.check, "delta": c.delta} for c in biggest],
        },
    )


def account_page(web_base: str, case: ConfirmedCase) -> str:
    """The console's page of the case's account (PRODUCT.md §12: /accounts/<openid>?zone_id=Z),
    which lists its cases."""
    return f"{web_base}/accounts/{quote(case.openid, safe='')}?zone_id={quote(case.zone_id)}"


def nightly_late(day: dt.date, deadline: dt.datetime, status: str | None) -> Alert:
    """The nightly of `day` was not complete at its deadline (`status` None: never started)."""
    state = "never started" if status is None else f"is {status}"
    return Alert(
        AlertKind.NIGHTLY_LATE,
        f"nightly_late:{day.isoformat()}",
        Severity.CRITICAL,
        f"The nightly run of {day.isoformat()} {state} at its deadline",
        (
            f"Deadline: {deadline.isoformat(timespec='minutes')} (RECON_NIGHTLY_DEADLINE)",
            "Check that beat and a worker are up (`docker compose ps`), then "
            f"`midas-recon run --date {day.isoformat()}`.",
        ),
        None,
        {"business_date": day.isoformat(), "status": status},
    )


def pause_storm(pauses: int, limit: int, hour: dt.datetime) -> Alert:
    """More than `limit` fleet pauses (45011) within the hour before `hour`'s end."""
    bucket = hour.astimezone(dt.UTC).strftime("%Y-%m-%dT%H")
    return Alert(
        AlertKind.PAUSE_STORM,
        f"pause_storm:{bucket}",
        Severity.WARNING,
        f"Midas paused the fleet {pauses} times in an hour (45011, minute quota)",
        (
            f"More than RECON_ALERT_PAUSE_STORM={limit}: MIDAS_RATE_LIMIT is above the quota "
            "Midas grants; lower it.",
        ),
        None,
        {"pauses": pauses, "limit": limit},
    )


def test_alert(at: dt.datetime, nonce: str) -> Alert:
    return Alert(
        AlertKind.TEST,
        f"test:{nonce}",
        Severity.INFO,
        "midas-recon test alert",
        (f"Sent by `midas-recon alerts test` at {at.isoformat(timespec='seconds')}.",),
        None,
        {"nonce": nonce},
    )
