"""CSV intake without a database: every bad row kind gets its row number and reason."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.config import ConfigError, load_settings
from worker.db.crypto import SessionKeyCipher
from worker.recon import intake
from worker.recon.intake import IntakeError, read_accounts_csv, read_ledger_csv

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
LEDGER_HEADER = "bill_no,openid,zone_id,kind,amount,occurred_at\n"
GOOD = "B1,o6_bmjrPTlm6_2sgVt7hMZOPfL2M,1,save,600,2026-11-24T10:00:00+08:00\n"

WriteCsv = Callable[..., Path]

CAL = load_settings({}).calendar


def ledger_rows(path: Path, **kwargs: object) -> list[intake.LedgerRow]:
    return list(read_ledger_csv(path, now=NOW, calendar=CAL, **kwargs))  # type: ignore[arg-type]


def test_ledger_rows_parse_with_spreadsheet_row_numbers(write_csv: WriteCsv) -> None:
    path = write_csv(
        "l.csv",
        LEDGER_HEADER
        + GOOD
        + "\n"  # a blank row: skipped, but counted as a spreadsheet would
        + " B2 , o2 , 7 , present , 0005 , 2026-11-24 01:02:03.250Z \n",
    )
    first, second = ledger_rows(path)
    assert (first.row, first.bill_no, first.kind, first.amount) == (2, "B1", "save", 600)
    assert first.occurred_at == dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.UTC)
    assert first.occurred_at.utcoffset() == dt.timedelta(0)
    assert (second.row, second.openid, second.zone_id, second.amount) == (4, "o2", "7", 5)
    assert second.occurred_at == dt.datetime(2026, 11, 24, 1, 2, 3, 250000, tzinfo=dt.UTC)
    assert first.repeats_row is None


def test_columns_may_come_in_any_order_and_a_bom_is_ignored(write_csv: WriteCsv) -> None:
    path = write_csv(
        "l.csv",
        "\ufeffamount,Kind,occurred_at,zone_id,openid,bill_no\n"
        "10,cost,2026-11-24T10:00:00Z,1,o1,B9\n",
    )
    (row,) = ledger_rows(path)
    assert (row.bill_no, row.kind, row.amount, row.openid) == ("B9", "cost", 10, "o1")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("B1,o1,1,save,600\n", "expected 6 values, found 5"),
        ("B1,o1,1,save,600,2026-11-24T10:00:00Z,x\n", "expected 6 values, found 7"),
        ("B1,o1,1,refund,600,2026-11-24T10:00:00Z\n", "kind 'refund' is not one of save, cost"),
        ("B1,o1,1,Save,600,2026-11-24T10:00:00Z\n", "kind 'Save' is not one of"),
        ("B1,o1,1,save,0,2026-11-24T10:00:00Z\n", "amount is zero"),
        ("B1,o1,1,save,-5,2026-11-24T10:00:00Z\n", "amount '-5' is negative"),
        ("B1,o1,1,save,+5,2026-11-24T10:00:00Z\n", "amount '+5' is not a whole number"),
        ("B1,o1,1,save,1.5,2026-11-24T10:00:00Z\n", "amount '1.5' is not a whole number"),
        ("B1,o1,1,save,1.0,2026-11-24T10:00:00Z\n", "amount '1.0' is not a whole number"),
        ("B1,o1,1,save,1e3,2026-11-24T10:00:00Z\n", "amount '1e3' is not a whole number"),
        ("B1,o1,1,save,٣,2026-11-24T10:00:00Z\n", "is not a whole number"),  # Arabic-Indic 3
        ("B1,o1,1,save,,2026-11-24T10:00:00Z\n", "amount is empty"),
        (
            "B1,o1,1,save,1000000000000001,2026-11-24T10:00:00Z\n",
            "larger than 1,000,000,000,000,000",
        ),
        ("B1,o1,1,save," + "9" * 5000 + ",2026-11-24T10:00:00Z\n", "larger than"),
        ("B1,o1,1,save,600,2026-11-24T10:00:00\n", "has no UTC offset"),
        ("B1,o1,1,save,600,2026-11-24 10:00\n", "has no UTC offset"),
        ("B1,o1,1,save,600,2026-11-24\n", "is not an ISO 8601 timestamp"),
        ("B1,o1,1,save,600,24/11/2026 10:00\n", "is not an ISO 8601 timestamp"),
        ("B1,o1,1,save,600,1732442400\n", "is not an ISO 8601 timestamp"),
        ("B1,o1,1,save,600,2026-02-30T10:00:00Z\n", "is not a valid date and time"),
        ("B1,o1,1,save,600,2026-11-24T25:00:00Z\n", "is not a valid date and time"),
        ("B1,o1,1,save,600,1999-12-31T23:59:59Z\n", "is before 2000"),
        ("B1,o1,1,save,600,2026-11-25T12:00:00Z\n", "is in the future"),
        ("B1,,1,save,600,2026-11-24T10:00:00Z\n", "openid is empty"),
        ("B1,o 1,1,save,600,2026-11-24T10:00:00Z\n", "openid 'o 1' contains characters"),
        ("B1,o1;drop,1,save,600,2026-11-24T10:00:00Z\n", "openid 'o1;drop' contains characters"),
        ("B1," + "o" * 129 + ",1,save,600,2026-11-24T10:00:00Z\n", "longer than 128"),
        ("B1,o1,,save,600,2026-11-24T10:00:00Z\n", "zone_id is empty"),
        ("B1,o1," + "1" * 65 + ",save,600,2026-11-24T10:00:00Z\n", "zone_id is longer than 64"),
        (",o1,1,save,600,2026-11-24T10:00:00Z\n", "bill_no is empty"),
        ("B 1,o1,1,save,600,2026-11-24T10:00:00Z\n", "bill_no 'B 1' contains characters"),
        ('"B1\n2",o1,1,save,600,2026-11-24T10:00:00Z\n', "bill_no 'B1\\n2' contains"),
        ('B1,"o1,1,save,600,2026-11-24T10:00:00Z\n', "malformed CSV (unexpected end of data)"),
    ],
)
def test_each_bad_ledger_row_is_named_with_its_reason(
    write_csv: WriteCsv, line: str, reason: str
) -> None:
    # The bad row is row 3: after the header and one good row.
    path = write_csv("l.csv", LEDGER_HEADER + GOOD + line)
    with pytest.raises(IntakeError) as caught:
        ledger_rows(path)
    assert caught.value.row == 3
    assert str(caught.value).startswith("row 3: ")
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)  # one line, whatever the input held


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("bill_no,openid,zone_id,kind,amount\n", "missing occurred_at"),
        (
            "bill_no,openid,zone_id,type,amount,occurred_at\n",
            "missing kind; unknown column name at position 4",
        ),
        (
            "bill_no,openid,zone_id,kind,amount,occurred_at,note\n",
            "unknown column name at position 7",
        ),
        ("bill_no,bill_no,openid,zone_id,kind,amount,occurred_at\n", "a column is repeated"),
        (
            "B1,o1,1,save,600,2026-11-24T10:00:00Z\n",
            "no column name found; is the header row missing?",
        ),
    ],
)
def test_a_wrong_header_is_row_1(write_csv: WriteCsv, header: str, reason: str) -> None:
    path = write_csv("l.csv", header + GOOD)
    with pytest.raises(IntakeError) as caught:
        read_ledger_csv(path, now=NOW, calendar=CAL)  # refused before any row is read
    assert caught.value.row == 1
    assert "the header must be bill_no,openid,zone_id,kind,amount,occurred_at" in str(caught.value)
    assert reason in str(caught.value)


def test_an_empty_file_is_refused(write_csv: WriteCsv) -> None:
    with pytest.raises(IntakeError, match="row 1: the file is empty"):
        read_ledger_csv(write_csv("l.csv", ""), now=NOW, calendar=CAL)


def test_a_header_only_file_has_no_rows(write_csv: WriteCsv) -> None:
    assert ledger_rows(write_csv("l.csv", LEDGER_HEADER)) == []


def test_non_utf8_is_named_by_row(write_csv: WriteCsv) -> None:
    content = (LEDGER_HEADER + GOOD).encode() + "B2,o1,1,save,5,2026-11-24T10:00:00Z\n".encode(
        "utf-16"
    )
    with pytest.raises(IntakeError, match=r"^row 3: not valid UTF-8 text$"):
        ledger_rows(write_csv("l.csv", content))
    latin1 = (LEDGER_HEADER + GOOD + "B2,ö1,1,save,5,2026-11-24T10:00:00Z\n").encode("latin-1")
    with pytest.raises(IntakeError, match=r"^row 3: not valid UTF-8 text$"):
        ledger_rows(write_csv("l2.csv", latin1))


def test_a_too_large_file_is_refused_before_reading(write_csv: WriteCsv) -> None:
    path = write_csv("l.csv", LEDGER_HEADER + GOOD * 10)
    with pytest.raises(IntakeError) as caught:
        read_ledger_csv(path, now=NOW, max_bytes=100, calendar=CAL)
    assert caught.value.row is None
    assert (
        str(caught.value) == f"the file is {path.stat().st_size:,} bytes, over the 100-byte limit"
    )


def test_an_overlong_line_is_refused(write_csv: WriteCsv) -> None:
    path = write_csv("l.csv", LEDGER_HEADER + GOOD + "B2," + "x" * intake.MAX_LINE_BYTES + "\n")
    with pytest.raises(IntakeError, match=r"^row 3: line longer than 65,536 bytes$"):
        ledger_rows(path)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(IntakeError, match="cannot read the file"):
        read_ledger_csv(tmp_path / "absent.csv", now=NOW, calendar=CAL)


def test_a_repeated_bill_no_is_passed_on_with_its_first_row(write_csv: WriteCsv) -> None:
    path = write_csv("l.csv", LEDGER_HEADER + GOOD + "B2,o1,1,cost,5,2026-11-24T10:00:00Z\n" + GOOD)
    rows = ledger_rows(path)
    assert [(r.row, r.repeats_row) for r in rows] == [(2, None), (3, None), (4, 2)]


def test_rows_are_read_lazily(write_csv: WriteCsv) -> None:
    # The repository consumes rows batch by batch; a bad row far down surfaces only there.
    path = write_csv("l.csv", LEDGER_HEADER + GOOD + "B2,o1,1,save,0,2026-11-24T10:00:00Z\n")
    rows = read_ledger_csv(path, now=NOW, calendar=CAL)
    assert next(rows).row == 2
    with pytest.raises(IntakeError, match="row 3"):
        next(rows)


# -- accounts -------------------------------------------------------------------------------

ACCOUNTS_HEADER = "openid,zone_id,session_key,last_active_at\n"
KEY = "HyVFkGl5F5OQWJZZaNzBBg=="  # the shape of a WeChat session_key


def test_accounts_parse_and_keys_are_encrypted_at_once(
    write_csv: WriteCsv, cipher: SessionKeyCipher
) -> None:
    path = write_csv(
        "a.csv",
        ACCOUNTS_HEADER + f"o1,1,{KEY},2026-11-24T10:00:00+08:00\no2,1,,\no3,2,{KEY},\n",
    )
    a, b, c = read_accounts_csv(path, cipher=cipher, now=NOW)
    assert (a.openid, a.zone_id) == ("o1", "1")
    assert a.last_active_at == dt.datetime(2026, 11, 24, 2, 0, tzinfo=dt.UTC)
    assert a.session_key_enc is not None and KEY not in a.session_key_enc
    assert cipher.decrypt(a.session_key_enc) == KEY
    assert a.session_key_at == a.last_active_at  # the key is dated by the activity
    assert KEY not in repr(a) and a.session_key_enc not in repr(a)
    assert (b.session_key_enc, b.session_key_at, b.last_active_at) == (None, None, None)
    assert c.session_key_at == NOW and c.last_active_at is None  # undated: as of the import


def test_accounts_optional_columns_may_be_left_out(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", "zone_id,openid\n1,o1\n")
    (row,) = read_accounts_csv(path, now=NOW)
    assert (row.openid, row.zone_id, row.session_key_enc) == ("o1", "1", None)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("o1,1\n", "expected 4 values, found 2"),
        (",1,,\n", "openid is empty"),
        ("o1,,,\n", "zone_id is empty"),
        ("o1,1,not a key!,\n", "session_key is not base64 text"),
        ("o1,1," + "A" * 257 + ",\n", "session_key is longer than 256"),
        ("o1,1,,2026-11-24T10:00:00\n", "last_active_at '2026-11-24T10:00:00' has no UTC offset"),
        ("o1,1,,yesterday\n", "last_active_at 'yesterday' is not an ISO 8601 timestamp"),
        ("o1,1,,2026-11-31T10:00:00Z\n", "is not a valid date and time"),
        ("o1,1,,2027-01-01T00:00:00Z\n", "is in the future"),
        ("o0,1,,\n", "openid o0 in zone 1 is already on row 2"),
    ],
)
def test_each_bad_account_row_is_named_with_its_reason(
    write_csv: WriteCsv, cipher: SessionKeyCipher, line: str, reason: str
) -> None:
    path = write_csv("a.csv", ACCOUNTS_HEADER + "o0,1,,\n" + line)
    with pytest.raises(IntakeError) as caught:
        list(read_accounts_csv(path, cipher=cipher, now=NOW))
    assert caught.value.row == 3
    assert reason in str(caught.value)


def test_a_bad_session_key_is_never_echoed(write_csv: WriteCsv, cipher: SessionKeyCipher) -> None:
    secret = "c2VjcmV0!c2VjcmV0"
    path = write_csv("a.csv", ACCOUNTS_HEADER + f"o1,1,{secret},\n")
    with pytest.raises(IntakeError) as caught:
        list(read_accounts_csv(path, cipher=cipher, now=NOW))
    assert "c2VjcmV0" not in str(caught.value)


def test_accounts_header_needs_openid_and_zone_id(write_csv: WriteCsv) -> None:
    with pytest.raises(IntakeError, match=r"row 1: .*missing zone_id"):
        read_accounts_csv(write_csv("a.csv", "openid,session_key\no1,\n"), now=NOW)


def test_session_keys_without_an_encryption_key_are_a_config_error(write_csv: WriteCsv) -> None:
    path = write_csv("a.csv", ACCOUNTS_HEADER + "o1,1,,\n" + f"o2,1,{KEY},\n")
    rows = read_accounts_csv(path, cipher=None, now=NOW)
    assert next(rows).openid == "o1"  # a file without keys needs no encryption key
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY is not set"):
        next(rows)


# -- validators shared with the login task ---------------------------------------------------


def test_timestamps_accept_aware_datetimes_and_refuse_naive_ones() -> None:
    shanghai = dt.timezone(dt.timedelta(hours=8))
    aware = dt.datetime(2026, 11, 24, 10, 0, tzinfo=shanghai)
    assert intake.check_timestamp(aware, "at", now=NOW) == aware
    assert intake.check_timestamp(aware, "at", now=NOW).tzinfo == dt.UTC
    with pytest.raises(ValueError, match="has no UTC offset"):
        intake.check_timestamp(dt.datetime(2026, 11, 24, 10, 0), "at", now=NOW)
    with pytest.raises(ValueError, match="at must be an ISO 8601 timestamp"):
        intake.check_timestamp(1732442400, "at", now=NOW)
    # Ten minutes of clock skew is tolerated, more is not.
    assert intake.check_timestamp(NOW + dt.timedelta(minutes=9), "at", now=NOW)
    with pytest.raises(ValueError, match="in the future"):
        intake.check_timestamp(NOW + dt.timedelta(minutes=11), "at", now=NOW)


@pytest.mark.parametrize("value", [None, 1, b"o1", ["o1"]])
def test_identifiers_must_be_text(value: object) -> None:
    with pytest.raises(ValueError, match="openid must be text"):
        intake.check_openid(value)
