"""CSV intake for accounts and the ledger (PRODUCT.md §3): parsing and validation, no SQL.

Files are read as a stream, so a million-row file never sits in memory as rows. Row numbers
are the ones a spreadsheet shows: the header is row 1. Each problem raises IntakeError with
the row and one reason; the caller's transaction then rolls back and nothing is stored.
The validators (`check_*`) raise ValueError with a reason and are shared with the login task.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from worker import business_calendar as clock
from worker.db import crypto
from worker.db.accounts import AccountRow
from worker.db.ledger import LedgerRow
from worker.vocabulary import LEDGER_KINDS

if TYPE_CHECKING:
    from worker.business_calendar import BusinessCalendar
    from worker.db.crypto import SessionKeyCipher

ACCOUNT_COLUMNS = ("openid", "zone_id", "session_key", "last_active_at")
ACCOUNT_REQUIRED = ("openid", "zone_id")
LEDGER_COLUMNS = ("bill_no", "openid", "zone_id", "kind", "amount", "occurred_at")

# ~3M ledger rows. Streaming keeps rows out of memory, but the duplicate check keeps each
# bill_no (or account) seen, ~150 bytes a row; bigger exports go in several files.
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024  # no valid row comes close; a runaway line is refused early
MAX_AMOUNT = 10**15  # coins; far above any real balance, far below BIGINT
# An activity or login time later than now by more than this is a wrong clock or a typo. It
# matters most for session keys: a key dated in the future would block every newer key until
# then. Ledger rows are held to the tighter RECON_CLOCK_SKEW_SECONDS (business_calendar), since
# a row dated ahead of the fetches is what makes a payment in flight look settled or missing.
MAX_CLOCK_SKEW = dt.timedelta(minutes=10)
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

_IDENTIFIER = re.compile(r"[A-Za-z0-9_.@-]+")
_BILL_NO = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_BASE64 = re.compile(r"[A-Za-z0-9+/_=-]+")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}")
_DIGITS = re.compile(r"[0-9]+")  # not \d: that also matches other scripts' digits


class IntakeError(Exception):
    """A file or one of its rows is wrong; `row` is None for the file as a whole."""

    def __init__(self, row: int | None, reason: str) -> None:
        self.row = row
        self.reason = reason
        super().__init__(reason if row is None else f"row {row}: {reason}")


# -- validators -----------------------------------------------------------------------------


def _show(value: str) -> str:
    """A value quoted for an error message: short, one line, control characters escaped."""
    return repr(value if len(value) <= 40 else value[:40] + "…")


def _identifier(value: object, name: str, max_len: int, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text")
    if not value:
        raise ValueError(f"{name} is empty")
    if len(value) > max_len:
        raise ValueError(f"{name} is longer than {max_len} characters")
    if not pattern.fullmatch(value):
        raise ValueError(f"{name} {_show(value)} contains characters that are not allowed")
    return value


def check_openid(value: object) -> str:
    """Letters, digits and `_ . @ -`, 1-128 characters (WeChat openids are 28)."""
    return _identifier(value, "openid", 128, _IDENTIFIER)


def check_zone_id(value: object) -> str:
    """Letters, digits and `_ . @ -`, 1-64 characters ("1" when the game has no zones)."""
    return _identifier(value, "zone_id", 64, _IDENTIFIER)


def check_bill_no(value: object) -> str:
    """Printable ASCII without spaces, 1-128 characters."""
    return _identifier(value, "bill_no", 128, _BILL_NO)


def check_session_key(value: object) -> str:
    """Base64 text up to 256 characters. The value never appears in the message."""
    if not isinstance(value, str):
        raise ValueError("session_key must be text")
    if len(value) > 256:
        raise ValueError("session_key is longer than 256 characters")
    if not _BASE64.fullmatch(value):
        raise ValueError("session_key is not base64 text")
    return value


def check_kind(value: str) -> str:
    if value not in LEDGER_KINDS:
        raise ValueError(f"kind {_show(value)} is not one of {', '.join(LEDGER_KINDS)}")
    return value


def check_amount(value: str) -> int:
    """A positive whole number of coins; the kind, not a sign, says which way coins moved."""
    if not value:
        raise ValueError("amount is empty")
    if not _DIGITS.fullmatch(value):
        if value.startswith("-"):
            raise ValueError(f"amount {_show(value)} is negative; amounts are positive coins")
        raise ValueError(f"amount {_show(value)} is not a whole number of coins")
    if len(value.lstrip("0")) > len(str(MAX_AMOUNT)) or int(value) > MAX_AMOUNT:
        raise ValueError(f"amount {_show(value)} is larger than {MAX_AMOUNT:,} coins")
    amount = int(value)
    if amount == 0:
        raise ValueError("amount is zero; amounts are positive coins")
    return amount


def check_timestamp(
    value: object, name: str, *, now: dt.datetime, latest: dt.datetime | None = None
) -> dt.datetime:
    """An aware datetime, or ISO 8601 text with a UTC offset, no later than `latest` (default
    now + MAX_CLOCK_SKEW); returned in UTC."""
    if isinstance(value, dt.datetime):
        ts = value
        shown = _show(value.isoformat())
    elif isinstance(value, str):
        shown = _show(value)
        if not _TIMESTAMP.match(value):
            raise ValueError(
                f"{name} {shown} is not an ISO 8601 timestamp (e.g. 2026-11-24T10:00:00+08:00)"
            )
        try:
            ts = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{name} {shown} is not a valid date and time") from None
    else:
        raise ValueError(f"{name} must be an ISO 8601 timestamp with a UTC offset")
    if ts.utcoffset() is None:
        raise ValueError(f"{name} {shown} has no UTC offset (add e.g. +08:00 or Z)")
    if ts < EARLIEST:
        raise ValueError(f"{name} {shown} is before {EARLIEST.year}")
    latest = now + MAX_CLOCK_SKEW if latest is None else latest
    if ts > latest:
        ahead = int((ts - now).total_seconds())
        allowed = int((latest - now).total_seconds())
        raise ValueError(
            f"{name} {shown} is in the future: {ahead} s ahead of this clock, at most {allowed} s"
            " is tolerated (check the game server's clock, or RECON_CLOCK_SKEW_SECONDS)"
        )
    return ts.astimezone(dt.UTC)


# -- files ----------------------------------------------------------------------------------


def read_accounts_csv(
    path: Path,
    *,
    cipher: SessionKeyCipher | None = None,
    now: dt.datetime | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> Iterator[AccountRow]:
    """Validated accounts, session keys already encrypted. The header is checked right away.

    A session key without last_active_at is taken as current at `now` (the import).
    `cipher` may be None for files without session keys (the v1 API needs none).
    """
    now = now or clock.utcnow()
    records = _table(path, ACCOUNT_COLUMNS, ACCOUNT_REQUIRED, max_bytes)
    return _accounts(records, cipher, now)


def _accounts(
    records: Iterator[tuple[int, dict[str, str]]], cipher: SessionKeyCipher | None, now: dt.datetime
) -> Iterator[AccountRow]:
    seen: dict[tuple[str, str], int] = {}
    for row, values in records:
        try:
            openid = check_openid(values["openid"])
            zone_id = check_zone_id(values["zone_id"])
            raw_time = values.get("last_active_at", "")
            last_active = check_timestamp(raw_time, "last_active_at", now=now) if raw_time else None
            raw_key = values.get("session_key", "")
            session_key = check_session_key(raw_key) if raw_key else None
        except ValueError as exc:
            raise IntakeError(row, str(exc)) from None
        first = seen.setdefault((openid, zone_id), row)
        if first != row:
            raise IntakeError(row, f"openid {openid} in zone {zone_id} is already on row {first}")
        encrypted = crypto.required(cipher).encrypt(session_key) if session_key else None
        yield AccountRow(
            openid=openid,
            zone_id=zone_id,
            last_active_at=last_active,
            session_key_enc=encrypted,
            session_key_at=(last_active or now) if encrypted else None,
        )


def read_ledger_csv(
    path: Path,
    *,
    calendar: BusinessCalendar,
    now: dt.datetime | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> Iterator[LedgerRow]:
    """Validated ledger rows. The header is checked right away, the rows as they are read.

    A bill_no seen earlier in the file is passed on with `repeats_row` set: the repository
    accepts an identical repeat and names both rows when the content differs.
    """
    now = now or clock.utcnow()
    records = _table(path, LEDGER_COLUMNS, LEDGER_COLUMNS, max_bytes)
    return _ledger(records, now, calendar.latest_believable(now))


def _ledger(
    records: Iterator[tuple[int, dict[str, str]]], now: dt.datetime, latest: dt.datetime
) -> Iterator[LedgerRow]:
    seen: dict[str, int] = {}  # bill_no -> first row: the one thing kept per row
    for row, values in records:
        try:
            bill_no = check_bill_no(values["bill_no"])
            entry = LedgerRow(
                bill_no=bill_no,
                openid=check_openid(values["openid"]),
                zone_id=check_zone_id(values["zone_id"]),
                kind=check_kind(values["kind"]),
                amount=check_amount(values["amount"]),
                occurred_at=check_timestamp(
                    values["occurred_at"], "occurred_at", now=now, latest=latest
                ),
                row=row,
            )
        except ValueError as exc:
            raise IntakeError(row, str(exc)) from None
        first = seen.setdefault(bill_no, row)
        if first != row:
            entry = replace(entry, repeats_row=first)
        yield entry


def _table(
    path: Path, columns: tuple[str, ...], required: tuple[str, ...], max_bytes: int
) -> Iterator[tuple[int, dict[str, str]]]:
    """Check the size and the header now; then (row, {column: value}) for each data row."""
    records = _records(path, max_bytes)
    first = next(records, None)
    expected = ",".join(columns)
    if first is None:
        raise IntakeError(1, f"the file is empty; the first row must be the header {expected}")
    header_row, header = first
    names = [name.lower() for name in header]
    # The header's cells are never quoted back: a file without a header has data there (a
    # session key), and a secret imported by mistake would be printed. Positions suffice.
    problems = []
    if not set(names) & set(columns):
        problems.append("no column name found; is the header row missing?")
    else:
        if missing := [c for c in required if c not in names]:
            problems.append("missing " + ", ".join(missing))
        if unknown := [str(i) for i, n in enumerate(names, start=1) if n not in columns]:
            problems.append("unknown column name at position " + ", ".join(unknown))
        if len(set(names)) != len(names):
            problems.append("a column is repeated")
    if problems:
        raise IntakeError(header_row, f"the header must be {expected} ({'; '.join(problems)})")
    return _with_names(records, names)


def _with_names(
    records: Iterator[tuple[int, list[str]]], names: list[str]
) -> Iterator[tuple[int, dict[str, str]]]:
    for row, cells in records:
        if len(cells) != len(names):
            raise IntakeError(row, f"expected {len(names)} values, found {len(cells)}")
        yield row, dict(zip(names, cells, strict=True))


class _BadLine(Exception):
    pass


def _records(path: Path, max_bytes: int) -> Iterator[tuple[int, list[str]]]:
    """(row number, stripped cells) of each non-blank record; the first record is row 1."""
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as exc:
        raise IntakeError(None, f"cannot read the file ({exc.strerror})") from None
    if size > max_bytes:
        handle.close()
        raise IntakeError(None, f"the file is {size:,} bytes, over the {max_bytes:,}-byte limit")
    with handle:
        reader = csv.reader(_decoded_lines(handle), strict=True)
        row = 0
        while True:
            row += 1  # blank rows count: a spreadsheet shows them too
            try:
                cells = next(reader)
            except StopIteration:
                return
            except _BadLine as exc:
                raise IntakeError(row, str(exc)) from None
            except csv.Error as exc:
                raise IntakeError(row, f"malformed CSV ({exc})") from None
            if any(cell.strip() for cell in cells):
                yield row, [cell.strip() for cell in cells]


def _decoded_lines(handle: IO[bytes]) -> Iterator[str]:
    """UTF-8 lines (a leading byte-order mark dropped), refusing overlong or undecodable ones."""
    first = True
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) > MAX_LINE_BYTES:
            raise _BadLine(f"line longer than {MAX_LINE_BYTES:,} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadLine("not valid UTF-8 text") from None
        if first:
            text = text.removeprefix("\ufeff")  # spreadsheets write one on "CSV UTF-8"
            first = False
        yield text
