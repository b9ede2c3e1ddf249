"""Hostile input, fuzzed with hypothesis: Midas' answers, the game's CSV files, task arguments.

Any input yields a valid result or a clear error: for the parser a `Balance` within range or
a typed `MidasError` with a short message; for an import exit 0 with every row stored or
exit 2 with one line and nothing stored; for a task a return or a plain refusal, and no write.

What exists and is not repeated: tests/midas/test_parse.py (each counter's type and range,
every errcode, round trips of in-range integers, excerpts redacted and capped),
tests/db/test_intake.py (each bad row kind with its row number, oversized files and lines,
non-UTF-8), tests/db/test_ledger.py and test_accounts.py (a bad row late in a file stores
nothing), tests/orchestration/test_rechecks.py (recheck arguments).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.reliability.conftest import ENCRYPTION_KEY, WITNESS
from worker.cli.base import cli
from worker.config import get_settings
from worker.db.models import Account, BalanceSnapshot, LedgerEntry, Run, RunItem
from worker.db.session import session_scope
from worker.midas.errors import MidasError
from worker.midas.parse import MAX_COINS, V2_TO_V1, parse_getbalance
from worker.midas.types import COUNTER_FIELDS, Balance

FIXTURES_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# -- the response parser --------------------------------------------------------------------

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
NAMES = sorted({*COUNTER_FIELDS, *V2_TO_V1, "first_save", "errcode", "errmsg"})
# Mostly the real field names, with values of any kind: the parser's actual attack surface.
ANSWER = st.dictionaries(
    st.sampled_from(NAMES) | st.text(max_size=8),
    st.one_of(JSON_LEAF, JSON, st.integers(min_value=0, max_value=MAX_COINS)),
    max_size=12,
)


def parse_or_error(body: bytes, version: Any) -> Balance | MidasError:
    try:
        return parse_getbalance(body, version)
    except MidasError as exc:  # anything else escapes and fails the test
        WITNESS.exception(exc)
        return exc


def check_parse(body: bytes, version: Any) -> None:
    result = parse_or_error(body, version)
    if isinstance(result, Balance):
        for name in COUNTER_FIELDS:
            value = getattr(result, name)
            assert type(value) is int and 0 <= value <= MAX_COINS, (name, value)
        assert type(result.first_save) is bool
    else:
        text = str(result)
        assert "\n" not in text and len(text) < 600, text  # one short line, never the body


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=300), version=st.sampled_from(["v1", "v2"]))
def test_any_bytes_parse_to_a_balance_or_a_typed_error(body: bytes, version: str) -> None:
    check_parse(body, version)


@settings(max_examples=250, deadline=None)
@given(answer=ANSWER, version=st.sampled_from(["v1", "v2"]), zero=st.booleans())
def test_any_json_object_parses_to_a_balance_or_a_typed_error(
    answer: dict[str, Any], version: str, zero: bool
) -> None:
    if zero:
        answer = {**answer, "errcode": 0}  # the path that reads counters
    check_parse(json.dumps(answer).encode(), version)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=1, max_value=100_000), version=st.sampled_from(["v1", "v2"]))
def test_deeply_nested_or_huge_bodies_are_refused_cleanly(depth: int, version: str) -> None:
    check_parse(b"[" * depth + b"]" * depth, version)
    check_parse(b'{"errcode":0,"balance":' + b"9" * min(depth, 5000) + b"}", version)


# -- the CSV importers ----------------------------------------------------------------------

GARBAGE = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=",\"'\r\n\t\x00;=+-@", max_size=10),  # CSV and formula metacharacters
    st.sampled_from(["", " ", "NaN", "1e9", "-1", "0x10", "\uff11\uff12", "10.0", "null", "None"]),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
)
LEDGER_ROW = st.tuples(
    st.sampled_from(["1", "2", "zone-9"]),
    st.sampled_from(["save", "cost", "present", "cancel"]),
    st.integers(min_value=1, max_value=10**15).map(str),
    st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2026, 1, 1)).map(
        lambda d: d.isoformat() + "+08:00"
    ),
)
# Half of the files are valid; the others have one cell replaced by garbage (never the first
# column: the test counts the rows stored by it).
SPOIL = st.none() | st.tuples(st.integers(0, 7), st.integers(1, 5), GARBAGE)


def spoil(cells: list[list[str]], how: tuple[int, int, str] | None) -> None:
    if how is not None:
        row, col, value = how
        cells[row % len(cells)][1 + (col - 1) % (len(cells[0]) - 1)] = value


def csv_cell(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def invoke(env: dict[str, str], *args: str) -> Any:
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)
    event(f"exit {result.exit_code}")  # both outcomes must occur (--hypothesis-show-statistics)
    WITNESS.add(result.output)
    WITNESS.add(result.stderr)
    return result


def assert_clean_outcome(result: Any) -> None:
    """Exit 0, or exit 2 with one line naming the problem; never a traceback (exit 1 with an
    exception is the CLI crashing)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("midas-recon: "), result.stderr
        assert "nothing was imported" in lines[0]
        assert "Traceback" not in result.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(rows=st.lists(LEDGER_ROW, min_size=1, max_size=8), how=SPOIL)
