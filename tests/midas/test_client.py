"""The Midas client: HTTP session, typed errors, token retry, quota pause; then the real thing
against the simulator (v1 and v2, sandbox and production, every error path)."""

from __future__ import annotations

import math
import socket
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import urllib3

from tests.midas.fakes import (
    BASE,
    V1_OK,
    CountingTokens,
    NoLimiter,
    make_client,
)
from worker.config import ConfigError, load_settings
from worker.midas.client import MAX_ANSWER_BYTES, MidasClient, next_minute
from worker.midas.errors import (
    AccountUnobservable,
    ConfigurationError,
    MalformedResponse,
    MidasError,
    MidasTimeout,
    QuotaExhausted,
    QuotaPaused,
    RequestRejected,
    RetryableError,
    TokenError,
)
from worker.midas.token import StableTokenProvider, StaticToken
from worker.simulator import SimConfig, Simulator

# -- unit: the HTTP session ---------------------------------------------------------------------


def test_one_pooled_session_without_urllib3_retries() -> None:
    client = MidasClient(
        base_url=BASE,
        api_version="v1",
        env="sandbox",
        appid="wx",
        offer_id="1",
        app_key="k",
        limiter=NoLimiter(),
        tokens=StaticToken("t"),
        max_in_flight=7,
    )
    for scheme in ("http://x", "https://x"):
        adapter = client.session.get_adapter(scheme)
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        assert adapter._pool_maxsize == 7  # type: ignore[attr-defined]
        retries = adapter.max_retries
        assert retries.total == 0 and retries.connect == 0 and retries.read == 0
        assert not retries.is_retry("POST", 503)


def test_timeout_and_no_redirects_are_passed() -> None:
    client, adapter = make_client("v1")
    client._timeout = (1.5, 1.5)
    client.get_balance("o1")
    kwargs = adapter.kwargs[0]
    assert kwargs["timeout"] == (1.5, 1.5)


