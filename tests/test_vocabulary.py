"""The status, state and kind columns accept exactly their StrEnum's words (worker.vocabulary),
and a member is its string wherever it goes: SQL, JSON, f-strings."""

from __future__ import annotations

import json
import re
from enum import StrEnum

import pytest
from sqlalchemy import CheckConstraint, Table

from worker.db.models import (
    AlertDelivery,
    BalanceSnapshot,
    LedgerEntry,
    MismatchCase,
    Run,
    RunItem,
)
from worker.vocabulary import (
    CaseStatus,
    DeliveryStatus,
    ItemState,
    LedgerKind,
    RunKind,
    RunStatus,
    SnapshotStatus,
)

COLUMNS: list[tuple[Table, str, type[StrEnum]]] = [
    (Run.__table__, "kind", RunKind),  # type: ignore[list-item]
    (Run.__table__, "status", RunStatus),  # type: ignore[list-item]
    (RunItem.__table__, "state", ItemState),  # type: ignore[list-item]
    (BalanceSnapshot.__table__, "status", SnapshotStatus),  # type: ignore[list-item]
    (MismatchCase.__table__, "status", CaseStatus),  # type: ignore[list-item]
    (LedgerEntry.__table__, "kind", LedgerKind),  # type: ignore[list-item]
    (AlertDelivery.__table__, "status", DeliveryStatus),  # type: ignore[list-item]
]


@pytest.mark.parametrize(("table", "column", "enum"), COLUMNS, ids=lambda v: getattr(v, "name", ""))
def test_each_check_constraint_lists_its_enum(
    table: Table, column: str, enum: type[StrEnum]
) -> None:
    [check] = [
        c
        for c in table.constraints
        if isinstance(c, CheckConstraint) and str(c.sqltext).startswith(f"{column} IN (")
    ]
    assert re.findall(r"'([^']*)'", str(check.sqltext)) == [m.value for m in enum]


def test_a_member_is_its_string() -> None:
    assert RunKind.NIGHTLY == "nightly" and f"{CaseStatus.CONFIRMED}" == "confirmed"
    assert json.dumps({"status": RunStatus.COMPLETE}) == '{"status": "complete"}'
