"""`midas-recon balance` as an operator runs it: a subprocess against a running simulator."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from worker.simulator import SimConfig, Simulator

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).with_name("midas-recon"))
SESSION_KEY = "Y2xpLXNlc3Npb24ta2V5LTAx"
V1_FIELDS = ["balance", "gen_balance", "first_save", "save_amt", "save_sum", "cost_sum"]
V1_FIELDS.append("present_sum")
SECRETS = ("sim-app-secret", "sim-sandbox-appkey", "sim-prod-appkey", SESSION_KEY)


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        s.add_player("oCli", save=900, present=30, cost=120, session_key=SESSION_KEY)
        s.add_player("oCli", "7", save=1)
        s.add_player("oNoKey", save=3)
        yield s


def _run(
    sim: Simulator, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    base |= {
        "DATABASE_URL": "sqlite:////nonexistent/never-used.db",
        "MIDAS_API_BASE": sim.base_url,
        "MIDAS_APPID": sim.config.appid,
        "MIDAS_APP_SECRET": sim.config.app_secret,
        "MIDAS_OFFER_ID": sim.config.offer_id,
        "MIDAS_APP_KEY": sim.config.app_key_sandbox,
        "MIDAS_TIMEOUT_S": "3",
        # The simulator speaks plain HTTP; production refuses it without a reason.
        "MIDAS_ALLOW_PLAIN_HTTP": "the test simulator on loopback",
    }
    base.pop("REDIS_URL", None)
    base.update(env)
    return subprocess.run(
        [CLI, "balance", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=base,
        timeout=60,
        check=False,
    )


def _no_secret(result: subprocess.CompletedProcess[str]) -> None:
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    _no_secret(result)
    return lines[0]


def test_v1_table(sim: Simulator) -> None:
    result = _run(sim, "oCli")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert rows["balance"] == "810" and rows["first_save"] == "yes"
    assert rows["api"] == "v1 sandbox" and rows["zone_id"] == "1"
    _no_secret(result)


@pytest.mark.parametrize("env", ["sandbox", "production"])
def test_v1_json_uses_v1_names(sim: Simulator, env: str) -> None:
    key = sim.config.app_key(env)
    result = _run(
        sim, "oCli", "--zone-id", "7", "--format", "json", MIDAS_ENV=env, MIDAS_APP_KEY=key
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert list(out) == ["openid", "zone_id", "api_version", "env", *V1_FIELDS]
    assert {k: out[k] for k in V1_FIELDS} == sim.counters("oCli", "7")
    assert (out["api_version"], out["env"], out["zone_id"]) == ("v1", env, "7")


def test_v2_json_uses_v1_names_with_key_from_stdin(sim: Simulator) -> None:
    result = _run(
        sim,
        "oCli",
        "--format",
        "json",
        "--session-key-stdin",
        stdin=SESSION_KEY + "\n",
        MIDAS_API_VERSION="v2",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert list(out)[4:] == V1_FIELDS and out["api_version"] == "v2"
    assert {k: out[k] for k in V1_FIELDS} == sim.counters("oCli")
    _no_secret(result)


def test_v2_with_the_session_key_stored_in_the_database(sim: Simulator, sqlite_url: str) -> None:
    from worker.db.crypto import SessionKeyCipher
    from worker.db.models import Account
    from worker.db.session import session_scope

    fernet_key = Fernet.generate_key().decode()
    with session_scope(sqlite_url) as db:
        db.add(
            Account(
                openid="oCli",
                zone_id="1",
                session_key_enc=SessionKeyCipher([fernet_key]).encrypt(SESSION_KEY),
                session_key_updated_at=dt.datetime.now(dt.UTC),
            )
        )
    env = {"MIDAS_API_VERSION": "v2", "DATABASE_URL": sqlite_url}
    env["SESSION_KEY_ENCRYPTION_KEY"] = fernet_key
    result = _run(sim, "oCli", "--format", "json", **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["balance"] == 810
    assert fernet_key not in result.stdout + result.stderr
    # An account the database does not know has no key: unobservable, exit 1.
    missing = _run(sim, "oNoKey", **env)
    assert missing.returncode == 1
    assert "no session_key" in _one_error_line(missing)


def test_v2_without_a_key_is_one_line_and_exit_1(sim: Simulator) -> None:
    result = _run(sim, "oCli", "--no-session-key-from-db", MIDAS_API_VERSION="v2")
    assert result.returncode == 1
    assert "no session_key" in _one_error_line(result)


@pytest.mark.parametrize(
    ("env", "stdin", "code", "words"),
    [
        ({"MIDAS_APP_KEY": "sim-prod-appkey"}, "", "90011", "sig wrong"),
        ({"MIDAS_OFFER_ID": "42"}, "", "90017", "no permission"),
        (
            {"MIDAS_API_VERSION": "v2", "MIDAS_APP_KEY": "sim-prod-appkey"},
            SESSION_KEY,
            "90011",
            "pay_sig wrong",
        ),
        ({"MIDAS_API_VERSION": "v2"}, "c3RhbGUta2V5LW5vdC1jdXJyZW50", "90010", "signature wrong"),
    ],
)
def test_midas_error_is_one_line_with_code_and_meaning(
    sim: Simulator, env: dict[str, str], stdin: str, code: str, words: str
) -> None:
    args = ["oCli", "--session-key-stdin"] if stdin else ["oCli"]
    result = _run(sim, *args, stdin=stdin + "\n", **env)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert f"errcode {code}" in line and words in line


def test_expired_session_v2(sim: Simulator) -> None:
    result = _run(
        sim, "oNoKey", "--session-key-stdin", stdin="b2xkLWtleS0xMjM0NTY=\n", MIDAS_API_VERSION="v2"
    )
    assert result.returncode == 1
    assert "errcode 90016" in _one_error_line(result)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MIDAS_TIMEOUT_S": "soon"}, "MIDAS_TIMEOUT_S"),
        ({"MIDAS_API_VERSION": "v3"}, "MIDAS_API_VERSION"),
        ({"MIDAS_APP_KEY": ""}, "MIDAS_APP_KEY"),
        ({"MIDAS_APP_SECRET": ""}, "MIDAS_APP_SECRET"),
        ({"MIDAS_ENV": "production", "MIDAS_APP_KEY": "changeme"}, "MIDAS_APP_KEY"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    sim: Simulator, env: dict[str, str], variable: str
) -> None:
    result = _run(sim, "oCli", **env)
    assert result.returncode == 2
    assert variable in _one_error_line(result)


def test_unreachable_midas_is_one_line_and_exit_1(sim: Simulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = _run(sim, "oCli", MIDAS_API_BASE=dead, MIDAS_ACCESS_TOKEN="static-token-for-cli")
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "Midas request failed" in line and "static-token-for-cli" not in line


def test_help() -> None:
    result = subprocess.run(
        [CLI, "balance", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    for option in ("--zone-id", "--format", "--session-key-from-db", "--session-key-stdin"):
        assert option in result.stdout