def test_from_settings_uses_the_app_key_of_the_environment_and_the_settings() -> None:
    settings = load_settings(
        {
            "MIDAS_API_BASE": "http://127.0.0.1:9",
            "MIDAS_API_VERSION": "v2",
            "MIDAS_ENV": "production",
            "MIDAS_ALLOW_PLAIN_HTTP": "a test server on loopback",
            "MIDAS_OFFER_ID": "99",
            "MIDAS_APP_KEY": "prod-key-xyz",
            "MIDAS_ACCESS_TOKEN": "static-xyz",
            "MIDAS_MAX_IN_FLIGHT": "3",
            "MIDAS_TIMEOUT_S": "2.5",
            "MIDAS_USER_IP": "10.0.0.1",
        }
    )
    client = MidasClient.from_settings(settings, limiter=NoLimiter())
    assert (client.api_version, client.env) == ("v2", "production")
    assert client._app_key == "prod-key-xyz" and client._timeout == (2.5, 2.5)
    assert client._tokens.get() == "static-xyz"  # type: ignore[attr-defined]
    assert client.session.get_adapter("http://x")._pool_maxsize == 3  # type: ignore[attr-defined]
    assert "prod-key-xyz" not in repr(client)


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"MIDAS_OFFER_ID": "1", "MIDAS_ACCESS_TOKEN": "t"}, "MIDAS_APP_KEY"),
        ({"MIDAS_APP_KEY": "k", "MIDAS_ACCESS_TOKEN": "t"}, "MIDAS_OFFER_ID"),
        ({"MIDAS_APP_KEY": "k", "MIDAS_OFFER_ID": "1", "MIDAS_ACCESS_TOKEN": "t"}, "MIDAS_APPID"),
        ({"MIDAS_APP_KEY": "k", "MIDAS_OFFER_ID": "1", "MIDAS_APPID": "wx"}, "MIDAS_APP_SECRET"),
    ],
)
def test_from_settings_names_the_missing_variable(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        MidasClient.from_settings(load_settings(env), limiter=NoLimiter())


def test_v2_does_not_need_an_appid_with_a_static_token() -> None:
    env = {"MIDAS_API_VERSION": "v2", "MIDAS_APP_KEY": "k", "MIDAS_OFFER_ID": "1"}
    env["MIDAS_ACCESS_TOKEN"] = "t"
    assert MidasClient.from_settings(load_settings(env), limiter=NoLimiter()).api_version == "v2"


# -- unit: outcomes ---------------------------------------------------------------------------


def test_ok_v1_and_v2_give_the_same_balance() -> None:
    v1, _ = make_client("v1")
    v2, _ = make_client("v2")
    a = v1.get_balance("o1")
    b = v2.get_balance("o1", session_key="c2s=")
    assert (a.balance, a.gen_balance, a.save_amt, a.save_sum, a.cost_sum, a.present_sum) == (
        b.balance,
        b.gen_balance,
        b.save_amt,
        b.save_sum,
        b.cost_sum,
        b.present_sum,
    )
    assert (a.api_version, b.api_version) == ("v1", "v2")


def test_v2_without_session_key_is_unobservable_without_any_request() -> None:
    limiter = NoLimiter()
    client, adapter = make_client("v2", limiter=limiter)
    with pytest.raises(AccountUnobservable):
        client.get_balance("o1", session_key=None)
    with pytest.raises(AccountUnobservable):
        client.get_balance("o1", session_key="")
    assert adapter.sent == [] and limiter.slots == 0


def test_bad_ids_are_refused_before_any_request() -> None:
    client, adapter = make_client("v1")
    for openid, zone in (("", "1"), ("o", "")):
        with pytest.raises(ValueError, match="non-empty"):
            client.get_balance(openid, zone)
    assert adapter.sent == []


def test_token_error_refreshes_once_and_retries_with_the_new_token() -> None:
    tokens, limiter = CountingTokens(), NoLimiter()
    client, adapter = make_client(
        "v1", {"errcode": 42001, "errmsg": "expired"}, V1_OK, tokens=tokens, limiter=limiter
    )
    assert client.get_balance("o1").balance == 105
    assert tokens.invalidated == ["secret-token-1"]
    queries = [requests.utils.urlparse(r.url).query for r in adapter.sent]
    assert queries == ["access_token=secret-token-1", "access_token=secret-token-2"]
    assert limiter.slots == 2  # the retry took its own slot


@pytest.mark.parametrize("code", [40001, 42001, 40014])
def test_second_token_error_is_raised(code: int) -> None:
    tokens = CountingTokens()
    client, adapter = make_client("v1", {"errcode": code, "errmsg": "bad token"}, tokens=tokens)
    with pytest.raises(TokenError) as info:
        client.get_balance("o1")
    assert info.value.errcode == code
    assert len(adapter.sent) == 2 and tokens.invalidated == ["secret-token-1"]


def test_quota_minute_pauses_every_worker_until_the_next_minute() -> None:
    limiter = NoLimiter()
    client, adapter = make_client("v1", {"errcode": 45011, "errmsg": "quota"}, limiter=limiter)
    before = time.time()
    with pytest.raises(QuotaPaused):
        client.get_balance("o1")
    (until,) = limiter.pauses
    assert until % 60 == 0 and before < until <= before + 60
    assert len(adapter.sent) == 1  # no retry inside the client
    assert next_minute(120.0) == 180.0 and next_minute(179.9) == 180.0


def test_quota_day_stops_without_pause() -> None:
    limiter = NoLimiter()
    client, _ = make_client("v1", {"errcode": 45009, "errmsg": "day"}, limiter=limiter)
    with pytest.raises(QuotaExhausted):
        client.get_balance("o1")
    assert limiter.pauses == []


def _assert_clean(exc: BaseException, *secrets: str) -> None:
    text = str(exc) + repr(exc) + "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in text
    # Raised outside the `except`: no requests exception (with its URL) is chained.
    assert exc.__cause__ is None and exc.__context__ is None


# What requests raises when the read times out while the body streams in.
_READ_TIMEOUT = urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("step", "cls", "text"),
    [
        (requests.ConnectTimeout("timed out"), MidasTimeout, "did not answer in time"),
        (requests.ReadTimeout("timed out"), MidasTimeout, "did not answer in time"),
        (
            requests.ConnectionError(
                "HTTPConnectionPool(host='x', port=1): Max retries exceeded with url: "
                "/cgi-bin/midas/sandbox/getbalance?access_token=static-secret-token "
                "(Caused by NewConnectionError('refused'))"
            ),
            RetryableError,
            "access_token=[REDACTED]",
        ),
        ((500, b"<html>oops</html>"), RetryableError, "HTTP 500"),
        ((502, b""), RetryableError, "HTTP 502"),
        ((503, b""), RetryableError, "HTTP 503"),
        ((429, b""), RetryableError, "HTTP 429"),
        ((404, b"not here"), ConfigurationError, "check MIDAS_API_BASE"),
        ((302, b""), ConfigurationError, "HTTP 302"),
        (
            ("body-error", requests.ConnectionError(_READ_TIMEOUT)),
            MidasTimeout,
            "did not answer in time",
        ),
        (
            ("body-error", requests.exceptions.ChunkedEncodingError("IncompleteRead")),
            MalformedResponse,
            "cut off",
        ),
        (b"x" * (MAX_ANSWER_BYTES + 1), MalformedResponse, "larger than"),
        (b"not json", MalformedResponse, "not JSON"),
    ],
)
def test_transport_failures_are_typed_and_clean(step: Any, cls: type, text: str) -> None:
    client, adapter = make_client("v1", step)
    with pytest.raises(MidasError) as info:
        client.get_balance("o1")
    assert type(info.value) is cls
    assert text in str(info.value)
    assert len(adapter.sent) == 1  # no silent retry
    _assert_clean(info.value, "static-secret-token", "unit-test-appkey-0123456789")


