"""Ledger import into a real database: one transaction, idempotent, conflicts refused."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, func, select

from worker.config import load_settings
from worker.db.ledger import LedgerConflict, LedgerRow, import_entries
from worker.db.models import LedgerEntry
from worker.db.session import engine_for, session_scope
from worker.recon.intake import IntakeError, read_ledger_csv

pytestmark = pytest.mark.integration

HEADER = "bill_no,openid,zone_id,kind,amount,occurred_at\n"
ROWS = (
    "B1,o1,1,save,600,2024-11-24T10:00:00+08:00\n"
    "B2,o1,1,cost,100,2024-11-24T03:00:00Z\n"
    "B3,o1,1,cancel,100,2024-11-24T03:01:00Z\n"
    "B4,o2,2,present,7,2024-11-24T04:00:00.123456+00:00\n"
)

WriteCsv = Callable[..., Path]

CAL = load_settings({}).calendar


def stored(url: str) -> list[tuple[object, ...]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(
                LedgerEntry.bill_no,
                LedgerEntry.openid,
                LedgerEntry.zone_id,
                LedgerEntry.kind,
                LedgerEntry.amount,
                LedgerEntry.occurred_at,
            ).order_by(LedgerEntry.bill_no)
        )
        return [tuple(r) for r in rows]


def import_file(url: str, path: Path, batch_size: int = 1000) -> tuple[int, int]:
    with session_scope(url) as session:
        result = import_entries(session, read_ledger_csv(path, calendar=CAL), batch_size=batch_size)
    return result.inserted, result.already_present


def test_import_stores_every_field_exactly(any_db_url: str, write_csv: WriteCsv) -> None:
    assert import_file(any_db_url, write_csv("l.csv", HEADER + ROWS)) == (4, 0)
    assert stored(any_db_url) == [
        ("B1", "o1", "1", "save", 600, dt.datetime(2024, 11, 24, 2, 0, tzinfo=dt.UTC)),
        ("B2", "o1", "1", "cost", 100, dt.datetime(2024, 11, 24, 3, 0, tzinfo=dt.UTC)),
        ("B3", "o1", "1", "cancel", 100, dt.datetime(2024, 11, 24, 3, 1, tzinfo=dt.UTC)),
        ("B4", "o2", "2", "present", 7, dt.datetime(2024, 11, 24, 4, 0, 0, 123456, dt.UTC)),
    ]


def test_reimporting_the_same_rows_is_a_no_op(any_db_url: str, write_csv: WriteCsv) -> None:
    path = write_csv("l.csv", HEADER + ROWS)
    import_file(any_db_url, path)
    before = stored(any_db_url)
    assert import_file(any_db_url, path) == (0, 4)
    # The same instants written with another offset are the same rows.
    same = write_csv("same.csv", HEADER + "B1,o1,1,save,600,2024-11-24T02:00:00Z\n")
    assert import_file(any_db_url, same) == (0, 1)
    # A file that overlaps: the new rows go in, the known ones are checked and skipped.
    more = write_csv("more.csv", HEADER + ROWS + "B5,o3,1,save,1,2024-11-24T05:00:00Z\n")
    assert import_file(any_db_url, more) == (1, 4)
    assert stored(any_db_url)[:4] == before


@pytest.mark.parametrize(
    ("line", "differs"),
    [
        ("B2,o1,1,cost,101,2024-11-24T03:00:00Z", "amount"),
        ("B2,o1,1,save,100,2024-11-24T03:00:00Z", "kind"),
        ("B2,o9,1,cost,100,2024-11-24T03:00:00Z", "openid"),
        ("B2,o1,2,cost,100,2024-11-24T03:00:00Z", "zone_id"),
        ("B2,o1,1,cost,100,2024-11-24T03:00:01Z", "occurred_at"),
        ("B2,o1,1,cost,99,2024-11-24T03:00:01Z", "amount, occurred_at"),
    ],
)
def test_a_known_bill_no_with_other_content_rejects_the_file(
    any_db_url: str, write_csv: WriteCsv, line: str, differs: str
) -> None:
    import_file(any_db_url, write_csv("l.csv", HEADER + ROWS))
    before = stored(any_db_url)
    path = write_csv("c.csv", HEADER + "B7,o1,1,save,5,2024-11-24T05:00:00Z\n" + line + "\n")
    with pytest.raises(LedgerConflict) as caught:
        import_file(any_db_url, path)
    assert str(caught.value) == (
        f"row 3: bill_no B2 is already in the ledger with a different {differs}"
    )
    assert stored(any_db_url) == before  # B7, valid on its own, was not kept either


@pytest.mark.parametrize("batch_size", [1000, 2])  # the repeat in the same batch, or a later one
def test_a_bill_no_repeated_in_the_file_with_other_content_is_an_error(
    any_db_url: str, write_csv: WriteCsv, batch_size: int
) -> None:
    path = write_csv("l.csv", HEADER + ROWS + "B1,o1,1,save,700,2024-11-24T02:00:00Z\n")
    with pytest.raises(LedgerConflict) as caught:
        import_file(any_db_url, path, batch_size=batch_size)
    assert str(caught.value) == "row 6: bill_no B1 repeats row 2 with a different amount"
    assert stored(any_db_url) == []


def test_an_identical_repeat_in_the_file_is_accepted(any_db_url: str, write_csv: WriteCsv) -> None:
    path = write_csv("l.csv", HEADER + ROWS + "B1,o1,1,save,600,2024-11-24T02:00:00Z\n")
    assert import_file(any_db_url, path, batch_size=2) == (4, 1)
    assert len(stored(any_db_url)) == 4


BAD_ROWS = [
    ("B9,o1,1,save\n", "row 6: expected 6 values, found 4"),
    ("B9,o1,1,bonus,5,2024-11-24T05:00:00Z\n", "row 6: kind 'bonus' is not one of"),
    ("B9,o1,1,save,0,2024-11-24T05:00:00Z\n", "row 6: amount is zero"),
    ("B9,o1,1,save,-3,2024-11-24T05:00:00Z\n", "row 6: amount '-3' is negative"),
    ("B9,o1,1,save,2.50,2024-11-24T05:00:00Z\n", "row 6: amount '2.50' is not a whole number"),
    ("B9,o1,1,save,5,2024-11-24T05:00:00\n", "row 6: occurred_at '2024-11-24T05:00:00' has no UTC"),
    ("B9,o1,1,save,5,2024-13-01T05:00:00Z\n", "row 6: occurred_at '2024-13-01T05:00:00Z' is not a"),
    ("B9,,1,save,5,2024-11-24T05:00:00Z\n", "row 6: openid is empty"),
]


@pytest.mark.parametrize(("line", "message"), BAD_ROWS)
def test_a_bad_row_late_in_the_file_stores_nothing(
    any_db_url: str, write_csv: WriteCsv, line: str, message: str
) -> None:
    # Batches of 2: the good rows before the bad one have reached the database by then.
    path = write_csv("l.csv", HEADER + ROWS + line)
    with pytest.raises(IntakeError) as caught:
        import_file(any_db_url, path, batch_size=2)
    assert str(caught.value).startswith(message)
    assert stored(any_db_url) == []


@contextmanager
def counting_statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(*args: object) -> None:
        seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_rows_go_in_batches_not_one_statement_per_row(any_db_url: str) -> None:
    start = dt.datetime(2024, 11, 1, tzinfo=dt.UTC)
    rows = (
        LedgerRow(f"B{i}", f"o{i % 97}", "1", "save", 1 + i % 50, start + dt.timedelta(seconds=i))
        for i in range(5000)
    )
    with counting_statements(engine_for(any_db_url)) as seen, session_scope(any_db_url) as s:
        result = import_entries(s, rows, batch_size=1000)
    assert (result.inserted, result.already_present) == (5000, 0)
    # 5 batches: an insert (in pages of at most 1000 rows) and one check each.
    assert len(seen) <= 15
    with session_scope(any_db_url) as session:
        assert session.scalar(select(func.count()).select_from(LedgerEntry)) == 5000