def test_a_fuzzed_ledger_file_is_stored_whole_or_not_at_all(
    db_url: str, tmp_path: Path, rows: list[tuple[str, str, str, str]], how: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    cells = [[f"B{tag}-{i}", f"o{tag}x{i}", *row] for i, row in enumerate(rows)]
    spoil(cells, how)
    lines = ["bill_no,openid,zone_id,kind,amount,occurred_at"]
    lines += [",".join(csv_cell(v) for v in row) for row in cells]
    path = tmp_path / f"{tag}.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = invoke({"DATABASE_URL": db_url}, "ledger", "import", str(path))
    assert_clean_outcome(result)
    with session_scope(db_url) as session:
        stored = session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.bill_no.like(f"B{tag}-%"))
        )
    assert stored == (len(rows) if result.exit_code == 0 else 0), result.output


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES_OK)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["1", "2"]),
            st.sampled_from(["", "c2Vzc2lvbi1rZXktZnV6ei0wMQ=="]),
            st.sampled_from(["", "2025-03-01T10:00:00+08:00"]),
        ),
        min_size=1,
        max_size=8,
    ),
    how=SPOIL,
)
def test_a_fuzzed_accounts_file_is_stored_whole_or_not_at_all(
    db_url: str, tmp_path: Path, rows: list[tuple[str, str, str]], how: Any
) -> None:
    tag = uuid.uuid4().hex[:8]
    cells = [[f"a{tag}x{i}", *row] for i, row in enumerate(rows)]
    spoil(cells, how)
    lines = ["openid,zone_id,session_key,last_active_at"]
    lines += [",".join(csv_cell(v) for v in row) for row in cells]
    path = tmp_path / f"{tag}.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {"DATABASE_URL": db_url, "SESSION_KEY_ENCRYPTION_KEY": ENCRYPTION_KEY}
    result = invoke(env, "accounts", "import", str(path))
    assert_clean_outcome(result)
    with session_scope(db_url) as session:
        stored = session.scalar(
            select(func.count()).select_from(Account).where(Account.openid.like(f"a{tag}%"))
        )
    if result.exit_code == 0:
        assert stored == len(rows)
    else:
        assert stored == 0, result.output
    assert "c2Vzc2lvbi1rZXktZnV6ei0wMQ==" not in result.output + result.stderr


# -- task arguments -------------------------------------------------------------------------

ANY_ARG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=5), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
# What a clear refusal of a bad argument may be; anything else (a database error about an
# out-of-range integer, an AttributeError) is a crash with a traceback in the worker's log.
REFUSALS = (ValueError, TypeError, LookupError)


def table_counts(url: str) -> tuple[int, ...]:
    with session_scope(url) as session:
        return tuple(
            session.scalar(select(func.count()).select_from(m)) or 0
            for m in (Run, RunItem, BalanceSnapshot, Account, LedgerEntry)
        )


@pytest.fixture
def task_env(db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from tests.reliability.conftest import APP_KEY, APP_SECRET

    for name, value in {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MIDAS_API_BASE": "http://127.0.0.1:9",  # never reached: no batch holds a claim
        "MIDAS_API_VERSION": "v2",
        "MIDAS_APPID": "wxsim0000000000",
        "MIDAS_APP_SECRET": APP_SECRET,
        "MIDAS_OFFER_ID": "1450000000",
        "MIDAS_APP_KEY": APP_KEY,
        "SESSION_KEY_ENCRYPTION_KEY": ENCRYPTION_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    return db_url


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES_OK)
@given(
    task=st.sampled_from(["fetch_batch", "pump"]),
    args=st.lists(ANY_ARG, min_size=1, max_size=3),
)
def test_fuzzed_task_arguments_are_refused_without_a_write(
    task_env: str, task: str, args: list[Any]
) -> None:
    import worker.tasks as tasks

    before = table_counts(task_env)
    fn = getattr(tasks, task)
    try:
        fn.run(*args)
    except REFUSALS as exc:
        WITNESS.exception(exc)
        assert "\n" not in str(exc)[:300]
    assert table_counts(task_env) == before