def test_v2_error_meanings_differ_from_v1() -> None:
    v1, _ = make_client("v1", {"errcode": 90016, "errmsg": "x"})
    v2, _ = make_client("v2", {"errcode": 90016, "errmsg": "x"})
    with pytest.raises(MidasError) as one:
        v1.get_balance("o1")
    with pytest.raises(AccountUnobservable) as two:
        v2.get_balance("o1", session_key="k2s=")
    assert not isinstance(one.value, AccountUnobservable)
    assert "session_key expired" in str(two.value)


# -- integration: against the simulator --------------------------------------------------------

SANDBOX_KEY, PROD_KEY = "sim-sandbox-appkey", "sim-prod-appkey"
SESSION_KEY = "c2ltLXNlc3Npb24ta2V5LTE="


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig(timeout_fault_s=5.0)) as s:
        s.add_player("oPlayer", save=1000, present=50, cost=300, session_key=SESSION_KEY)
        s.add_player("oNoSession", save=10)
        yield s


def _client(
    sim: Simulator,
    version: str = "v1",
    env: str = "sandbox",
    *,
    app_key: str | None = None,
    tokens: Any = None,
    limiter: Any = None,
    **kwargs: Any,
) -> MidasClient:
    return MidasClient(
        base_url=sim.base_url,
        api_version=version,  # type: ignore[arg-type]
        env=env,  # type: ignore[arg-type]
        appid=sim.config.appid,
        offer_id=kwargs.pop("offer_id", sim.config.offer_id),
        app_key=app_key or (SANDBOX_KEY if env == "sandbox" else PROD_KEY),
        limiter=limiter or NoLimiter(),
        tokens=tokens or StableTokenProvider(sim.base_url, sim.config.appid, sim.config.app_secret),
        **kwargs,
    )


def _expected(sim: Simulator, openid: str = "oPlayer") -> dict[str, Any]:
    return dict(sim.counters(openid))


