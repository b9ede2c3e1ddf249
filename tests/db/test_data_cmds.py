"""The `db`, `accounts` and `ledger` commands: exit codes, one-line errors, what they say."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet
from sqlalchemy import func, select

from worker.cli.base import cli
from worker.config import get_settings
from worker.db import migrate
from worker.db.crypto import SessionKeyCipher
from worker.db.models import Account, LedgerEntry
from worker.db.session import session_scope

pytestmark = pytest.mark.integration

WriteCsv = Callable[..., Path]
LEDGER = (
    "bill_no,openid,zone_id,kind,amount,occurred_at\n"
    "B1,o1,1,save,600,2024-11-24T10:00:00+08:00\n"
    "B2,o1,1,cost,100,2024-11-24T03:00:00Z\n"
)
KEY = "HyVFkGl5F5OQWJZZaNzBBg=="


def run(env: dict[str, str], *args: str) -> Result:
    get_settings.cache_clear()  # each invocation reads its environment, as a new process would
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("midas-recon: ")
    return lines[0]


def count(url: str, model: type[Account] | type[LedgerEntry]) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_db_upgrade_says_what_it_did(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"DATABASE_URL": url}
    first = run(env, "db", "upgrade", "--revision", "20261124_0001")
    assert first.exit_code == 0, first.stderr
    assert first.stdout == f"database {url} upgraded from empty to 20261124_0001\n"
    second = run(env, "db", "upgrade")
    assert second.stdout == f"database {url} upgraded from 20261124_0001 to {migrate.head()}\n"
    third = run(env, "db", "upgrade")
    assert third.exit_code == 0
    assert third.stdout == f"database {url} already at {migrate.head()}; nothing to do\n"
    assert run(env, "db", "check").exit_code == 0


def test_db_commands_fail_in_one_line(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    unknown = run(env, "db", "upgrade", "--revision", "20991231_9999")
    assert unknown.exit_code == 2
    assert "20991231_9999" in one_line_error(unknown)
    migrate.upgrade(env["DATABASE_URL"], "20261124_0001")
    behind = run(env, "db", "check")
    assert behind.exit_code == 1
    assert "not up to date" in one_line_error(behind)
    down = {"DATABASE_URL": "postgresql+psycopg://nobody:hunter2@127.0.0.1:1/x"}
    unreachable = run(down, "db", "upgrade")
    assert unreachable.exit_code == 2
    line = one_line_error(unreachable)
    assert "database unavailable" in line and "hunter2" not in line


def test_ledger_import_ok_again_and_bad(db_url: str, write_csv: WriteCsv) -> None:
    env = {"DATABASE_URL": db_url}
    path = write_csv("ledger.csv", LEDGER)
    first = run(env, "ledger", "import", str(path))
    assert first.exit_code == 0, first.stderr
    assert first.stdout == f"{path}: 2 entries, 2 new, 0 already present\n"
    again = run(env, "ledger", "import", str(path))
    assert again.stdout == f"{path}: 2 entries, 0 new, 2 already present\n"

    bad = write_csv("bad.csv", LEDGER + "B3,o1,1,save,0,2024-11-24T03:00:00Z\n")
    result = run(env, "ledger", "import", str(bad))
    assert result.exit_code == 2
    assert one_line_error(result) == (
        f"midas-recon: {bad}: row 4: amount is zero; amounts are positive coins; "
        "nothing was imported"
    )
    conflict = write_csv("conflict.csv", LEDGER.replace("600", "601"))
    result = run(env, "ledger", "import", str(conflict))
    assert result.exit_code == 2
    assert "row 2: bill_no B1 is already in the ledger with a different amount" in (
        one_line_error(result)
    )
    assert count(db_url, LedgerEntry) == 2


def test_a_missing_file_and_a_wrong_header_exit_2(sqlite_url: str, write_csv: WriteCsv) -> None:
    env = {"DATABASE_URL": sqlite_url}
    missing = run(env, "ledger", "import", "/nonexistent/ledger.csv")
    assert missing.exit_code == 2
    assert one_line_error(missing) == "midas-recon: /nonexistent/ledger.csv: no such file"
    header = write_csv("h.csv", "bill,openid\n")
    wrong = run(env, "accounts", "import", str(header))
    assert wrong.exit_code == 2
    assert "row 1: the header must be openid,zone_id,session_key,last_active_at" in (
        one_line_error(wrong)
    )


def test_accounts_import_encrypts_and_needs_the_key(sqlite_url: str, write_csv: WriteCsv) -> None:
    key = Fernet.generate_key().decode()
    path = write_csv(
        "accounts.csv",
        f"openid,zone_id,session_key,last_active_at\no1,1,{KEY},2024-11-24T10:00:00+08:00\n",
    )
    no_key = run({"DATABASE_URL": sqlite_url}, "accounts", "import", str(path))
    assert no_key.exit_code == 2
    assert "SESSION_KEY_ENCRYPTION_KEY is not set" in one_line_error(no_key)
    assert count(sqlite_url, Account) == 0

    env = {"DATABASE_URL": sqlite_url, "SESSION_KEY_ENCRYPTION_KEY": key}
    ok = run(env, "accounts", "import", str(path))
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout == f"{path}: 1 accounts, 1 new, 0 updated\n"
    assert KEY not in ok.stdout + ok.stderr
    with session_scope(sqlite_url) as session:
        token = session.scalar(select(Account.session_key_enc))
    assert SessionKeyCipher([key]).decrypt(token or "") == KEY


def test_accounts_rekey_rotates_and_reports_lost_keys(sqlite_url: str) -> None:
    new, old, lost = (Fernet.generate_key().decode() for _ in range(3))
    with session_scope(sqlite_url) as session:
        session.add_all(
            [
                Account(
                    openid=f"o{i}",
                    zone_id="1",
                    session_key_enc=SessionKeyCipher([old]).encrypt(KEY),
                )
                for i in range(3)
            ]
        )
    env = {"DATABASE_URL": sqlite_url, "SESSION_KEY_ENCRYPTION_KEY": f"{new},{old}"}
    result = run(env, "accounts", "rekey", "--batch-size", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "session keys: 3 re-encrypted, 0 already on the newest key\n"
    with session_scope(sqlite_url) as session:
        tokens = session.scalars(select(Account.session_key_enc)).all()
    assert [SessionKeyCipher([new]).decrypt(t or "") for t in tokens] == [KEY] * 3

    with session_scope(sqlite_url) as session:
        session.add(
            Account(openid="o9", zone_id="1", session_key_enc=SessionKeyCipher([lost]).encrypt(KEY))
        )
    result = run(env, "accounts", "rekey")
    assert result.exit_code == 1
    assert result.stdout == "session keys: 0 re-encrypted, 3 already on the newest key\n"
    assert result.stderr.startswith("midas-recon: 1 session keys open with no configured key")
    assert "account ids 4" in result.stderr

    # The key is gone for good: drop what it made, the players' next logins bring new ones.
    result = run(env, "accounts", "rekey", "--forget-lost")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "session keys: 0 re-encrypted, 3 already on the newest key, 1 lost keys forgotten\n"
    )
    with session_scope(sqlite_url) as session:
        o9 = session.scalars(select(Account).where(Account.openid == "o9")).one()
        assert o9.session_key_enc is None and o9.session_key_updated_at is None
        assert session.scalar(select(func.count()).where(Account.session_key_enc.is_not(None))) == 3


@pytest.mark.parametrize(
    "command",
    [
        ["db"],
        ["db", "upgrade"],
        ["db", "check"],
        ["accounts"],
        ["accounts", "import"],
        ["accounts", "rekey"],
        ["ledger"],
        ["ledger", "import"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run({}, *command, "--help")
    assert result.exit_code == 0
    assert "Usage: " in result.stdout and len(result.stdout.splitlines()) > 3


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        (f"oHeaderless,1,{KEY},2024-11-24T10:00:00+08:00\n", KEY),  # the header row forgotten
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n", "PRIVATE KEY"),
        (f"openid,zone_id,{KEY}\n", KEY),
    ],
)
def test_a_header_error_never_quotes_the_file(
    sqlite_url: str, write_csv: WriteCsv, content: str, secret: str
) -> None:
    """The header check printed the cells of the first row: a session key (lowercased), or
    the secret in a file imported by mistake."""
    path = write_csv("accounts.csv", content)
    result = run({"DATABASE_URL": sqlite_url}, "accounts", "import", str(path))
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "row 1: the header must be openid,zone_id,session_key,last_active_at" in line
    assert secret.lower() not in line.lower() and "oheaderless" not in line.lower()
    assert count(sqlite_url, Account) == 0
