"""Per-account ledger totals up to a moment, for a whole batch of snapshots in one query.

The batch's keys travel as a VALUES list joined to `ledger_entries`, so each account reads
only its own range of the (openid, zone_id, occurred_at) index, never the whole ledger:

    WITH k(i, openid, zone_id, fetched_at) AS (VALUES (0, 'o1', '1', '2026-11-24 …'), …)
    SELECT k.i, l.kind, SUM(l.amount) FROM k JOIN ledger_entries l
      ON l.openid = k.openid AND l.zone_id = k.zone_id AND l.occurred_at <= k.fetched_at
    GROUP BY k.i, l.kind
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Integer, Select, String, and_, column, func, select, values
from sqlalchemy.orm import Session

from worker.db.models import LedgerEntry, UTCDateTime
from worker.vocabulary import LEDGER_KINDS

# Three bind parameters a key: far below Postgres' 65535 and SQLite's 32766 per statement.
CHUNK = 2000


class AccountAt(NamedTuple):
    """An account at a moment: the ledger is summed over entries up to `at` inclusive."""

    openid: str
    zone_id: str
    at: dt.datetime


def ledger_sums(session: Session, keys: Sequence[AccountAt]) -> dict[AccountAt, dict[str, int]]:
    """Σ amount per ledger kind for each key; every key and every kind is present (0 = none).

    No ledger rows is a real zero: the game's own books say nothing moved.
    """
    unique = list(dict.fromkeys(keys))
    out = {key: dict.fromkeys(LEDGER_KINDS, 0) for key in unique}
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        for i, kind, total in session.execute(_sums_query(chunk)):
            out[chunk[i]][kind] = int(total)  # Postgres' SUM(bigint) is NUMERIC: exact
    return out


def _keys(chunk: Sequence[AccountAt]) -> Any:
    # `fetched_at` is bound with the column's own type so SQLite compares its stored UTC text
    # like with like; the row number `i` maps results back without round-tripping timestamps.
    return (
        values(
            column("i", Integer),
            column("openid", String),
            column("zone_id", String),
            column("fetched_at", UTCDateTime()),
            name="k",
        )
        .data([(i, key.openid, key.zone_id, key.at) for i, key in enumerate(chunk)])
        .cte("k")
    )


def _sums_query(chunk: Sequence[AccountAt]) -> Select[tuple[int, str, Any]]:
    k = _keys(chunk)
    ledger = LedgerEntry
    return (
        select(k.c.i, ledger.kind, func.sum(ledger.amount))
        .select_from(k)
        .join(
            ledger,
            and_(
                ledger.openid == k.c.openid,
                ledger.zone_id == k.c.zone_id,
                ledger.occurred_at <= k.c.fetched_at,
            ),
        )
        .group_by(k.c.i, ledger.kind)
    )


def accounts_with_entries_after(
    session: Session, keys: Sequence[AccountAt]
) -> set[tuple[str, str]]:
    """The (openid, zone_id) of the keys whose account has a ledger entry dated after `at`."""
    led = LedgerEntry
    out: set[tuple[str, str]] = set()
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        k = _keys(chunk)
        query = (
            select(k.c.openid, k.c.zone_id)
            .where(
                select(led.id)
                .where(
                    led.openid == k.c.openid,
                    led.zone_id == k.c.zone_id,
                    led.occurred_at > k.c.fetched_at,
                )
                .exists()
            )
            .distinct()
        )
        out.update((str(o), str(z)) for o, z in session.execute(query))
    return out
