"""Typed Midas errors (API.md §3): what the worker should *do* decides the class.

Messages carry the errcode and Midas' errmsg, never a URL, token or key.
"""

from __future__ import annotations


class MidasError(Exception):
    """Base class. `errcode` is Midas' code, or None for transport failures."""

    retryable = False

    def __init__(self, message: str, *, errcode: int | None = None, errmsg: str = "") -> None:
        super().__init__(message)
        self.errcode = errcode
        self.errmsg = errmsg


class RetryableError(MidasError):
    """-1, timeouts, connection failures, HTTP 5xx: retry with backoff inside bounds."""

    retryable = True


class MidasTimeout(RetryableError):
    """No answer within MIDAS_TIMEOUT_S."""


class AccountUnobservable(MidasError):
    """The account cannot be observed until the player's next login: v1 90010 / v2 90016
    (session expired), v1 90009 / v2 90010 (the session_key held is not the current one),
    or no session_key where one is needed."""


class TokenError(MidasError):
    """40001 / 42001 / 40014: the access token is invalid or expired; refresh once, retry."""


class QuotaPaused(MidasError):
    """45011: per-minute quota hit; every worker pauses until the next minute."""


class RunStopper(MidasError):
    """Every further call would fail too: stop the run as failed with this reason."""


class QuotaExhausted(RunStopper):
    """45009: the day's quota is used up."""


class ConfigurationError(RunStopper):
    """90011 (sig/pay_sig wrong), 90017 (no permission): our credentials or setup are wrong."""


class RequestRejected(MidasError):
    """90018 bad parameters, 40101 missing parameter, any other unknown code:
    a bug or bad data for this account; the item becomes `error` without retry."""


class MalformedResponse(MidasError):
    """Midas answered something that is not a valid balance (non-JSON, bad fields, absurd
    numbers). Treated as retryable once or twice by the caller, never stored as a value."""

    retryable = True
