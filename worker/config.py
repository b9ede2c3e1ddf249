"""One typed settings object, read from the environment (PRODUCT.md §2).

Secrets may come from `NAME_FILE` (a path) instead of `NAME`, as docker and Kubernetes secrets
do. Any bad value fails with one line naming the variable and never echoes the value.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.business_calendar import BusinessCalendar, hh_mm

# Variables that hold credentials: they accept a `_FILE` twin and are never echoed.
SECRET_VARIABLES = (
    "MIDAS_APP_SECRET",
    "MIDAS_APP_KEY",
    "MIDAS_ACCESS_TOKEN",
    "SESSION_KEY_ENCRYPTION_KEY",
    "RECON_WEB_SESSION_SECRET",
    "SESSION_KEY_TRANSPORT_KEY",
    # Webhook URLs carry their bot's key (WeCom `?key=`, Feishu and Slack in the path).
    "RECON_ALERT_WEBHOOKS",
    # Passwords put into DATABASE_URL / REDIS_URL at load time, so that the URLs can stay in
    # plain configuration and the passwords in secret files (docker compose `secrets:`).
    "DATABASE_PASSWORD",
    "REDIS_PASSWORD",
)

# DATABASE_URL dialects the project runs on (the embedded default and production).
_DATABASE_DIALECTS = ("sqlite", "postgresql")
_REDIS_SCHEMES = ("redis", "rediss", "unix")

# Shorter "secrets" are refused in production, and log redaction ignores shorter strings.
MIN_SECRET_LENGTH = 8

# Values people leave in example files; refused outside the sandbox environment.
_PLACEHOLDERS = re.compile(r"^(|changeme|change-me|secret|xxx+|todo|placeholder|example)$", re.I)


class ConfigError(Exception):
    """A setting is missing or wrong; the message is one line that names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    DATABASE_URL: str = "sqlite:///midas_recon.db"
    REDIS_URL: str | None = None
    DATABASE_PASSWORD: SecretStr | None = None
    REDIS_PASSWORD: SecretStr | None = None

    MIDAS_API_BASE: str = "https://api.weixin.qq.com"
    MIDAS_API_VERSION: Literal["v1", "v2"] = "v1"
    MIDAS_ENV: Literal["sandbox", "production"] = "sandbox"
    # In production a plain http:// MIDAS_API_BASE is refused (the app secret and the access
    # token would cross the network in clear) unless this says why it is safe, e.g. "TLS is
    # added by the egress proxy on localhost". Logged at start; empty = not allowed.
    MIDAS_ALLOW_PLAIN_HTTP: str | None = None
    MIDAS_APPID: str | None = None
    MIDAS_APP_SECRET: SecretStr | None = None
    MIDAS_OFFER_ID: str | None = None
    MIDAS_APP_KEY: SecretStr | None = None
    MIDAS_USER_IP: str = "127.0.0.1"
    MIDAS_SEND_MP_SIG: bool = False
    MIDAS_ACCESS_TOKEN: SecretStr | None = None
    MIDAS_RATE_LIMIT: float = Field(50.0, gt=0, le=100_000)
    MIDAS_MAX_IN_FLIGHT: int = Field(32, ge=1, le=10_000)
    # Seconds of spread the limiter leaves for the delay between a grant and its arrival at
    # Midas; the schedule runs at rate / (1 + margin) of the limit (limiter.py explains).
    # 20 ms reached 98% of the limit on a quiet host but let 101 through at 100/s on a busy
    # VM whose threads woke up to 10 ms late; 50 ms held there. Safety over 3% of quota.
    # Issue 14, counted by the kernel's receive time (docs/benchmarks.md §1): 20 ms let 101
    # through at 100/s (a worker stalled 63 ms between the limiter's check and its socket
    # write); 30 ms held in every run but gave 0.966-0.971 of the limit, no better than the
    # goal, and would not have absorbed a 31 ms stall of the same runs. The default stays.
    MIDAS_RATE_MARGIN_S: float = Field(0.05, ge=0, le=0.5)
    MIDAS_TIMEOUT_S: float = Field(5.0, gt=0, le=120)

    RECON_TIMEZONE: str = "Asia/Shanghai"
    RECON_NIGHTLY_AT: str = "02:30"
    # Local time by which the nightly run should be complete (the next day when not later).
    RECON_NIGHTLY_DEADLINE: str = "08:00"
    # How far the game's clock may run ahead of or behind ours (worker/business_calendar.py):
    # intake refuses ledger rows dated further ahead, and a difference is not confirmed while
    # the account has ledger rows this close to (or after) the confirming fetch.
    RECON_CLOCK_SKEW_SECONDS: int = Field(120, ge=0, le=3600)
    RECON_SETTLE_SECONDS: int = Field(300, ge=0, le=86_400)
    RECON_ACTIVE_DAYS: int = Field(30, ge=1, le=3650)
    # Every active account is observed at least this often; the nightly says when the rate
    # and the window make it impossible (worker/recon/coverage.py).
    RECON_FULL_COVERAGE_DAYS: int = Field(7, ge=1, le=365)
    # Share of the rate a nightly leaves to rechecks and the confirm pass (their fast lane):
    # the night's capacity is planned on the rest.
    RECON_FAST_LANE_SHARE: float = Field(0.05, ge=0, lt=1)
    # JSON mapping of the comparison checks (worker/recon/rules.py); unset = PRODUCT.md §5.
    RECON_CHECKS: str | None = None

    SESSION_KEY_ENCRYPTION_KEY: SecretStr | None = None
    # Fernet key(s), newest first, shared with the game server, which seals each session key
    # with the first before sending `record_login` (worker/intake.py): the broker, Flower,
    # `celery events` and the worker's log only ever see the sealed value.
    SESSION_KEY_TRANSPORT_KEY: SecretStr | None = None

    # The operators' console (worker/web). Signs its session cookies; unset = a random key
    # per server process (everyone logs in again after a restart).
    RECON_WEB_SESSION_SECRET: SecretStr | None = None
    # Single sign-on: the request header a reverse proxy puts the operator's name in, honoured
    # only from RECON_WEB_TRUSTED_PROXIES (comma-separated addresses or networks).
    RECON_WEB_AUTH_HEADER: str | None = None
    RECON_WEB_TRUSTED_PROXIES: str | None = None

    # Where alerts go (worker/alerts/targets.py): `FORMAT=URL` entries, comma-separated.
    RECON_ALERT_WEBHOOKS: SecretStr | None = None
    # The operators' console, for links in alerts (e.g. https://recon.example.com); unset =
    # no links.
    RECON_WEB_BASE_URL: str | None = None
    # An alert when the fleet was paused by 45011 more than this many times within an hour.
    RECON_ALERT_PAUSE_STORM: int = Field(5, ge=1, le=1000)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, *args, **kwargs):  # type: ignore[no-untyped-def]
        # `load_settings` reads the environment itself (to resolve `_FILE` twins), so only the
        # values it passes count; this keeps tests that pass their own environ hermetic.
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _passwords_into_urls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for url_name, password_name in (
            ("DATABASE_URL", "DATABASE_PASSWORD"),
            ("REDIS_URL", "REDIS_PASSWORD"),
        ):
            url, password = data.get(url_name), data.get(password_name)
            if isinstance(password, SecretStr):
                password = password.get_secret_value()
            if not url or not isinstance(password, str) or not password.strip():
                continue
            if not urlsplit(url).hostname:  # SQLite: a file, no password to give
                continue
            if _url_password(url):
                raise ValueError(f"{url_name} has a password and {password_name} is set; use one")
            data = {**data, url_name: _with_password(url, password.strip())}
        return data

    @field_validator("MIDAS_API_BASE")
    @classmethod
    def _base_is_http(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    @field_validator("DATABASE_URL")
    @classmethod
    def _database_url(cls, v: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        # Messages never quote the URL: it may hold the password.
        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql+psycopg://...)") from None
        except ValueError:
            raise ValueError("the port is not a number") from None
        if url.get_backend_name() not in _DATABASE_DIALECTS:
            raise ValueError(
                "only sqlite:/// and postgresql+psycopg:// URLs are supported, not "
                f"{url.get_backend_name()!r}"
            )
        _refuse_unencoded_at(url.host)
        return v

    @field_validator("REDIS_URL")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  (parses the port; a non-number raises)
        except ValueError:
            raise ValueError("the port is not a number") from None
        if parts.scheme not in _REDIS_SCHEMES:
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        # (redis-py splits the authority at its last @: an unencoded @ in the password works.)
        return v

    @field_validator("RECON_TIMEZONE")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("unknown time zone") from exc
        return v

    @field_validator("RECON_NIGHTLY_AT", "RECON_NIGHTLY_DEADLINE")
    @classmethod
    def _hh_mm(cls, v: str) -> str:
        m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", v.strip())
        if not m:
            raise ValueError("must be HH:MM (24-hour)")
        return f"{int(m.group(1)):02d}:{m.group(2)}"

    @field_validator("MIDAS_ALLOW_PLAIN_HTTP")
    @classmethod
    def _blank_is_no_reason(cls, v: str | None) -> str | None:
        return v.strip() or None if v else None

    @field_validator("RECON_WEB_BASE_URL")
    @classmethod
    def _web_base(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be an http(s) URL")
        return v.rstrip("/")

    @field_validator("RECON_ALERT_WEBHOOKS")
    @classmethod
    def _webhooks_parse(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None:
            return None
        from worker.alerts.targets import parse_targets  # a leaf module, no settings import

        parse_targets(v.get_secret_value())  # its ValueError never quotes a URL
        return v

    @field_validator("MIDAS_APPID", "MIDAS_OFFER_ID", "RECON_WEB_AUTH_HEADER")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("RECON_WEB_AUTH_HEADER")
    @classmethod
    def _header_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", v):
            raise ValueError("must be an HTTP header name (letters, digits and -)")
        return v

    @field_validator("RECON_WEB_TRUSTED_PROXIES")
    @classmethod
    def _networks(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        for part in v.split(","):
            try:
                ip_network(part.strip(), strict=False)
            except ValueError:
                raise ValueError("must be comma-separated IP addresses or networks") from None
        return v

    @field_validator(*SECRET_VARIABLES, mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, v: object) -> object:
        # `MIDAS_ACCESS_TOKEN=` in an env file means "not set", not "an empty token".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("RECON_CHECKS")
    @classmethod
    def _checks_parse(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from worker.checks import parse_checks

        parse_checks(v)  # a ValueError names what is wrong; load_settings adds the variable
        return v

    def __repr_args__(self) -> Any:
        # SecretStr fields show as '**********'; the URLs' passwords are secrets too.
        for name, value in super().__repr_args__():
            if name in ("DATABASE_URL", "REDIS_URL") and isinstance(value, str):
                value = mask_url_password(value)
            yield name, value

    # -- derived values ---------------------------------------------------------------------

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.RECON_TIMEZONE)

    @property
    def calendar(self) -> BusinessCalendar:
        """Business dates, day bounds, the nightly's times and the tolerated clock skew."""
        return BusinessCalendar(
            tz=ZoneInfo(self.RECON_TIMEZONE),
            nightly_at=hh_mm(self.RECON_NIGHTLY_AT),
            deadline=hh_mm(self.RECON_NIGHTLY_DEADLINE),
            skew=timedelta(seconds=self.RECON_CLOCK_SKEW_SECONDS),
        )

    @property
    def trusted_proxies(self) -> list[IPv4Network | IPv6Network]:
        raw = self.RECON_WEB_TRUSTED_PROXIES or ""
        return [ip_network(p.strip(), strict=False) for p in raw.split(",") if p.strip()]

    @property
    def embedded(self) -> bool:
        """No Redis: in-process queue and limiter, one machine (PRODUCT.md §10)."""
        return self.REDIS_URL is None

    def secret_values(self) -> list[str]:
        """Every secret in clear, for log redaction. Never print this."""
        out: list[str] = []
        for name in SECRET_VARIABLES:
            value = getattr(self, name)
            if name == "RECON_ALERT_WEBHOOKS":
                continue  # below: each URL and each key inside it
            if value is not None and value.get_secret_value():
                out.extend(v.strip() for v in value.get_secret_value().split(",") if v.strip())
        if self.RECON_ALERT_WEBHOOKS is not None:
            from worker.alerts.targets import parse_targets, secret_parts

            for target in parse_targets(self.RECON_ALERT_WEBHOOKS.get_secret_value()):
                out.extend(secret_parts(target.url))
        # Passwords inside the database and Redis URLs are credentials too.
        for url in (self.DATABASE_URL, self.REDIS_URL):
            password = _url_password(url)
            if password:
                out.append(password)
        return out

    def require(self, *names: str) -> None:
        """Fail with one line if a setting a command needs is unset or a placeholder."""
        for name in names:
            value = getattr(self, name)
            raw = value.get_secret_value() if isinstance(value, SecretStr) else value
            if raw is None or raw == "":
                raise ConfigError(f"{name} is not set")
            if name in SECRET_VARIABLES and self.MIDAS_ENV == "production":
                if _PLACEHOLDERS.match(str(raw).strip()):
                    raise ConfigError(f"{name} holds a placeholder value; set the real secret")
                if len(str(raw).strip()) < MIN_SECRET_LENGTH:
                    # Real keys are 24+ characters; a short one is a mistake, and log
                    # redaction (worker.logs) skips strings this short.
                    raise ConfigError(f"{name} is too short to be a real secret")

    def client_requirements(self) -> list[str]:
        """The settings the Midas client signs and sends with."""
        needed = ["MIDAS_OFFER_ID", "MIDAS_APP_KEY"]
        if self.MIDAS_API_VERSION == "v1":
            needed.append("MIDAS_APPID")  # v1 puts appid in the signed body
        return needed

    def token_requirements(self) -> list[str]:
        """A fixed access token, or what stable_token needs to fetch one (and, to share it
        through Redis, the key that seals it there)."""
        if self.MIDAS_ACCESS_TOKEN is not None:
            return ["MIDAS_ACCESS_TOKEN"]
        if self.REDIS_URL is not None:
            return ["MIDAS_APPID", "MIDAS_APP_SECRET", "SESSION_KEY_ENCRYPTION_KEY"]
        return ["MIDAS_APPID", "MIDAS_APP_SECRET"]

    @property
    def midas_over_plain_http(self) -> bool:
        return urlsplit(self.MIDAS_API_BASE).scheme == "http"

    def refuse_plain_http(self) -> None:
        """Production talks to Midas over TLS only, unless MIDAS_ALLOW_PLAIN_HTTP says why."""
        plain = self.midas_over_plain_http
        if plain and self.MIDAS_ENV == "production" and not self.MIDAS_ALLOW_PLAIN_HTTP:
            raise ConfigError(
                "MIDAS_API_BASE is http:// with MIDAS_ENV=production: the app secret and the "
                "access token would travel unencrypted; use https://, or set "
                "MIDAS_ALLOW_PLAIN_HTTP to the reason plain HTTP is safe here"
            )

    def check_production_start(self) -> None:
        """In production a worker or beat refuses to start without the secrets its tasks will
        need (one line naming the variable), instead of failing the run at its first batch."""
        if self.MIDAS_ENV != "production":
            return
        names = self.client_requirements() + self.token_requirements()
        if self.MIDAS_API_VERSION == "v2" or self.MIDAS_SEND_MP_SIG:
            # Session keys are signed with: stored encrypted, and sent by the game sealed.
            names += ["SESSION_KEY_ENCRYPTION_KEY", "SESSION_KEY_TRANSPORT_KEY"]
        self.refuse_plain_http()
        self.require(*dict.fromkeys(names))


def mask_url_password(url: str) -> str:
    """`url` with its password (if any) replaced by ***, for messages and repr."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    # Everything before the last @ of the authority is user:password, whatever it holds.
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _refuse_unencoded_at(host: str | None) -> None:
    # `user:p@ss@host`: SQLAlchemy takes "ss@host" as the host, and the driver's connection
    # error would then print the tail of the password.
    if host and "@" in host:
        raise ValueError("the password holds an unencoded @; write it as %40")


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return unquote(urlsplit(url).password or "") or None
    except ValueError:  # an unparsable URL fails elsewhere, with the variable's name
        return None


def _with_password(url: str, password: str) -> str:
    """`url` with `password` in its user info (URL-encoded; the user name kept)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = quote(unquote(parts.username or ""), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _read_secret_files(environ: dict[str, str]) -> dict[str, str]:
    """Resolve `NAME_FILE` into `NAME`; both set is ambiguous and refused."""
    resolved = dict(environ)
    for name in SECRET_VARIABLES:
        path = environ.get(f"{name}_FILE")
        if not path:
            continue
        if environ.get(name):
            raise ConfigError(f"{name} and {name}_FILE are both set; use one")
        try:
            resolved[name] = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}_FILE is not UTF-8 text") from None
    return resolved


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from `environ` (default: the process environment)."""
    env = _read_secret_files(dict(os.environ if environ is None else environ))
    known = {k: v for k, v in env.items() if k in Settings.model_fields}
    try:
        settings = Settings(**known)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "configuration"
        # pydantic's message never includes the input when we only take `msg`.
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}") from None
    settings.refuse_plain_http()
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing env."""
    return load_settings()
