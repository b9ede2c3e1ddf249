"""Access tokens (API.md §4): a static one from a central service, or `stable_token`.

`stable_token` returns the same token until 5 minutes before it expires, so every process can
share one: it is cached in Redis (in memory without Redis), sealed with
SESSION_KEY_ENCRYPTION_KEY so that a reader of Redis (or of its disk) cannot use it, and
refreshed ahead of expiry by one process at a time. `force_refresh` is never sent: it revokes
the token every other process is using and is limited to 20 calls a day.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import requests

from worker.config import ConfigError
from worker.logs import preview, register_secret
from worker.metrics import TOKEN_REQUESTS
from worker.midas.errors import (
    ConfigurationError,
    MalformedResponse,
    MidasError,
    MidasTimeout,
    RetryableError,
)

if TYPE_CHECKING:
    import redis as redis_lib

    from worker.config import Settings
    from worker.db.crypto import SessionKeyCipher

log = logging.getLogger(__name__)

T = TypeVar("T")

STABLE_TOKEN_PATH = "/cgi-bin/stable_token"  # noqa: S105  (a path, not a password)

# Refresh this long before expiry. WeChat hands out a new stable token only in the last
# 5 minutes of the old one's life, and both stay valid through those 5 minutes.
REFRESH_AHEAD_S = 300.0
# How often a process waiting for another one's refresh looks at the cache again.
_POLL_S = 0.05
# A fresh token read from the shared cache is reused in-process for this long without asking
# Redis again (one round trip per Midas request otherwise). A token another process replaced
# meanwhile is answered 42001 at worst: invalidate() drops the local copy, the retry reads anew.
LOCAL_REUSE_S = 1.0

_TOKEN_MEANINGS = {
    40002: "invalid grant_type",
    40013: "invalid appid (check MIDAS_APPID)",
    40125: "invalid app secret (check MIDAS_APP_SECRET)",
    40164: "the caller's IP is not in the app's API IP whitelist",
    41002: "appid missing",
    41004: "app secret missing",
}
_TOKEN_RETRYABLE = frozenset({-1, 45011})


class TokenProvider(Protocol):
    def get(self) -> str:
        """A token believed valid right now."""
        ...

    def invalidate(self, bad_token: str) -> None:
        """Midas refused `bad_token`: refresh, unless the cache already moved past it."""
        ...


class StaticToken:
    """MIDAS_ACCESS_TOKEN as given (a central token service owns refreshing it)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("MIDAS_ACCESS_TOKEN is empty")
        register_secret(token)
        self._token = token

    def get(self) -> str:
        return self._token

    def invalidate(self, bad_token: str) -> None:
        # Nothing to refresh: the retry uses the same token and its failure is reported.
        log.warning("midas.static_token_refused")

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str = ""
    remaining_s: float = 0.0  # seconds of validity left
    refresh_ahead_s: float = 0.0  # refresh once remaining_s is at or below this

    @property
    def fresh(self) -> bool:
        return self.remaining_s > self.refresh_ahead_s

    @property
    def usable(self) -> bool:
        return self.remaining_s > 0


class _Store(Protocol):
    def read(self) -> _Cached | None: ...
    def write(self, token: str, ttl_s: float, refresh_ahead_s: float) -> None: ...
    def try_lock(self) -> str | None: ...
    def unlock(self, owner: str) -> None: ...
    def locked(self) -> bool: ...


