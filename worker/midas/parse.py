"""Strict reading of a getbalance answer: a valid `Balance` or a typed error, nothing between.

Midas is outside input. Every counter must be present and an integer (not a bool, not 10.0,
not "10") within 0..MAX_COINS; anything else is a `MalformedResponse` whose message names the
field and never echoes more than a short redacted excerpt of the body.
"""

from __future__ import annotations

import json
from typing import Any

from worker.logs import preview
from worker.midas.errors import (
    AccountUnobservable,
    ConfigurationError,
    MalformedResponse,
    MidasError,
    QuotaExhausted,
    QuotaPaused,
    RequestRejected,
    RetryableError,
    TokenError,
)
from worker.midas.types import COUNTER_FIELDS, ApiVersion, Balance

# 10**15 coins is beyond any real account (a billion players' worth of top-ups); a larger
# number is a corrupt answer, not a balance to reconcile.
MAX_COINS = 10**15

# Codes that mean "refresh the access token once and retry" (API.md §3, §4).
TOKEN_CODES = frozenset({40001, 42001, 40014})
QUOTA_MINUTE = 45011
QUOTA_DAY = 45009

# v2 renamed the counters (API.md §1); values are the v1 names `Balance` uses.
V2_TO_V1 = {
    "balance": "balance",
    "present_balance": "gen_balance",
    "sum_save": "save_amt",
    "sum_balance": "save_sum",
    "sum_cost": "cost_sum",
    "sum_present": "present_sum",
}
_V1_NAMES = {name: name for name in COUNTER_FIELDS}

_COMMON_MEANINGS = {
    -1: "system busy or error, retry later",
    40001: "access_token invalid",
    40013: "invalid appid (check MIDAS_APPID)",
    40014: "access_token not valid",
    40101: "a required parameter is missing",
    40164: "the caller's IP is not in the app's API IP whitelist",
    41001: "access_token missing",
    42001: "access_token expired",
    45009: "the day's API quota is used up; the run stops",
    45011: "the per-minute API quota is reached; every worker pauses until the next minute",
    48001: "this API is not authorised for the app",
    90017: "no permission (check MIDAS_APPID and MIDAS_OFFER_ID)",
    90018: "bad parameters",
}
_MEANINGS: dict[ApiVersion, dict[int, str]] = {
    "v1": {
        **_COMMON_MEANINGS,
        90009: "mp_sig wrong: the session_key held for this account is stale",
        90010: "user not logged in or session expired: unobservable until the next login",
        90011: "sig wrong: check that MIDAS_APP_KEY is the AppKey of MIDAS_ENV",
        90016: "order in progress (a pay code, unexpected for getbalance)",
    },
    "v2": {
        **_COMMON_MEANINGS,
        90010: "signature wrong: the session_key held is not the user's current one",
        90011: "pay_sig wrong: check that MIDAS_APP_KEY is the AppKey of MIDAS_ENV",
        90016: "session_key expired: unobservable until the user logs in again",
    },
}

# What the worker does with each code decides the class (errors.py). 90010, 90011 and 90016
# mean different things in v1 and v2; v1 90009 and v2 90010 both say the session_key we hold
# is not the user's live one (our sig/pay_sig passed, so our signing is right): like an
# expired session, the account cannot be observed until the game sends a fresh key.
_CLASSES: dict[ApiVersion, dict[int, type[MidasError]]] = {
    "v1": {90009: AccountUnobservable, 90010: AccountUnobservable},
    "v2": {90010: AccountUnobservable, 90016: AccountUnobservable},
}
_COMMON_CLASSES: dict[int, type[MidasError]] = {
    -1: RetryableError,
    **dict.fromkeys(TOKEN_CODES, TokenError),
    QUOTA_MINUTE: QuotaPaused,
    QUOTA_DAY: QuotaExhausted,
    **dict.fromkeys((90011, 90017, 40013, 40164, 48001), ConfigurationError),
}


