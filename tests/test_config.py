"""Settings (PRODUCT.md §2): defaults, *_FILE secrets, one-line errors that never echo a value,
placeholders refused in production."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import time
from pathlib import Path

import pytest

from worker.config import SECRET_VARIABLES, ConfigError, get_settings, load_settings


def test_defaults_are_the_documented_ones() -> None:
    s = load_settings({})
    assert s.DATABASE_URL == "sqlite:///midas_recon.db"
    assert s.REDIS_URL is None and s.embedded
    assert s.MIDAS_API_BASE == "https://api.weixin.qq.com"
    assert (s.MIDAS_API_VERSION, s.MIDAS_ENV) == ("v1", "sandbox")
    assert s.MIDAS_USER_IP == "127.0.0.1"
    assert s.MIDAS_SEND_MP_SIG is False
    assert s.MIDAS_ACCESS_TOKEN is None
    assert (s.MIDAS_RATE_LIMIT, s.MIDAS_MAX_IN_FLIGHT, s.MIDAS_TIMEOUT_S) == (50, 32, 5)
    assert s.RECON_TIMEZONE == "Asia/Shanghai" and s.calendar.nightly_at == time(2, 30)
    assert (s.RECON_SETTLE_SECONDS, s.RECON_ACTIVE_DAYS) == (300, 30)
    assert s.secret_values() == []


def test_environment_is_read_and_typed() -> None:
    s = load_settings(
        {
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "MIDAS_API_BASE": "http://127.0.0.1:8080/",
            "MIDAS_API_VERSION": "v2",
            "MIDAS_ENV": "production",
            "MIDAS_ALLOW_PLAIN_HTTP": "a test server on loopback",
            "MIDAS_SEND_MP_SIG": "true",
            "MIDAS_RATE_LIMIT": "12.5",
            "MIDAS_MAX_IN_FLIGHT": "4",
            "RECON_NIGHTLY_AT": "3:05",
            "UNRELATED_VARIABLE": "ignored",
        }
    )
    assert not s.embedded and s.MIDAS_API_BASE == "http://127.0.0.1:8080"
    assert s.MIDAS_SEND_MP_SIG is True and s.MIDAS_RATE_LIMIT == 12.5
    assert s.MIDAS_MAX_IN_FLIGHT == 4 and s.RECON_NIGHTLY_AT == "03:05"


def test_get_settings_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDAS_OFFER_ID", "4242")
    assert get_settings().MIDAS_OFFER_ID == "4242"
    assert get_settings() is get_settings()


# -- secrets from files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_file_variant_reads_the_secret(tmp_path: Path, name: str) -> None:
    path = tmp_path / "secret"
    value = "from-a-file-secret-value"
    if name == "RECON_ALERT_WEBHOOKS":  # a list of URLs, the key inside them
        value = f"https://hooks.example.com/services/{value}"
    path.write_text(f"  {value}\n", encoding="utf-8")
    s = load_settings({f"{name}_FILE": str(path)})
    assert getattr(s, name).get_secret_value() == value
    assert value in s.secret_values() and "from-a-file-secret-value" in s.secret_values()
    assert "from-a-file-secret-value" not in repr(s) + str(s)


def test_file_and_value_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("file-secret-value", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings({"MIDAS_APP_KEY": "env-secret-value", "MIDAS_APP_KEY_FILE": str(path)})
    assert "MIDAS_APP_KEY" in str(info.value)
    assert "secret-value" not in str(info.value)


def test_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^MIDAS_APP_SECRET_FILE cannot be read"):
        load_settings({"MIDAS_APP_SECRET_FILE": str(tmp_path / "missing")})


def test_empty_secret_means_unset() -> None:
    s = load_settings({"MIDAS_ACCESS_TOKEN": "", "MIDAS_APP_KEY": "   "})
    assert s.MIDAS_ACCESS_TOKEN is None and s.MIDAS_APP_KEY is None


# -- bad values ---------------------------------------------------------------------------------

BAD = "bogus-VALUE-7f3a"


@pytest.mark.parametrize(
    "name",
    [
        "MIDAS_API_BASE",
        "MIDAS_API_VERSION",
        "MIDAS_ENV",
        "MIDAS_SEND_MP_SIG",
        "MIDAS_RATE_LIMIT",
        "MIDAS_MAX_IN_FLIGHT",
        "MIDAS_TIMEOUT_S",
        "RECON_TIMEZONE",
        "RECON_NIGHTLY_AT",
        "RECON_SETTLE_SECONDS",
        "RECON_ACTIVE_DAYS",
    ],
)
def test_bad_value_is_one_line_naming_the_variable_never_the_value(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: BAD})
    message = str(info.value)
    assert message.startswith(f"{name}:")
    assert "\n" not in message and BAD not in message and "7f3a" not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MIDAS_RATE_LIMIT", "0"),
        ("MIDAS_RATE_LIMIT", "-5"),
        ("MIDAS_MAX_IN_FLIGHT", "0"),
        ("MIDAS_TIMEOUT_S", "0"),
        ("MIDAS_TIMEOUT_S", "1000"),
        ("RECON_NIGHTLY_AT", "24:00"),
        ("RECON_SETTLE_SECONDS", "-1"),
        ("MIDAS_API_BASE", "ftp://example.com"),
    ],
)
def test_out_of_range_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}:"):
        load_settings({name: value})


# -- placeholders and required secrets ---------------------------------------------------------


@pytest.mark.parametrize("value", ["changeme", "CHANGE-ME", "xxxx", "secret", "placeholder"])
def test_placeholders_are_refused_in_production(value: str) -> None:
    prod = load_settings({"MIDAS_ENV": "production", "MIDAS_APP_KEY": value})
    with pytest.raises(ConfigError) as info:
        prod.require("MIDAS_APP_KEY")
    assert str(info.value) == "MIDAS_APP_KEY holds a placeholder value; set the real secret"
    # The sandbox (dev, tests, the demo) accepts them.
    load_settings({"MIDAS_APP_KEY": value}).require("MIDAS_APP_KEY")


def test_short_secret_is_refused_in_production() -> None:
    prod = load_settings({"MIDAS_ENV": "production", "MIDAS_APP_SECRET": "abc123"})
    with pytest.raises(ConfigError, match=r"^MIDAS_APP_SECRET is too short") as info:
        prod.require("MIDAS_APP_SECRET")
    assert "abc123" not in str(info.value)


def test_require_names_the_missing_variable() -> None:
    with pytest.raises(ConfigError, match=r"^MIDAS_OFFER_ID is not set$"):
        load_settings({}).require("MIDAS_OFFER_ID")
    load_settings({"MIDAS_OFFER_ID": "1"}).require("MIDAS_OFFER_ID")


def test_secret_values_cover_every_secret_and_url_passwords() -> None:
    s = load_settings(
        {
            "MIDAS_APP_SECRET": "app-secret-1",
            "MIDAS_APP_KEY": "app-key-2",
            "MIDAS_ACCESS_TOKEN": "token-3",
            "SESSION_KEY_ENCRYPTION_KEY": "fernet-new-4, fernet-old-5",
            "DATABASE_URL": "postgresql+psycopg://recon:db%2Fpass-6@db/recon",
            "REDIS_URL": "redis://:redis-pass-7@redis:6379/0",
        }
    )
    assert set(s.secret_values()) == {
        "app-secret-1",
        "app-key-2",
        "token-3",
        "fernet-new-4",
        "fernet-old-5",
        "db/pass-6",
        "redis-pass-7",
    }
    shown = repr(s) + str(s)
    for value in ("app-secret-1", "app-key-2", "token-3", "fernet-new-4"):
        assert value not in shown


# -- inputs that used to end in a traceback or leak (issue 13) ---------------------------------

CLI = str(Path(sys.executable).with_name("midas-recon"))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    base.pop("REDIS_URL", None)
    return subprocess.run(
        [CLI, *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql+psycopg://u:pw-1234567@127.0.0.1:abc/db", "DATABASE_URL: the port is not"),
        ("mysql://x", "DATABASE_URL: only sqlite:/// and postgresql+psycopg:// URLs"),
        ("not a url", "DATABASE_URL: not a database URL"),
        # An unencoded @ made "tail-secret@127.0.0.1" the host: the driver printed it.
        ("postgresql+psycopg://u:pw@tail-secret@127.0.0.1:1/db", "unencoded @; write it as %40"),
    ],
)
def test_a_bad_database_url_is_one_line_and_exit_2(url: str, reason: str) -> None:
    line = _one_line(_cli({"DATABASE_URL": url}, "runs"))
    assert reason in line
    assert "pw-1234567" not in line and "tail-secret" not in line


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://127.0.0.1:port/0", "REDIS_URL: the port is not a number"),
        ("http://127.0.0.1:6379/0", "REDIS_URL: must start with redis://, rediss://"),
    ],
)
def test_a_bad_redis_url_is_one_line(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=f"^{reason}"):
        load_settings({"REDIS_URL": url})


def test_rediss_is_accepted_and_an_at_in_a_redis_password_is_all_password() -> None:
    s = load_settings({"REDIS_URL": "rediss://:pw@tail-secret@redis.internal:6380/0"})
    assert "pw@tail-secret" in s.secret_values()  # redis-py splits at the last @ too
    assert "tail-secret" not in repr(s)


def test_repr_masks_the_url_passwords() -> None:
    s = load_settings(
        {
            "DATABASE_URL": "postgresql+psycopg://midas:pg-pass-0192@db:5432/m",
            "REDIS_URL": "redis://:redis-pass-7781@redis:6379/0",
            "MIDAS_APP_KEY": "app-key-value-11",
        }
    )
    for text in (repr(s), str(s)):
        assert "pg-pass-0192" not in text and "redis-pass-7781" not in text
        assert "app-key-value-11" not in text
        assert "postgresql+psycopg://midas:***@db:5432/m" in text


def test_a_non_utf8_secret_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"\xff\xfe\x00secret-bytes")
    with pytest.raises(ConfigError, match=r"^MIDAS_APP_KEY_FILE is not UTF-8 text$"):
        load_settings({"MIDAS_APP_KEY_FILE": str(path)})
    line = _one_line(_cli({"MIDAS_APP_KEY_FILE": str(path)}, "runs"))
    assert line == "midas-recon: MIDAS_APP_KEY_FILE is not UTF-8 text"


def test_production_refuses_plain_http_unless_told_why() -> None:
    prod = {"MIDAS_ENV": "production", "MIDAS_API_BASE": "http://midas-proxy.internal:8080"}
    with pytest.raises(ConfigError, match=r"^MIDAS_API_BASE is http:// with MIDAS_ENV=production"):
        load_settings(prod)
    with pytest.raises(ConfigError):
        load_settings({**prod, "MIDAS_ALLOW_PLAIN_HTTP": " "})  # blank is no reason
    allowed = load_settings({**prod, "MIDAS_ALLOW_PLAIN_HTTP": "TLS added by the egress proxy"})
    assert allowed.MIDAS_API_BASE.startswith("http://")
    assert load_settings({**prod, "MIDAS_ENV": "sandbox"}).MIDAS_ENV == "sandbox"
    load_settings({**prod, "MIDAS_API_BASE": "https://api.weixin.qq.com"})


def test_alert_webhooks_register_each_url_and_key_and_never_echo_them() -> None:
    hooks = (
        "wecom=https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wecom-key-0123456789,"
        " slack=https://hooks.slack.com/services/T0001/B0001/slackslackslack01"
        " https://receiver.example.com/hook/generic-key-abcdef"
    )
    s = load_settings({"RECON_ALERT_WEBHOOKS": hooks})
    secrets = s.secret_values()
    for part in ("wecom-key-0123456789", "slackslackslack01", "generic-key-abcdef"):
        assert part in secrets
    assert "services" not in secrets  # a path word is not a key
    with pytest.raises(ConfigError) as info:
        load_settings({"RECON_ALERT_WEBHOOKS": "teams=https://x.example.com/k/secret-abcdefgh"})
    assert "entry 1: unknown format" in str(info.value)
    assert "secret-abcdefgh" not in str(info.value)
    with pytest.raises(ConfigError, match="entry 2: not an http"):
        load_settings({"RECON_ALERT_WEBHOOKS": "https://ok.example.com/a slack=ftp://key-abcdefgh"})