class _MemoryStore:
    """One process: the threads share the token; a thread lock serialises refreshes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple[str, float, float] | None = None  # token, monotonic expiry, ahead

    def read(self) -> _Cached | None:
        value = self._value
        if value is None:
            return None
        token, expires_at, ahead = value
        return _Cached(token, expires_at - time.monotonic(), ahead)

    def write(self, token: str, ttl_s: float, refresh_ahead_s: float) -> None:
        self._value = (token, time.monotonic() + ttl_s, refresh_ahead_s)

    def try_lock(self) -> str | None:
        return "local" if self._lock.acquire(blocking=False) else None

    def unlock(self, owner: str) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


# Delete the lock only if we still own it: after a TTL expiry it may be someone else's.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _RedisStore:
    """Every process: the token (sealed) and its expiry live in Redis (the Redis clock decides)."""

    def __init__(
        self, client: redis_lib.Redis, key: str, lock_ttl_s: float, sealer: SessionKeyCipher
    ) -> None:
        self._redis = client
        self._sealer = sealer
        self._key = key
        self._lock_key = f"{key}:lock"
        self._lock_ttl_ms = max(1000, int(lock_ttl_s * 1000))
        self._unlock = client.register_script(_UNLOCK)

    def read(self) -> _Cached | None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._key)
        pipe.pttl(self._key)
        raw, pttl = pipe.execute()
        if raw is None or pttl is None or pttl <= 0:
            return None
        from worker.db.crypto import UndecryptableSessionKey

        try:
            value = json.loads(self._sealer.decrypt(raw.decode("ascii")))
            return _Cached(str(value["token"]), pttl / 1000.0, float(value["ahead_s"]))
        except (ValueError, KeyError, TypeError, UndecryptableSessionKey):
            # Unreadable (another version wrote it, or a key since rotated out): fetch anew.
            return None

    def write(self, token: str, ttl_s: float, refresh_ahead_s: float) -> None:
        # The token is a credential: sealed, a reader of Redis or of its append-only file
        # cannot call Midas with it. The key expires with the token.
        value = self._sealer.encrypt(json.dumps({"token": token, "ahead_s": refresh_ahead_s}))
        self._redis.set(self._key, value, px=max(1, int(ttl_s * 1000)))

    def try_lock(self) -> str | None:
        owner = uuid.uuid4().hex
        # SET NX with a TTL: a holder that dies mid-refresh frees the lock on its own.
        got = self._redis.set(self._lock_key, owner, nx=True, px=self._lock_ttl_ms)
        return owner if got else None

    def unlock(self, owner: str) -> None:
        self._unlock(keys=[self._lock_key], args=[owner])

    def locked(self) -> bool:
        return bool(self._redis.exists(self._lock_key))


class StableTokenProvider:
    """`POST /cgi-bin/stable_token`, cached and shared; one refresher at a time, no stampede."""

    def __init__(
        self,
        base_url: str,
        appid: str,
        app_secret: str,
        *,
        redis: redis_lib.Redis | None = None,
        sealer: SessionKeyCipher | None = None,
        session: requests.Session | None = None,
        timeout_s: float = 5.0,
        refresh_ahead_s: float = REFRESH_AHEAD_S,
        key_prefix: str = "midas:token",
        local_reuse_s: float = LOCAL_REUSE_S,
    ) -> None:
        if not appid or not app_secret:
            raise ConfigError("MIDAS_APPID and MIDAS_APP_SECRET are needed for stable_token")
        register_secret(app_secret)
        self._url = base_url.rstrip("/") + STABLE_TOKEN_PATH
        self._appid = appid
        self._secret = app_secret
        self._timeout_s = timeout_s
        self._refresh_ahead_s = refresh_ahead_s
        self._session = session or requests.Session()
        self._local_reuse_s = local_reuse_s
        self._local: tuple[str, float] | None = None  # (fresh token, monotonic reuse deadline)
        # A refresh is one HTTP call (connect + read timeouts); the lock outlives it so that a
        # slow holder is not joined by a second refresher, and waiters give up a bit later.
        lock_ttl_s = 2 * timeout_s + 5
        self._wait_s = lock_ttl_s + 1
        self._store: _Store
        if redis is None:
            self._store = _MemoryStore()
        elif sealer is None:
            raise ConfigError("SESSION_KEY_ENCRYPTION_KEY is needed to seal the token in Redis")
        else:
            # One cache per (API base, appid): a staging simulator's tokens never reach prod.
            scope = hashlib.sha256(f"{self._url}|{appid}".encode()).hexdigest()[:12]
            self._store = _RedisStore(redis, f"{key_prefix}:{appid}:{scope}", lock_ttl_s, sealer)

    def __repr__(self) -> str:
        return f"StableTokenProvider(appid={self._appid!r})"

    def get(self) -> str:
        local = self._local
        if local is not None and time.monotonic() < local[1]:
            return local[0]
        deadline = time.monotonic() + self._wait_s
        while True:
            cached = self._read()
            if cached is not None and cached.fresh:
                # Reusable locally only while it stays fresh by the shared cache's own clock.
                reuse_s = min(self._local_reuse_s, cached.remaining_s - cached.refresh_ahead_s)
                self._local = (cached.token, time.monotonic() + reuse_s)
                return cached.token
            owner = self._try_lock()
            if owner is not None:
                try:
                    return self._refresh_locked()
                finally:
                    self._unlock(owner)
            # Someone else is refreshing. A token that is still valid will do meanwhile;
            # without one, wait for theirs rather than call stable_token too.
            if cached is not None and cached.usable:
                return cached.token
            if time.monotonic() > deadline:
                raise RetryableError("timed out waiting for another process's token refresh")
            time.sleep(_POLL_S * random.uniform(0.5, 1.5))  # jitter: waiters do not align

    def invalidate(self, bad_token: str) -> None:
        self._local = None
        deadline = time.monotonic() + self._wait_s
        other_refreshed = False
        while True:
            cached = self._read()
            if cached is None or cached.token != bad_token:
                return  # already replaced (or nothing cached: the next get() fetches)
            if other_refreshed:
                # Someone refreshed while we waited and stable_token handed back the same
                # token (WeChat still thinks it valid): asking again would get it again.
                return
            owner = self._try_lock()
            if owner is not None:
                try:
                    cached = self._read()  # re-check under the lock: compare-and-refresh
                    if cached is not None and cached.token == bad_token:
                        log.info("midas.token_refresh", extra={"reason": "invalidated"})
                        self._fetch()
                    return
                finally:
                    self._unlock(owner)
            other_refreshed = True
            if time.monotonic() > deadline:
                return
            while self._lock_held() and time.monotonic() <= deadline:
                time.sleep(_POLL_S * random.uniform(0.5, 1.5))

    # -- internals ----------------------------------------------------------------------------

    def _refresh_locked(self) -> str:
        cached = self._read()  # another process may have refreshed before we got the lock
        if cached is not None and cached.fresh:
            return cached.token
        try:
            log.info("midas.token_refresh", extra={"reason": "expiring" if cached else "empty"})
            return self._fetch()
        except MidasError as exc:
            if cached is not None and cached.usable:
                # Keep serving the old token while it lasts; the next get() tries again.
                log.warning("midas.token_refresh_failed", extra={"error": str(exc)})
                return cached.token
            raise

    def _lock_held(self) -> bool:
        return self._guard(self._store.locked)

    def _fetch(self) -> str:
        """One stable_token call; stores and returns the token. Caller holds the lock."""
        body = json.dumps(
            {"grant_type": "client_credential", "appid": self._appid, "secret": self._secret}
        ).encode("utf-8")
        sent = time.monotonic()
        failure: MidasError | None = None
        try:
            resp = self._session.post(
                self._url,
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=(self._timeout_s, self._timeout_s),
                allow_redirects=False,
            )
        except requests.Timeout:
            failure = MidasTimeout("stable_token request timed out")
        except requests.RequestException as exc:
            failure = RetryableError(f"stable_token request failed: {type(exc).__name__}")
        # Raised outside the except block so the requests exception (whose text may hold a
        # URL) is not chained into our traceback.
        if failure is not None:
            TOKEN_REQUESTS.labels("timeout" if isinstance(failure, MidasTimeout) else "error").inc()
            raise failure
        try:
            token, expires_in = _read_token_answer(resp)
        except MidasError as exc:
            TOKEN_REQUESTS.labels(str(exc.errcode) if exc.errcode is not None else "error").inc()
            raise
        TOKEN_REQUESTS.labels("ok").inc()
        register_secret(token)
        # Valid for expires_in from when WeChat issued it, somewhere during our call: count
        # from when we sent it, to be safe.
        ttl_s = expires_in - (time.monotonic() - sent)
        if ttl_s <= 1:
            raise MalformedResponse("stable_token returned a token that is already expiring")
        # A token shorter-lived than twice the margin is refreshed half-way through instead,
        # so that a short expires_in cannot turn every get() into a refresh.
        self._write(token, ttl_s, min(self._refresh_ahead_s, ttl_s / 2))
        return token

    # Redis failures surface as a retryable error with a fixed text (never a URL).
    def _read(self) -> _Cached | None:
        return self._guard(self._store.read)

    def _write(self, token: str, ttl_s: float, ahead_s: float) -> None:
        self._guard(lambda: self._store.write(token, ttl_s, ahead_s))

    def _try_lock(self) -> str | None:
        return self._guard(self._store.try_lock)

    def _unlock(self, owner: str) -> None:
        self._guard(lambda: self._store.unlock(owner))

    @staticmethod
    def _guard(call: Callable[[], T]) -> T:
        import redis as redis_module

        try:
            return call()
        except redis_module.RedisError as exc:
            failure = RetryableError(f"token cache (Redis) unavailable: {type(exc).__name__}")
        raise failure


def _read_token_answer(resp: requests.Response) -> tuple[str, int]:
    with resp:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise RetryableError(f"stable_token answered HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise ConfigurationError(
                f"stable_token answered HTTP {resp.status_code}: check MIDAS_API_BASE"
            )
        try:
            payload = json.loads(resp.content)
        except ValueError:
            payload = None
    if not isinstance(payload, dict):
        raise MalformedResponse("stable_token answer is not a JSON object")
    code = payload.get("errcode", 0)
    if code not in (0, None):
        msg = preview(str(payload.get("errmsg", "")), 200)
        what = _TOKEN_MEANINGS.get(code, "refused") if isinstance(code, int) else "refused"
        text = f"stable_token errcode {code}: {what} (errmsg: {msg})"
        cls = RetryableError if code in _TOKEN_RETRYABLE else ConfigurationError
        raise cls(text, errcode=code if isinstance(code, int) else None, errmsg=msg)
    token, expires_in = payload.get("access_token"), payload.get("expires_in")
    if not isinstance(token, str) or not token or len(token) > 2048:
        raise MalformedResponse("stable_token answer has no valid access_token")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        raise MalformedResponse("stable_token answer has no valid expires_in")
    return token, expires_in


def make_token_provider(
    settings: Settings, redis: redis_lib.Redis | None = None
) -> StaticToken | StableTokenProvider:
    """MIDAS_ACCESS_TOKEN when set; else stable_token, cached in Redis (sealed with
    SESSION_KEY_ENCRYPTION_KEY) when REDIS_URL is set."""
    settings.refuse_plain_http()
    sharing = settings.MIDAS_ACCESS_TOKEN is None and settings.REDIS_URL is not None
    if sharing and settings.SESSION_KEY_ENCRYPTION_KEY is None:  # the general message, and why
        raise ConfigError(
            "SESSION_KEY_ENCRYPTION_KEY is not set; it seals the access token the workers "
            "share through Redis"
        )
    settings.require(*settings.token_requirements())
    if settings.MIDAS_ACCESS_TOKEN is not None:
        return StaticToken(settings.MIDAS_ACCESS_TOKEN.get_secret_value())
    assert settings.MIDAS_APPID is not None and settings.MIDAS_APP_SECRET is not None
    if redis is None and settings.REDIS_URL is not None:
        import redis as redis_module

        redis = redis_module.Redis.from_url(
            settings.REDIS_URL, socket_timeout=10.0, socket_connect_timeout=5.0
        )
    from worker.db.crypto import SessionKeyCipher

    return StableTokenProvider(
        settings.MIDAS_API_BASE,
        settings.MIDAS_APPID,
        settings.MIDAS_APP_SECRET.get_secret_value(),
        redis=redis,
        sealer=SessionKeyCipher.from_settings(settings) if redis is not None else None,
        timeout_s=settings.MIDAS_TIMEOUT_S,
    )
