"""Access tokens: static, and stable_token cached in memory or Redis, refreshed by one process
at a time (no stampede), compare-and-refresh on invalidation, never force_refresh."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests
from cryptography.fernet import Fernet
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.midas.fakes import ScriptedAdapter
from worker.config import ConfigError, load_settings
from worker.db.crypto import SessionKeyCipher
from worker.midas.errors import ConfigurationError, MalformedResponse, MidasTimeout, RetryableError
from worker.midas.token import StableTokenProvider, StaticToken, make_token_provider
from worker.simulator import SimConfig, Simulator

APPID, SECRET = "wxsim0000000000", "sim-app-secret"
# Seals the token cached in Redis; fixed, so that the test's other processes share it.
SEALER_KEY = "hA424ciJo0a25hWD-jkEtjEisONI9bBXBzcYNRmVbTk="
SEALER = SessionKeyCipher([SEALER_KEY])


def _provider(
    *steps: Any, redis_client: redis.Redis | None = None, **kwargs: Any
) -> tuple[StableTokenProvider, ScriptedAdapter]:
    session = requests.Session()
    adapter = ScriptedAdapter(*steps)
    session.mount("http://tok.test", adapter)
    provider = StableTokenProvider(
        "http://tok.test",
        APPID,
        SECRET,
        redis=redis_client,
        sealer=SEALER if redis_client is not None else None,
        session=session,
        **kwargs,
    )
    return provider, adapter


def _token(value: str, expires_in: int = 7200) -> dict[str, Any]:
    return {"access_token": value, "expires_in": expires_in}


# -- static ------------------------------------------------------------------------------------


def test_static_token_is_returned_as_is_and_never_shown() -> None:
    token = StaticToken("central-service-token")
    assert token.get() == "central-service-token"
    token.invalidate("central-service-token")  # nothing to refresh
    assert token.get() == "central-service-token"
    assert "central-service-token" not in repr(token)


def test_make_token_provider_choice(redis_url: str) -> None:
    static = make_token_provider(load_settings({"MIDAS_ACCESS_TOKEN": "static-abcdef"}))
    assert isinstance(static, StaticToken)
    env = {"MIDAS_APPID": APPID, "MIDAS_APP_SECRET": SECRET}
    stable = make_token_provider(load_settings(env))
    assert isinstance(stable, StableTokenProvider)
    assert type(stable._store).__name__ == "_MemoryStore"
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY is not set; it seals"):
        make_token_provider(load_settings({**env, "REDIS_URL": redis_url}))  # cannot seal it
    sealing = {**env, "REDIS_URL": redis_url, "SESSION_KEY_ENCRYPTION_KEY": SEALER_KEY}
    shared = make_token_provider(load_settings(sealing))
    assert type(shared._store).__name__ == "_RedisStore"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="MIDAS_APP_SECRET"):
        make_token_provider(load_settings({"MIDAS_APPID": APPID}))
    # An empty MIDAS_ACCESS_TOKEN= in an env file means "use stable_token".
    assert isinstance(
        make_token_provider(load_settings({**env, "MIDAS_ACCESS_TOKEN": ""})), StableTokenProvider
    )


# -- stable_token, unit ------------------------------------------------------------------------


def test_stable_token_request_and_cache() -> None:
    provider, adapter = _provider(_token("tok-aaaaaaaa"))
    assert provider.get() == "tok-aaaaaaaa"
    assert provider.get() == "tok-aaaaaaaa"
    (req,) = adapter.sent
    assert req.method == "POST" and req.url == "http://tok.test/cgi-bin/stable_token"
    assert json.loads(req.body) == {  # type: ignore[arg-type]
        "grant_type": "client_credential",
        "appid": APPID,
        "secret": SECRET,
    }  # and never force_refresh


def test_refresh_ahead_of_expiry() -> None:
    # A 2 s token is refreshed half-way (a short life caps the margin at ttl / 2).
    provider, adapter = _provider(_token("tok-first-1", 2), _token("tok-second-2", 7200))
    assert provider.get() == "tok-first-1"
    assert provider.get() == "tok-first-1"
    time.sleep(1.1)
    assert provider.get() == "tok-second-2"
    assert len(adapter.sent) == 2


def test_invalidate_is_compare_and_refresh() -> None:
    provider, adapter = _provider(_token("tok-one-111"), _token("tok-two-222"))
    provider.get()
    provider.invalidate("some-older-token")  # the cache has moved on already: no call
    assert len(adapter.sent) == 1
    provider.invalidate("tok-one-111")
    assert len(adapter.sent) == 2 and provider.get() == "tok-two-222"
    provider.invalidate("tok-one-111")  # a late caller with the old token: no call
    assert len(adapter.sent) == 2


def test_invalidate_with_nothing_cached_leaves_it_to_get() -> None:
    provider, adapter = _provider(_token("tok-x-12345"))
    provider.invalidate("whatever-token")
    assert adapter.sent == []


@pytest.mark.parametrize(
    ("answer", "cls", "text"),
    [
        ({"errcode": 40125, "errmsg": "invalid appsecret"}, ConfigurationError, "app secret"),
        ({"errcode": 40013, "errmsg": "invalid appid"}, ConfigurationError, "MIDAS_APPID"),
        ({"errcode": 40164, "errmsg": "ip"}, ConfigurationError, "whitelist"),
        ({"errcode": -1, "errmsg": "busy"}, RetryableError, "errcode -1"),
        ((500, b"oops"), RetryableError, "HTTP 500"),
        ((404, b""), ConfigurationError, "MIDAS_API_BASE"),
        (b"<html>", MalformedResponse, "not a JSON object"),
        ({"access_token": "", "expires_in": 7200}, MalformedResponse, "access_token"),
        ({"access_token": "tok-abcdefg", "expires_in": "7200"}, MalformedResponse, "expires_in"),
        ({"access_token": "tok-abcdefg", "expires_in": 0}, MalformedResponse, "expires_in"),
        (requests.ReadTimeout("read timed out"), MidasTimeout, "timed out"),
        (requests.ConnectionError("refused"), RetryableError, "ConnectionError"),
    ],
)
def test_stable_token_failures(answer: Any, cls: type, text: str) -> None:
    provider, _ = _provider(answer)
    with pytest.raises(cls) as info:
        provider.get()
    assert text in str(info.value)
    assert SECRET not in str(info.value) + repr(info.value)


def test_old_token_is_served_while_a_refresh_fails() -> None:
    provider, adapter = _provider(_token("tok-short-1", 4), {"errcode": -1, "errmsg": "busy"})
    assert provider.get() == "tok-short-1"
    time.sleep(2.1)  # past the refresh point, before expiry
    assert provider.get() == "tok-short-1"
    assert len(adapter.sent) == 2


def test_memory_cache_no_stampede_across_threads() -> None:
    release = threading.Event()

    class SlowAdapter(ScriptedAdapter):
        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            release.wait(5)
            return super().send(request, **kwargs)

    session = requests.Session()
    adapter = SlowAdapter(_token("tok-shared-1"))
    session.mount("http://tok.test", adapter)
    provider = StableTokenProvider("http://tok.test", APPID, SECRET, session=session)
    got = _run_threads(16, provider.get, before_join=lambda: (time.sleep(0.3), release.set()))
    assert got == ["tok-shared-1"] * 16
    assert len(adapter.sent) == 1


def _run_threads(
    n: int, fn: Callable[[], str], before_join: Callable[[], Any] | None = None
) -> list[str]:
    barrier = threading.Barrier(n)
    out: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        value = fn()
        with lock:
            out.append(value)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    if before_join:
        before_join()
    for t in threads:
        t.join(10)
    return out


# -- Redis cache, shared by processes ---------------------------------------------------------


@pytest.mark.integration
def test_redis_cache_is_shared_and_expires_with_the_token(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first, a = _provider(_token("tok-redis-1", 600), redis_client=client)
    second, b = _provider(_token("tok-other-2"), redis_client=client)
    assert first.get() == "tok-redis-1"
    assert second.get() == "tok-redis-1"  # another process: read from Redis, no call
    assert len(a.sent) == 1 and b.sent == []
    keys = [k.decode() for k in client.keys("*")]
    (key,) = keys  # the lock is gone, only the token stays
    assert key.startswith("midas:token:" + APPID)
    assert 590_000 < client.pttl(key) <= 600_000  # the credential expires with the token
    second.invalidate("tok-redis-1")
    assert first.get() == "tok-other-2" and len(b.sent) == 1


@pytest.mark.integration
def test_redis_down_is_a_retryable_error() -> None:
    no_retry = Retry(NoBackoff(), 0)
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=no_retry)
    provider, _ = _provider(_token("tok-never-used"), redis_client=dead)
    with pytest.raises(RetryableError, match="Redis"):
        provider.get()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimConfig()) as s:
        yield s


def _sim_provider(sim: Simulator, redis_url: str) -> StableTokenProvider:
    return StableTokenProvider(
        sim.base_url, APPID, SECRET, redis=redis.Redis.from_url(redis_url), sealer=SEALER
    )


@pytest.mark.integration
def test_no_stampede_threads_of_several_providers(sim: Simulator, redis_url: str) -> None:
    providers = [_sim_provider(sim, redis_url) for _ in range(4)]  # four "processes"
    calls = iter(range(10_000))
    got = _run_threads(16, lambda: providers[next(calls) % 4].get())
    assert len(set(got)) == 1 and len(got) == 16
    assert sim.stats()["token_calls"] == 1
    # Every thread then sees the token refused at once: still one refresh.
    sim.expire_tokens()
    bad = got[0]
    _run_threads(16, lambda: (providers[next(calls) % 4].invalidate(bad), "")[1])
    stats = sim.stats()
    assert stats["token_calls"] == 2 and stats["force_refresh_calls"] == 0
    assert providers[0].get() != bad


def _process_main(base_url: str, redis_url: str, start: Any, out: Any) -> None:
    provider = StableTokenProvider(
        base_url, APPID, SECRET, redis=redis.Redis.from_url(redis_url), sealer=SEALER
    )
    results: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        start.wait(10)
        token = provider.get()
        with lock:
            results.append(token)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    out.put(results)


@pytest.mark.integration
def test_no_stampede_across_processes(sim: Simulator, redis_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(sim.base_url, redis_url, start, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    time.sleep(1.5)  # let every process import and park its threads on the event
    start.set()
    tokens = [t for _ in procs for t in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert len(tokens) == 16 and len(set(tokens)) == 1
    assert sim.stats()["token_calls"] == 1


@pytest.mark.integration
def test_refresh_ahead_is_done_once_for_everyone(redis_url: str) -> None:
    # Tokens live 4 s in this simulator; stable_token hands out a new one in the last 300 s,
    # i.e. on every call. Hammering get() for ~3 s must refresh about every 2 s, not per call.
    with Simulator(SimConfig(token_ttl_s=4)) as sim:
        providers = [_sim_provider(sim, redis_url) for _ in range(3)]
        stop = time.monotonic() + 3.0
        count = [0]

        def hammer(p: StableTokenProvider) -> None:
            while time.monotonic() < stop:
                p.get()
                count[0] += 1
                time.sleep(0.005)

        threads = [threading.Thread(target=hammer, args=(providers[i % 3],)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        calls = sim.stats()["token_calls"]
    assert count[0] > 200
    assert 1 <= calls <= 3


@pytest.mark.integration
def test_a_fresh_token_is_reused_in_process_until_invalidated(
    sim: Simulator, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    reads = 0
    real_get = client.get

    def counting_get(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return real_get(*args, **kwargs)

    client.get = counting_get  # type: ignore[method-assign]
    provider = StableTokenProvider(
        sim.base_url, APPID, SECRET, redis=client, sealer=SEALER, local_reuse_s=30
    )
    first = provider.get()
    after_first = reads
    assert all(provider.get() == first for _ in range(100))
    assert reads == after_first  # no Redis round trip per request while the token is fresh
    # Another process replaced the token (WeChat answered it 42001 there): ours is refused
    # too, invalidate() drops the local copy and the next get() reads the shared one.
    sim.expire_tokens()
    other = StableTokenProvider(
        sim.base_url, APPID, SECRET, redis=redis.Redis.from_url(redis_url), sealer=SEALER
    )
    other.invalidate(first)
    replaced = other.get()
    assert replaced != first
    assert provider.get() == first  # still the local copy: at worst one more 42001
    provider.invalidate(first)
    assert provider.get() == replaced
    assert sim.stats()["token_calls"] == 2


@pytest.mark.integration
def test_the_token_cached_in_redis_is_sealed(sim: Simulator, redis_url: str) -> None:
    """A reader of Redis (or of its append-only file) found the access token in clear."""
    token = _sim_provider(sim, redis_url).get()
    client = redis.Redis.from_url(redis_url)
    stored = [client.get(k) or b"" for k in client.scan_iter() if client.type(k) == b"string"]
    assert stored and not any(token.encode() in value for value in stored)
    # A process with another key (one rotated out, say) cannot read it: it fetches its own.
    other = SessionKeyCipher([Fernet.generate_key().decode()])
    stranger = StableTokenProvider(sim.base_url, APPID, SECRET, redis=client, sealer=other)
    assert stranger.get()
    assert sim.stats()["token_calls"] == 2
    # Without a sealing key a Redis cache is refused, never written in clear.
    with pytest.raises(ConfigError, match="SESSION_KEY_ENCRYPTION_KEY"):
        StableTokenProvider(sim.base_url, APPID, SECRET, redis=client)


def test_stable_token_calls_are_counted_by_outcome() -> None:
    from prometheus_client import REGISTRY

    def count(outcome: str) -> float:
        value = REGISTRY.get_sample_value("midas_token_requests_total", {"outcome": outcome})
        return value or 0.0

    before = {o: count(o) for o in ("ok", "40125", "-1", "error", "timeout")}
    for answer in (
        _token("tok-counted-1"),
        {"errcode": 40125, "errmsg": "invalid appsecret"},
        {"errcode": -1, "errmsg": "busy"},
        (500, b"oops"),
        requests.ReadTimeout("read timed out"),
    ):
        provider, _ = _provider(answer)
        try:
            provider.get()
        except (ConfigurationError, RetryableError, MidasTimeout):
            pass
    assert {o: count(o) - n for o, n in before.items()} == {
        "ok": 1,
        "40125": 1,
        "-1": 1,
        "error": 1,
        "timeout": 1,
    }
