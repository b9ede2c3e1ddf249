"""Midas request signatures (API.md §2), reproduced against the official test vectors.

Pure functions over text and bytes: no HTTP, no settings. The simulator verifies with the
same functions, and `tests/midas/test_signing.py` pins them to `test-vectors.json`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

# Parameters that are never part of the v1 `sig` string.
_V1_UNSIGNED = frozenset({"sig", "mp_sig"})


def _hmac_hex(key: str | bytes, msg: str | bytes) -> str:
    k = key.encode("utf-8") if isinstance(key, str) else key
    m = msg.encode("utf-8") if isinstance(msg, str) else msg
    return hmac.new(k, m, hashlib.sha256).hexdigest()  # hexdigest is lowercase, as Midas wants


def _joined(params: Mapping[str, object]) -> str:
    # Sorted by key in ASCII order, `k=v` joined with `&`, values exactly as sent (no encoding).
    return "&".join(f"{k}={params[k]}" for k in sorted(params))


def v1_sig_string(params: Mapping[str, object], org_loc: str, app_key: str) -> str:
    body = {k: v for k, v in params.items() if k not in _V1_UNSIGNED}
    return f"{_joined(body)}&org_loc={org_loc}&method=POST&secret={app_key}"


def v1_sig(params: Mapping[str, object], org_loc: str, app_key: str) -> str:
    """`sig`: HMAC-SHA256 keyed by the AppKey; `org_loc` is the exact path posted to."""
    return _hmac_hex(app_key, v1_sig_string(params, org_loc, app_key))


def v1_mp_sig_string(params: Mapping[str, object], org_loc: str, session_key: str) -> str:
    # `params` are the body parameters plus `access_token` and `sig`; `mp_sig` itself is not.
    body = {k: v for k, v in params.items() if k != "mp_sig"}
    return f"{_joined(body)}&org_loc={org_loc}&method=POST&session_key={session_key}"


def v1_mp_sig(params: Mapping[str, object], org_loc: str, session_key: str) -> str:
    """Legacy `mp_sig`: keyed by the session_key as its base64 *text* (decoding it is wrong)."""
    return _hmac_hex(session_key, v1_mp_sig_string(params, org_loc, session_key))


def v2_pay_sig(uri: str, post_body: bytes, app_key: str) -> str:
    """`pay_sig` over `uri + "&" + body`, the exact bytes that are posted."""
    return _hmac_hex(app_key, uri.encode("utf-8") + b"&" + post_body)


def v2_signature(post_body: bytes, session_key: str) -> str:
    """User-state `signature` over the exact posted bytes, keyed by the session_key text."""
    return _hmac_hex(session_key, post_body)


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
