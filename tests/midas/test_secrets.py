"""No secret used here (AppKeys, app secret, access tokens, session keys) appears in any log
line or in any exception's str, repr or traceback, on any path through the client."""

from __future__ import annotations

import io
import logging
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

from tests.midas.fakes import NoLimiter
from worker.db.crypto import SessionKeyCipher
from worker.logs import JsonFormatter, RedactionFilter
from worker.midas.client import MidasClient
from worker.midas.errors import MidasError
from worker.midas.token import StableTokenProvider, StaticToken
from worker.simulator import SimConfig, Simulator

CONFIG = SimConfig(
    app_secret="secret-app-secret-9f8e7d",
    app_key_sandbox="secret-sandbox-appkey-1a2b3c",
    app_key_production="secret-prod-appkey-4d5e6f",
    timeout_fault_s=3.0,
)
SESSION_KEYS = ["U0VDUkVULXNlc3Npb24ta2V5LTE=", "U0VDUkVULXNlc3Npb24ta2V5LTI="]
WRONG_SESSION_KEY = "U0VDUkVULXdyb25nLWtleS0zMw=="


class _Collector:
    """Everything that could leak: log lines (raw and formatted) and exception texts."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.errors: list[MidasError] = []

    def run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except MidasError as exc:
            self.errors.append(exc)
            self.texts += [str(exc), repr(exc), exc.errmsg]
            self.texts.append("".join(traceback.format_exception(exc)))


class _RawFormatter(logging.Formatter):
    """Every attribute of the record as it was logged, and its traceback, unredacted."""

    def format(self, record: logging.LogRecord) -> str:
        text = repr(record.__dict__) + " " + record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception(record.exc_info[1]))
        return text


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """(our JSON handler's output, raw lines of the project's own loggers)."""
    caplog.set_level(logging.DEBUG)
    # configure_logging (run by an earlier test, or a CLI invoked in-process) leaves urllib3
    # at WARNING for the session; its DEBUG lines, which carry the query string, are the
    # witnesses here.
    caplog.set_level(logging.DEBUG, logger="urllib3")
    caplog.handler.addFilter(RedactionFilter())
    formatted, raw = io.StringIO(), io.StringIO()
    ours = logging.StreamHandler(formatted)
    ours.setFormatter(JsonFormatter())
    ours.addFilter(RedactionFilter())
    # On the `worker` logger a plain handler sees our records before any redaction: the
    # project's own code must not log a secret in the first place.
    unfiltered = logging.StreamHandler(raw)
    unfiltered.setFormatter(_RawFormatter())
    root, worker = logging.getLogger(), logging.getLogger("worker")
    root.addHandler(ours)
    worker.addHandler(unfiltered)
    yield formatted, raw
    root.removeHandler(ours)
    worker.removeHandler(unfiltered)


@pytest.mark.integration
def test_no_secret_on_any_error_path(
    logs: tuple[io.StringIO, io.StringIO], caplog: pytest.LogCaptureFixture, redis_url: str
) -> None:
    formatted, raw = logs
    seen = _Collector()
    tokens_seen: set[str] = set()

    with Simulator(CONFIG) as sim:
        sim.add_player("oSecrets", save=500, present=20, cost=40, session_key=SESSION_KEYS[0])
        sim.add_player("oExpired", save=5)

        def provider() -> StableTokenProvider:
            return StableTokenProvider(
                sim.base_url,
                CONFIG.appid,
                CONFIG.app_secret,
                redis=redis.Redis.from_url(redis_url),
                sealer=SessionKeyCipher([Fernet.generate_key().decode()]),
                timeout_s=1.0,
            )

        def client(version: str, env: str = "sandbox", **kw: Any) -> MidasClient:
            key = CONFIG.app_key(env) if "app_key" not in kw else kw.pop("app_key")
            return MidasClient(
                base_url=kw.pop("base_url", sim.base_url),
                api_version=version,  # type: ignore[arg-type]
                env=env,  # type: ignore[arg-type]
                appid=CONFIG.appid,
                offer_id=CONFIG.offer_id,
                app_key=key,
                limiter=NoLimiter(),
                tokens=kw.pop("tokens", None) or provider(),
                timeout_s=1.0,
                **kw,
            )

        for version in ("v1", "v2"):
            for env in ("sandbox", "production"):
                c = client(version, env, send_mp_sig=True)
                seen.run(lambda c=c: c.get_balance("oSecrets", session_key=SESSION_KEYS[0]))
                tokens_seen.add(c._tokens.get())  # type: ignore[attr-defined]
                for kind in (
                    "minus1",
                    "timeout",
                    "http500",
                    "malformed_json",
                    "truncated",
                    "wrong_types",
                    "negative",
                    "huge",
                    "quota_minute",
                    "quota_day",
                    "token_expired",
                ):
                    sim.inject(kind)
                    seen.run(lambda c=c: c.get_balance("oSecrets", session_key=SESSION_KEYS[0]))
                sim.inject("token_expired", count=2)
                seen.run(lambda c=c: c.get_balance("oSecrets", session_key=SESSION_KEYS[0]))
                # Stale, wrong and missing session keys.
                seen.run(lambda c=c: c.get_balance("oSecrets", session_key=WRONG_SESSION_KEY))
                seen.run(lambda c=c: c.get_balance("oExpired", session_key=SESSION_KEYS[1]))
                seen.run(lambda c=c: c.get_balance("oExpired", session_key=None))
                # The other environment's AppKey: sig / pay_sig wrong.
                other = "production" if env == "sandbox" else "sandbox"
                bad = client(version, env, app_key=CONFIG.app_key(other))
                seen.run(lambda b=bad: b.get_balance("oSecrets", session_key=SESSION_KEYS[0]))
            # Expired tokens, refreshed, then a token nobody issued.
            sim.expire_tokens()
            c = client(version)
            seen.run(lambda c=c: c.get_balance("oSecrets", session_key=SESSION_KEYS[0]))
            tokens_seen.add(c._tokens.get())  # type: ignore[attr-defined]
            fake = client(version, tokens=StaticToken("secret-static-token-never-issued"))
            seen.run(lambda f=fake: f.get_balance("oSecrets", session_key=SESSION_KEYS[0]))

        # A wrong app secret: stable_token refuses.
        wrong = StableTokenProvider(sim.base_url, CONFIG.appid, "secret-wrong-app-secret-00")
        c = client("v1", tokens=wrong)
        seen.run(lambda: c.get_balance("oSecrets"))
        sim.set_session("oSecrets", "1", SESSION_KEYS[1])  # a newer login: the old key is stale
        c = client("v1", send_mp_sig=True)
        seen.run(lambda: c.get_balance("oSecrets", session_key=SESSION_KEYS[0]))

    # Nothing listens any more: connection refused, for the token and for getbalance.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    gone = client("v1", base_url=dead, tokens=StaticToken("secret-static-token-dead-host"))
    seen.run(lambda: gone.get_balance("oSecrets"))
    gone_token = StableTokenProvider(dead, CONFIG.appid, CONFIG.app_secret, timeout_s=0.5)
    seen.run(lambda: client("v1", base_url=dead, tokens=gone_token).get_balance("oSecrets"))

    secrets = [
        CONFIG.app_secret,
        CONFIG.app_key_sandbox,
        CONFIG.app_key_production,
        "secret-wrong-app-secret-00",
        "secret-static-token-never-issued",
        "secret-static-token-dead-host",
        WRONG_SESSION_KEY,
        *SESSION_KEYS,
        *tokens_seen,
    ]
    assert len(tokens_seen) >= 2  # tokens were issued and rotated
    kinds = {type(e).__name__ for e in seen.errors}
    assert kinds >= {
        "RetryableError",
        "MidasTimeout",
        "MalformedResponse",
        "QuotaPaused",
        "QuotaExhausted",
        "TokenError",
        "AccountUnobservable",
        "ConfigurationError",
    }
    outputs = {
        "exceptions": "\n".join(seen.texts),
        "json log": formatted.getvalue(),
        "caplog": caplog.text,
        "raw project log": raw.getvalue(),
    }
    assert outputs["json log"] and outputs["raw project log"]
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {where}"
    # urllib3 logs request lines with the query string at DEBUG: they were caught, redacted.
    assert "access_token=[REDACTED]" in outputs["json log"]