@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("env", ["sandbox", "production"])
def test_ok_against_simulator(sim: Simulator, version: str, env: str) -> None:
    with _client(sim, version, env) as client:
        got = client.get_balance("oPlayer", "1", session_key=SESSION_KEY)
    assert {k: v for k, v in got.as_v1_dict().items() if k != "api_version"} == _expected(sim)
    assert got.api_version == version
    path = (
        "/wxa/game/getbalance"
        if version == "v2"
        else (
            "/cgi-bin/midas/sandbox/getbalance" if env == "sandbox" else "/cgi-bin/midas/getbalance"
        )
    )
    assert sim.stats()["by_path"][path] == 1


@pytest.mark.integration
def test_counters_follow_moves(sim: Simulator) -> None:
    client = _client(sim, "v1")
    before = client.get_balance("oPlayer")
    sim.pay("oPlayer", "1", 100, "bill-1")
    sim.present("oPlayer", "1", 7, "bill-2")
    after = client.get_balance("oPlayer")
    assert after.balance == before.balance - 100 + 7
    assert after.cost_sum == before.cost_sum + 100
    assert after.present_sum == before.present_sum + 7


@pytest.mark.integration
def test_v1_mp_sig_accepted_and_stale_or_missing_sessions(sim: Simulator) -> None:
    client = _client(sim, "v1", send_mp_sig=True)
    assert client.get_balance("oPlayer", session_key=SESSION_KEY).balance == 750
    # An account without a known key is sent without mp_sig: still observable in v1.
    assert client.get_balance("oNoSession", session_key=None).balance == 10
    sim.set_session("oPlayer", "1", "bmV3ZXIta2V5LWFmdGVyLWxvZ2lu")  # a newer login
    with pytest.raises(AccountUnobservable) as stale:
        client.get_balance("oPlayer", session_key=SESSION_KEY)
    assert stale.value.errcode == 90009
    sim.expire_session("oPlayer")
    with pytest.raises(AccountUnobservable) as expired:
        client.get_balance("oPlayer", session_key=SESSION_KEY)
    assert expired.value.errcode == 90010


@pytest.mark.integration
def test_v2_expired_and_stale_sessions_are_unobservable(sim: Simulator) -> None:
    client = _client(sim, "v2")
    with pytest.raises(AccountUnobservable) as expired:
        client.get_balance("oNoSession", session_key="c29tZS1vbGQta2V5")
    assert expired.value.errcode == 90016
    with pytest.raises(AccountUnobservable) as stale:
        client.get_balance("oPlayer", session_key="bm90LXRoZS1jdXJyZW50LWtleQ==")
    assert stale.value.errcode == 90010


@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_wrong_app_key_is_a_configuration_error(sim: Simulator, version: str) -> None:
    # The production key on the sandbox: sig/pay_sig wrong, every call would fail alike.
    client = _client(sim, version, "sandbox", app_key=PROD_KEY)
    with pytest.raises(ConfigurationError) as info:
        client.get_balance("oPlayer", session_key=SESSION_KEY)
    assert info.value.errcode == 90011
    assert ("pay_sig" if version == "v2" else "sig wrong") in str(info.value)


@pytest.mark.integration
def test_wrong_offer_id_is_a_configuration_error(sim: Simulator) -> None:
    with pytest.raises(ConfigurationError) as info:
        _client(sim, "v1", offer_id="999").get_balance("oPlayer")
    assert info.value.errcode == 90017


