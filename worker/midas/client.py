"""The one door to Midas: a signed, rate-limited `getbalance` (v1 or v2) that returns a Balance.

    client = MidasClient.from_settings(settings, limiter=make_limiter(settings))
    balance = client.get_balance(openid, zone_id="1", session_key=key_or_none)

One HTTP attempt per call, plus exactly one retry after a token refresh (40001/42001/40014);
every attempt runs inside `limiter.slot()`. Retries with backoff for -1, timeouts and 5xx are
the caller's job: it knows the run's budget. Errors are the typed ones of `errors.py`, and
their text never holds a URL, a token or a key (requests puts the URL, query string included,
into its exception messages, so those are redacted and never chained).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from worker.logs import preview, register_secret, register_settings_secrets
from worker.metrics import MIDAS_LATENCY, MIDAS_REQUESTS
from worker.midas import signing
from worker.midas.errors import (
    AccountUnobservable,
    ConfigurationError,
    MalformedResponse,
    MidasError,
    MidasTimeout,
    QuotaPaused,
    RetryableError,
    TokenError,
)
from worker.midas.parse import parse_getbalance
from worker.midas.token import TokenProvider, make_token_provider
from worker.midas.types import ApiVersion, Balance

if TYPE_CHECKING:
    import redis as redis_lib

    from worker.config import Settings
    from worker.midas.limiter import Limiter

log = logging.getLogger(__name__)

V1_PATHS = {
    "production": "/cgi-bin/midas/getbalance",
    "sandbox": "/cgi-bin/midas/sandbox/getbalance",
}
V2_PATH = "/wxa/game/getbalance"
# A getbalance answer is a few hundred bytes; anything far larger is not one.
MAX_ANSWER_BYTES = 64 * 1024
_ENDPOINT = "getbalance"  # metric label

Env = Literal["sandbox", "production"]


def serialise(params: dict[str, Any]) -> bytes:
    """The body bytes: serialised once, signed and posted as they are (v2 signs the bytes)."""
    return json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def next_minute(now: float) -> float:
    """The next whole minute (unix seconds): when a 45011 minute quota opens again."""
    return math.floor(now / 60.0) * 60.0 + 60.0


def _is_timeout(exc: BaseException) -> bool:
    # requests raises ConnectionError (not Timeout) for a read timeout while streaming the
    # body; the urllib3 ReadTimeoutError is its first argument.
    if isinstance(exc, requests.Timeout):
        return True
    return any(isinstance(arg, urllib3.exceptions.TimeoutError) for arg in exc.args)


def _reason(exc: BaseException) -> str:
    """A short, redacted description of a transport failure (requests' text holds the URL)."""
    return f"{type(exc).__name__}: {preview(str(exc), 160)}"


class MidasClient:
    """getbalance for one app and environment; thread-safe, one pooled HTTP session."""

    def __init__(
        self,
        *,
        base_url: str,
        api_version: ApiVersion,
        env: Env,
        appid: str,
        offer_id: str,
        app_key: str,
        limiter: Limiter,
        tokens: TokenProvider,
        user_ip: str = "127.0.0.1",
        send_mp_sig: bool = False,
        timeout_s: float = 5.0,
        max_in_flight: int = 32,
    ) -> None:
        if api_version not in ("v1", "v2") or env not in ("sandbox", "production"):
            raise ValueError("api_version must be v1|v2 and env sandbox|production")
        if not offer_id or not app_key or (api_version == "v1" and not appid):
            raise ValueError("offer_id, app_key (and appid for v1) are required")
        register_secret(app_key)
        self._base = base_url.rstrip("/")
        self.api_version: ApiVersion = api_version
        self.env: Env = env
        self._appid = appid
        self._offer_id = offer_id
        self._app_key = app_key
        self._limiter = limiter
        self._tokens = tokens
        self._user_ip = user_ip
        self._send_mp_sig = send_mp_sig
        self._timeout = (timeout_s, timeout_s)  # connect, read (between bytes; answers are tiny)
        self._session = requests.Session()
        # Pool as many connections as the fleet lets this process have in flight, so that
        # concurrent threads reuse connections instead of opening and dropping extra ones.
        # No urllib3 retries: every attempt must pass through the limiter, and a retried
        # request would be an unaccounted one (and a pay could be sent twice).
        adapter = HTTPAdapter(
            pool_connections=4,
            pool_maxsize=max_in_flight,
            max_retries=Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0),
        )
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        limiter: Limiter,
        tokens: TokenProvider | None = None,
        redis: redis_lib.Redis | None = None,
    ) -> MidasClient:
        """The client for the configured app; ConfigError (one line) when settings are missing."""
        settings.refuse_plain_http()
        settings.require(*settings.client_requirements())
        assert settings.MIDAS_OFFER_ID is not None and settings.MIDAS_APP_KEY is not None
        register_settings_secrets(settings)
        return cls(
            base_url=settings.MIDAS_API_BASE,
            api_version=settings.MIDAS_API_VERSION,
            env=settings.MIDAS_ENV,
            appid=settings.MIDAS_APPID or "",
            offer_id=settings.MIDAS_OFFER_ID,
            app_key=settings.MIDAS_APP_KEY.get_secret_value(),
            limiter=limiter,
            tokens=tokens if tokens is not None else make_token_provider(settings, redis),
            user_ip=settings.MIDAS_USER_IP,
            send_mp_sig=settings.MIDAS_SEND_MP_SIG,
            timeout_s=settings.MIDAS_TIMEOUT_S,
            max_in_flight=settings.MIDAS_MAX_IN_FLIGHT,
        )

    @property
    def session(self) -> requests.Session:
        """The pooled HTTP session (tests mount fake adapters on it)."""
        return self._session

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> MidasClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MidasClient({self.api_version}, {self.env}, {self._base})"

    # -- the call -----------------------------------------------------------------------------

    def get_balance(
        self, openid: str, zone_id: str = "1", session_key: str | None = None
    ) -> Balance:
        """What Midas says for this account now, or a typed MidasError."""
        if not isinstance(openid, str) or not openid or not isinstance(zone_id, str) or not zone_id:
            raise ValueError("openid and zone_id must be non-empty strings")
        if session_key:
            register_secret(session_key)
        elif self.api_version == "v2":
            # v2 signs every call with the user's session_key: without one the account cannot
            # be observed, and asking would only burn quota on a certain 90010.
            raise AccountUnobservable("no session_key known for this account (v2 needs one)")
        token = self._tokens.get()
        try:
            return self._attempt(openid, zone_id, session_key or None, token, attempt=1)
        except TokenError as exc:
            # One refresh and one retry; a second token error is reported as it is.
            log.info("midas.token_rejected", extra={"errcode": exc.errcode, "openid": openid})
            self._tokens.invalidate(token)
        return self._attempt(openid, zone_id, session_key or None, self._tokens.get(), attempt=2)

    def _attempt(
        self, openid: str, zone_id: str, session_key: str | None, token: str, *, attempt: int
    ) -> Balance:
        ids = {"openid": openid, "zone_id": zone_id, "attempt": attempt}

        def prepare() -> _Prepared | MidasError:
            return self._prepare(*self._request(openid, zone_id, session_key, token))

        # Built (and time-stamped) once the slot is ours, while the limiter waits for its
        # moment: it may have held us for a while, even a minute's pause, and what is left to
        # do after its on-time check should be as little as possible (limiter.py).
        with self._limiter.slot_prepared(prepare) as prepared:
            started = time.monotonic()
            content, outcome, failure = self._post(prepared)
        if failure is None:
            try:
                balance = parse_getbalance(content, self.api_version)
                outcome = "0"
            except MidasError as exc:
                failure = exc
                outcome = "malformed" if isinstance(exc, MalformedResponse) else str(exc.errcode)
        MIDAS_REQUESTS.labels(endpoint=_ENDPOINT, errcode=outcome).inc()
        MIDAS_LATENCY.labels(endpoint=_ENDPOINT).observe(time.monotonic() - started)
        log.debug("midas.getbalance", extra={**ids, "outcome": outcome})
        if isinstance(failure, QuotaPaused):
            # Everyone stops until the quota window opens again, not just this caller.
            until = next_minute(time.time())
            self._limiter.pause_until(until)
            log.warning("midas.quota_paused", extra={"until": until})
        if failure is not None:
            raise failure
        return balance

    def _request(
        self, openid: str, zone_id: str, session_key: str | None, token: str
    ) -> tuple[str, dict[str, str], bytes]:
        """(path, query, body bytes) of one signed getbalance attempt."""
        ts = int(time.time())  # an integer: the signature string has `ts=1507530737`
        if self.api_version == "v1":
            path = V1_PATHS[self.env]  # org_loc is the path posted to, sandbox included
            # Exactly the six required parameters: user_ip is optional in v1 and its
            # URL-encoding in the signature is unsettled (API.md §2).
            params: dict[str, Any] = {
                "openid": openid,
                "appid": self._appid,
                "offer_id": self._offer_id,
                "ts": ts,
                "zone_id": zone_id,
                "pf": "android",
            }
            params["sig"] = signing.v1_sig(params, path, self._app_key)
            if self._send_mp_sig and session_key:
                signed = {**params, "access_token": token}
                params["mp_sig"] = signing.v1_mp_sig(signed, path, session_key)
            return path, {"access_token": token}, serialise(params)
        assert session_key is not None
        body = serialise(
            {
                "offer_id": self._offer_id,
                "openid": openid,
                "ts": ts,
                "zone_id": zone_id,
                "env": 1 if self.env == "sandbox" else 0,
                "user_ip": self._user_ip,
            }
        )
        query = {
            "access_token": token,
            "signature": signing.v2_signature(body, session_key),
            "sig_method": "hmac_sha256",
            "pay_sig": signing.v2_pay_sig(V2_PATH, body, self._app_key),
        }
        return V2_PATH, query, body

    def _prepare(self, path: str, query: dict[str, str], body: bytes) -> _Prepared | MidasError:
        """What `Session.post` does before sending (URL, headers, proxies and TLS settings from
        the environment), done ahead: the POST of the exact `body` bytes, ready to go."""
        try:
            request = self._session.prepare_request(
                requests.Request(
                    "POST",
                    self._base + path,
                    params=query,
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
            )
            settings = self._session.merge_environment_settings(
                request.url, {}, stream=True, verify=None, cert=None
            )
        except requests.RequestException as exc:
            return RetryableError(f"Midas request failed: {_reason(exc)}")
        return request, dict(settings)

    def _post(self, prepared: _Prepared | MidasError) -> tuple[bytes, str, MidasError | None]:
        """Send a prepared POST: (answer bytes, outcome label, transport error or None).

        Errors are returned, not raised from inside `except`: a chained requests exception
        would carry the URL (and the token in its query string) into every traceback.
        """
        if isinstance(prepared, MidasError):
            return b"", "connection", prepared
        request, settings = prepared
        try:
            resp = self._session.send(
                request,
                timeout=self._timeout,
                allow_redirects=False,
                **settings,  # stream=True among them: we read the body ourselves, capped
            )
        except requests.RequestException as exc:
            if _is_timeout(exc):
                return b"", "timeout", _timeout()
            return b"", "connection", RetryableError(f"Midas request failed: {_reason(exc)}")
        with resp:
            status = resp.status_code
            if status >= 500 or status == 429:
                label = "http_5xx" if status >= 500 else "http_429"
                return b"", label, RetryableError(f"Midas answered HTTP {status}")
            if status != 200:
                # A redirect or a 404 means the base URL is wrong: every call would fail alike.
                error = ConfigurationError(f"Midas answered HTTP {status}: check MIDAS_API_BASE")
                return b"", "http_other", error
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in resp.iter_content(chunk_size=16384):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        too_big = f"larger than {MAX_ANSWER_BYTES} bytes"
                        return b"", "malformed", MalformedResponse(_MALFORMED + too_big)
            except requests.RequestException as exc:
                if _is_timeout(exc):
                    return b"", "timeout", _timeout()
                # The status line arrived and then the answer broke off: a cut answer.
                cut = f"cut off ({_reason(exc)})"
                return b"", "malformed", MalformedResponse(_MALFORMED + cut)
        return b"".join(chunks), "", None


_MALFORMED = "malformed Midas answer: "
# A request ready to send, with the keyword arguments `Session.send` takes for it.
_Prepared = tuple[requests.PreparedRequest, dict[str, Any]]


def _timeout() -> MidasTimeout:
    return MidasTimeout("Midas did not answer in time (MIDAS_TIMEOUT_S)")