def meaning(errcode: int, api_version: ApiVersion) -> str:
    """What `errcode` means for this API generation, in words for an operator."""
    return _MEANINGS[api_version].get(errcode, "unknown error code")


def error_for(errcode: int, errmsg: str, api_version: ApiVersion) -> MidasError:
    """The typed error for a non-zero errcode; Midas' errmsg is kept (redacted, capped)."""
    cls = _CLASSES[api_version].get(errcode) or _COMMON_CLASSES.get(errcode, RequestRejected)
    msg = preview(errmsg, 200)
    text = f"Midas errcode {errcode}: {meaning(errcode, api_version)}"
    if msg:
        text += f" (errmsg: {msg})"
    return cls(text, errcode=errcode, errmsg=msg)


def _malformed(reason: str) -> MalformedResponse:
    return MalformedResponse(f"malformed Midas answer: {reason}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Two values for one field: no way to know which one Midas meant.
            raise ValueError(f"duplicate field {key!r}")
        out[key] = value
    return out


def decode(body: bytes) -> dict[str, Any]:
    """The answer as a JSON object, or MalformedResponse."""
    failure: MalformedResponse | None = None
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        excerpt = preview(body[:400].decode("utf-8", "replace"), 200)
        detail = str(exc) if "duplicate field" in str(exc) else "not JSON"
        failure = _malformed(f"{detail} (starts with {excerpt!r})")
    # Raised outside the `except`: the decoder's exception holds the whole body.
    if failure is not None:
        raise failure
    if not isinstance(value, dict):
        raise _malformed(f"a JSON {type(value).__name__}, not an object")
    return value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {preview(repr(value), 40)}"


def _int_field(payload: dict[str, Any], name: str) -> int:
    if name not in payload:
        raise _malformed(f"field {name!r} is missing")
    value = payload[name]
    # bool is an int subclass in Python, and 10.0 == 10: both are refused, not coerced.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"field {name!r} must be an integer, got {_describe(value)}")
    if not 0 <= value <= MAX_COINS:
        shown = preview(str(value), 40)
        raise _malformed(f"field {name!r} is out of range 0..10**15, got {shown}")
    return value


def errcode_of(payload: dict[str, Any]) -> tuple[int, str]:
    """(errcode, errmsg); a missing or non-integer errcode is malformed."""
    code = payload.get("errcode")
    if isinstance(code, bool) or not isinstance(code, int):
        raise _malformed(f"errcode must be an integer, got {_describe(code)}")
    msg = payload.get("errmsg", "")
    return code, msg if isinstance(msg, str) else repr(msg)


def _first_save(payload: dict[str, Any]) -> bool:
    if "first_save" not in payload:
        raise _malformed("field 'first_save' is missing")
    value = payload["first_save"]
    # Documented as 1 (yes) / 2 (no) and as a boolean; SDKs disagree, so both are read.
    if value is True or value is False:
        return value
    if type(value) is int and value in (1, 2):
        return value == 1
    raise _malformed(f"field 'first_save' must be 1, 2, true or false, got {_describe(value)}")


def parse_balance(payload: dict[str, Any], api_version: ApiVersion) -> Balance:
    """A `Balance` in v1 names from an ok (errcode 0) answer of either API generation."""
    names = V2_TO_V1 if api_version == "v2" else _V1_NAMES
    counters = {v1: _int_field(payload, wire) for wire, v1 in names.items()}
    return Balance(
        balance=counters["balance"],
        gen_balance=counters["gen_balance"],
        first_save=_first_save(payload),
        save_amt=counters["save_amt"],
        save_sum=counters["save_sum"],
        cost_sum=counters["cost_sum"],
        present_sum=counters["present_sum"],
        api_version=api_version,
    )


def parse_getbalance(body: bytes, api_version: ApiVersion) -> Balance:
    """The whole answer: a Balance for errcode 0, else the typed error for the code."""
    payload = decode(body)
    errcode, errmsg = errcode_of(payload)
    if errcode != 0:
        raise error_for(errcode, errmsg, api_version)
    return parse_balance(payload, api_version)