@pytest.mark.integration
def test_bad_parameters_are_rejected_requests(sim: Simulator) -> None:
    # v2 requires a non-empty user_ip: an empty MIDAS_USER_IP is answered 90018.
    client = _client(sim, "v2", user_ip="")
    with pytest.raises(RequestRejected) as info:
        client.get_balance("oPlayer", session_key=SESSION_KEY)
    assert info.value.errcode == 90018 and "bad parameters" in str(info.value)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "cls", "errcode"),
    [
        ("minus1", RetryableError, -1),
        ("quota_minute", QuotaPaused, 45011),
        ("quota_day", QuotaExhausted, 45009),
        ("http500", RetryableError, None),
        ("malformed_json", MalformedResponse, None),
        ("truncated", MalformedResponse, None),
        ("wrong_types", MalformedResponse, None),
        ("negative", MalformedResponse, None),
        ("huge", MalformedResponse, None),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_injected_faults_map_to_typed_errors(
    sim: Simulator, version: str, kind: str, cls: type, errcode: int | None
) -> None:
    limiter = NoLimiter()
    client = _client(sim, version, limiter=limiter)
    client.get_balance("oPlayer", session_key=SESSION_KEY)  # warm: token fetched
    sim.inject(kind)
    with pytest.raises(MidasError) as info:
        client.get_balance("oPlayer", session_key=SESSION_KEY)
    assert type(info.value) is cls and info.value.errcode == errcode
    assert bool(limiter.pauses) == (kind == "quota_minute")
    # The fault was one answer: the next call is fine, and nothing half-filled was returned.
    assert client.get_balance("oPlayer", session_key=SESSION_KEY).balance == 750


@pytest.mark.integration
def test_timeout_is_midas_timeout(sim: Simulator) -> None:
    client = _client(sim, "v1", timeout_s=0.3)
    client.get_balance("oPlayer")
    sim.inject("timeout")
    started = time.monotonic()
    with pytest.raises(MidasTimeout):
        client.get_balance("oPlayer")
    assert time.monotonic() - started < 3


@pytest.mark.integration
def test_connection_refused_is_retryable_and_has_no_token() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = MidasClient(
        base_url=f"http://127.0.0.1:{port}",
        api_version="v1",
        env="sandbox",
        appid="wx",
        offer_id="1",
        app_key="refused-appkey-1234",
        limiter=NoLimiter(),
        tokens=StaticToken("refused-token-abcdef"),
        timeout_s=1,
    )
    with pytest.raises(RetryableError) as info:
        client.get_balance("o1")
    assert type(info.value) is RetryableError
    _assert_clean(info.value, "refused-token-abcdef", "refused-appkey-1234")


@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_token_refresh_on_42001_then_success(sim: Simulator, version: str) -> None:
    client = _client(sim, version)
    client.get_balance("oPlayer", session_key=SESSION_KEY)
    calls = sim.stats()["token_calls"]
    sim.expire_tokens()  # every token issued so far now answers 42001
    assert client.get_balance("oPlayer", session_key=SESSION_KEY).balance == 750
    stats = sim.stats()
    assert stats["token_calls"] == calls + 1
    assert stats["by_errcode"][42001] == 1
    assert stats["force_refresh_calls"] == 0


@pytest.mark.integration
def test_injected_token_expiry_retries_once(sim: Simulator) -> None:
    client = _client(sim, "v1")
    sim.inject("token_expired", count=1)
    assert client.get_balance("oPlayer").balance == 750
    sim.inject("token_expired", count=2)
    with pytest.raises(TokenError) as info:
        client.get_balance("oPlayer")
    assert info.value.errcode == 42001


@pytest.mark.integration
def test_unknown_static_token_fails_after_one_retry(sim: Simulator) -> None:
    client = _client(sim, "v1", tokens=StaticToken("not-a-token-the-sim-issued"))
    with pytest.raises(TokenError) as info:
        client.get_balance("oPlayer")
    assert info.value.errcode == 40001
    assert sim.stats()["by_errcode"][40001] == 2


@pytest.mark.integration
def test_simulator_rate_limit_answers_45011_and_pauses(sim: Simulator) -> None:
    sim.configure(rate_limit=2)
    limiter = NoLimiter()
    client = _client(sim, "v1", limiter=limiter)
    with pytest.raises(QuotaPaused):
        for _ in range(10):
            client.get_balance("oPlayer")
    assert len(limiter.pauses) == 1 and math.isclose(limiter.pauses[0] % 60, 0)


@pytest.mark.integration
def test_concurrent_calls_reuse_pooled_connections(sim: Simulator) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = _client(sim, "v1", max_in_flight=4)
    client.get_balance("oPlayer")
    before = sim.stats()["connections"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.get_balance("oPlayer").balance, range(40)))
    assert results == [750] * 40
    # Keep-alive: 40 requests over at most 4 (+1 token) new connections, not 40.
    assert sim.stats()["connections"] - before <= 5
