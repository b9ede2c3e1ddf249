"""Secrets at rest and at start-up: session keys unreadable in a database dump, and production
settings that refuse placeholder or missing secrets with one line.

Covered elsewhere and not repeated: key rotation keeps old ciphertexts readable and `accounts
rekey` re-encrypts with the newest key (tests/db/test_crypto.py, tests/db/test_accounts.py
test_rekey_*, tests/db/test_data_cmds.py test_accounts_rekey_rotates_and_reports_lost_keys);
placeholders refused by the settings object (tests/test_config.py); no secret on any error
path of the client (tests/midas/test_secrets.py).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from tests.reliability.conftest import APP_KEY, APP_SECRET, ENCRYPTION_KEY, WITNESS, rel_env
from tests.reliability.conftest import small_world as plant_world
from worker.cli.base import cli
from worker.config import get_settings
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def test_session_keys_are_unreadable_in_a_database_dump(
    db_url: str, redis_url: str, sim: Simulator
) -> None:
    world = plant_world(sim, rel_env(db_url, redis_url, sim.base_url), n=120)
    keys = [p["session_key"] for p in sim.players() if p["session_key"]]
    assert len(keys) >= 100
    pg_dump = shutil.which("pg_dump")
    assert pg_dump is not None, "pg_dump is not installed"
    url = make_url(world.url)
    dump = subprocess.run(
        [
            pg_dump,
            "-h",
            url.host or "127.0.0.1",
            "-p",
            str(url.port or 5432),
            "-U",
            url.username or "postgres",
            "--data-only",
            url.database or "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "o11_00001-plr" in dump or any(p[0] in dump for p in world.players), "empty dump?"
    readable = [k for k in keys if k in dump]
    assert not readable, f"{len(readable)} session keys in clear in the dump"
    for secret in (ENCRYPTION_KEY, APP_KEY, APP_SECRET):
        assert secret not in dump


def production_env(tmp_path_db: str, **change: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": tmp_path_db,
        "MIDAS_ENV": "production",
        "MIDAS_API_VERSION": "v2",
        "MIDAS_API_BASE": "http://127.0.0.1:9",
        "MIDAS_ALLOW_PLAIN_HTTP": "nothing listens there; the run stops at its settings",
        "MIDAS_APPID": "wx0123456789abcdef",
        "MIDAS_APP_SECRET": APP_SECRET,
        "MIDAS_OFFER_ID": "1450000000",
        "MIDAS_APP_KEY": PROD_KEY,
        "SESSION_KEY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "REDIS_URL": "",
    }
    env.update(change)
    return env


PROD_KEY = "rel-production-appkey-09d3c7"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MIDAS_APP_KEY", "changeme", "MIDAS_APP_KEY holds a placeholder value"),
        ("MIDAS_APP_SECRET", "xxxx", "MIDAS_APP_SECRET holds a placeholder value"),
        (
            "SESSION_KEY_ENCRYPTION_KEY",
            "CHANGEME",
            "SESSION_KEY_ENCRYPTION_KEY holds a placeholder",
        ),
        ("MIDAS_APP_KEY", "", "MIDAS_APP_KEY is not set"),
        ("MIDAS_APP_SECRET", "  ", "MIDAS_APP_SECRET is not set"),
        ("MIDAS_APP_KEY", "short", "MIDAS_APP_KEY is too short"),
    ],
)
def test_a_production_run_refuses_placeholder_and_missing_secrets_in_one_line(
    sqlite_url: str, name: str, value: str, says: str
) -> None:
    get_settings.cache_clear()
    env = production_env(sqlite_url, **{name: value})
    result = CliRunner().invoke(cli, ["run"], env=env, catch_exceptions=False)
    WITNESS.add(result.output)
    assert result.exit_code == 2, result.output
    # (The embedded mode announces itself on stderr first; the error is the one line after.)
    errors = [line for line in result.stderr.splitlines() if line.startswith("midas-recon: ")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    assert "Traceback" not in result.output
    for secret in (APP_SECRET, PROD_KEY, env["SESSION_KEY_ENCRYPTION_KEY"]):
        assert secret not in result.output + result.stderr
