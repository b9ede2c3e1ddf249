"""The Midas and access-token endpoints, answered as WeChat answers them (midas/API.md).

No sockets here: `answer()` turns one request into the JSON object to send. Checks run in
this order: access token, body, parameters, ids, `ts`, signatures, then the operation.
Signatures are verified with `worker.midas.signing`, compared as exact lowercase hex.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from worker.midas.signing import constant_time_equal, v1_mp_sig, v1_sig, v2_pay_sig, v2_signature
from worker.simulator.config import SimConfig
from worker.simulator.state import MoveRefused, SimState

Json = dict[str, Any]

OPS = ("getbalance", "pay", "cancelpay", "present")

_ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40002: "invalid grant_type",
    40013: "invalid appid",
    40097: "invalid args",
    40101: "missing parameter",
    40125: "invalid appsecret",
    41001: "access_token missing",
    41002: "appid missing",
    41004: "appsecret missing",
    42001: "access_token expired",
    43001: "require GET method",
    43002: "require POST method",
    45009: "reach max api daily quota limit",
    45011: "api minute-quota reach limit, must slower, retry next minute",
    47001: "data format error",
    90000: "order not found",
    90009: "mp_sig error",
    90010: "user not logged in or session expired",
    90011: "sig error",
    90012: "order exists",
    90013: "balance not enough",
    90015: "order already rolled back",
    90016: "session_key expired, please login again",
    90017: "no permission",
    90018: "invalid parameter",
}
# v2 gave some codes new meanings (API.md §3).
_ERRMSG_V2 = {90010: "signature error", 90011: "pay_sig error"}

_V1_BASE = ("openid", "appid", "offer_id", "ts", "zone_id", "pf", "sig")
_V1_REQUIRED = {
    "getbalance": _V1_BASE,
    "pay": (*_V1_BASE, "amt", "bill_no"),
    "cancelpay": (*_V1_BASE, "bill_no"),
    "present": (*_V1_BASE, "bill_no", "present_counts"),
}
_V2_BASE = ("openid", "offer_id", "ts", "zone_id", "env", "user_ip")
_V2_REQUIRED = {
    "getbalance": _V2_BASE,
    "pay": (*_V2_BASE, "amount", "order_id"),
    "cancelpay": (*_V2_BASE, "pay_order_id", "order_id"),
    "present": (*_V2_BASE, "amount", "order_id"),
}
_INT_FIELDS = frozenset({"ts", "env", "amt", "present_counts", "amount"})
_STR_FIELDS = frozenset(
    {"openid", "appid", "offer_id", "zone_id", "pf", "sig", "mp_sig", "user_ip", "bill_no"}
    | {"pay_item", "app_remark", "order_id", "pay_order_id", "payitem", "remark", "coin_type"}
)


@dataclass(frozen=True, slots=True)
class Route:
    api: str  # "v1" | "v2" | "stable_token" | "token"
    op: str = ""
    env: str = ""  # v1: the path chooses the environment; v2: the body's `env` does

    @property
    def kind(self) -> str:
        """ "midas" (rate-limited, counted in max_per_second) or "token"."""
        return "midas" if self.api in ("v1", "v2") else "token"


ROUTES: dict[str, Route] = {
    "/cgi-bin/stable_token": Route("stable_token"),
    "/cgi-bin/token": Route("token"),
}
for _op in OPS:
    ROUTES[f"/cgi-bin/midas/{_op}"] = Route("v1", _op, "production")
    ROUTES[f"/cgi-bin/midas/sandbox/{_op}"] = Route("v1", _op, "sandbox")
    ROUTES[f"/wxa/game/{_op}"] = Route("v2", _op)


def error(code: int, detail: str = "", *, v2: bool = False) -> Json:
    """An error answer; `detail` names a parameter, never a value (values may be secrets)."""
    text = (_ERRMSG_V2.get(code) if v2 else None) or _ERRMSG.get(code, "error")
    return {"errcode": code, "errmsg": f"{text}: {detail}" if detail else text}


def fault_answer(kind: str) -> Json:
    """The answer of an injected answer-replacing fault."""
    code = {"minus1": -1, "quota_minute": 45011, "quota_day": 45009, "token_expired": 42001}[kind]
    return error(code)


def corrupt(payload: Json, kind: str) -> Json:
    """An injected value fault: counters as strings, a negative or an absurd balance."""
    out = dict(payload)
    if kind == "wrong_types":
        for key, value in payload.items():
            if key not in ("errcode", "errmsg") and isinstance(value, int | bool):
                out[key] = str(value)
    elif kind == "negative":
        out["balance"] = -1 - abs(int(payload["balance"]))
    elif kind == "huge":
        out["balance"] = 10**30
    return out


def answer(
    state: SimState,
    config: SimConfig,
    route: Route,
    method: str,
    path: str,
    query: dict[str, str],
    body: bytes,
) -> Json:
    if route.api == "stable_token":
        return _stable_token(state, config, method, body)
    if route.api == "token":
        return _basic_token(state, config, method, query)
    v2 = route.api == "v2"
    if method != "POST":
        return error(43002, v2=v2)
    status = state.token_status(query.get("access_token"))
    if status:
        return error(status, v2=v2)
    params = _json_object(body)
    if params is None:
        return error(47001, v2=v2)
    if v2:
        return _v2(state, config, route, path, query, body, params)
    return _v1(state, config, route, path, query, params)


def _json_object(body: bytes) -> Json | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _check_params(params: Json, required: tuple[str, ...], *, v2: bool) -> Json | None:
    for name in required:
        if name not in params:
            return error(40101, name, v2=v2)
    for name, value in params.items():
        if name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif name in _STR_FIELDS:
            ok = isinstance(value, str) and value != ""
        else:  # an unknown extra: still a plain value (v1 signs it as sent)
            ok = isinstance(value, str | int) and not isinstance(value, bool)
        if not ok:
            return error(90018, name, v2=v2)
    return None


def _check_common(config: SimConfig, params: Json, *, v2: bool) -> Json | None:
    if params["offer_id"] != config.offer_id or params.get("appid", config.appid) != config.appid:
        return error(90017, "appid/offer_id", v2=v2)
    if abs(params["ts"] - time.time()) > config.max_ts_skew_s:
        return error(90018, "ts too far from now", v2=v2)
    return None


def _v1(
    state: SimState, config: SimConfig, route: Route, path: str, query: dict[str, str], params: Json
) -> Json:
    failed = _check_params(params, _V1_REQUIRED[route.op], v2=False) or _check_common(
        config, params, v2=False
    )
    if failed:
        return failed
    if params["pf"] != "android":
        return error(90018, "pf")
    # org_loc is the exact path posted to (the sandbox path in the sandbox), and each
    # environment has its own AppKey: a production key on the sandbox path fails here.
    if not constant_time_equal(params["sig"], v1_sig(params, path, config.app_key(route.env))):
        return error(90011)
    openid, zone_id = params["openid"], params["zone_id"]
    if "mp_sig" in params:
        session_key = state.session_key(openid, zone_id)
        if session_key is None:
            return error(90010)
        signed = {**params, "access_token": query["access_token"]}
        if not constant_time_equal(params["mp_sig"], v1_mp_sig(signed, path, session_key)):
            return error(90009)
    try:
        if route.op == "getbalance":
            c = state.counters(openid, zone_id, missing_ok=True)
            return {
                "errcode": 0,
                "errmsg": "ok",
                "balance": c["balance"],
                "gen_balance": c["gen_balance"],
                "first_save": 1 if c["first_save"] else 2,
                "save_amt": c["save_amt"],
                "save_sum": c["save_sum"],
                "cost_sum": c["cost_sum"],
                "present_sum": c["present_sum"],
            }
        bill_no = params["bill_no"]
        if route.op == "pay":
            order = state.pay(openid, zone_id, params["amt"], bill_no)
            return {
                "errcode": 0,
                "errmsg": "ok",
                "bill_no": bill_no,
                "balance": order.balance_after,
                "used_gen_amt": order.used_gen,
            }
        if route.op == "cancelpay":
            state.cancelpay(openid, zone_id, bill_no)
            return {"errcode": 0, "errmsg": "ok", "bill_no": bill_no}
        order = state.credit("present", openid, zone_id, params["present_counts"], bill_no)
        return {"errcode": 0, "errmsg": "ok", "balance": order.balance_after, "bill_no": bill_no}
    except MoveRefused as exc:
        return {"errcode": exc.errcode, "errmsg": exc.errmsg}


def _v2(
    state: SimState,
    config: SimConfig,
    route: Route,
    path: str,
    query: dict[str, str],
    body: bytes,
    params: Json,
) -> Json:
    for name in ("signature", "sig_method", "pay_sig"):
        if not query.get(name):
            return error(40101, name, v2=True)
    if query["sig_method"] != "hmac_sha256":
        return error(90018, "sig_method", v2=True)
    env = params.get("env")
    if env is None:
        return error(40101, "env", v2=True)
    if isinstance(env, bool) or env not in (0, 1):
        return error(90018, "env", v2=True)
    # pay_sig covers the exact bytes posted, with the AppKey of the environment they name.
    app_key = config.app_key("production" if env == 0 else "sandbox")
    if not constant_time_equal(query["pay_sig"], v2_pay_sig(path, body, app_key)):
        return error(90011, v2=True)
    failed = _check_params(params, _V2_REQUIRED[route.op], v2=True) or _check_common(
        config, params, v2=True
    )
    if failed:
        return failed
    openid, zone_id = params["openid"], params["zone_id"]
    session_key = state.session_key(openid, zone_id)
    if session_key is None:
        return error(90016, v2=True)
    if not constant_time_equal(query["signature"], v2_signature(body, session_key)):
        return error(90010, v2=True)
    try:
        if route.op == "getbalance":
            c = state.counters(openid, zone_id, missing_ok=True)
            return {
                "errcode": 0,
                "errmsg": "ok",
                "balance": c["balance"],
                "present_balance": c["gen_balance"],
                "sum_save": c["save_amt"],
                "sum_present": c["present_sum"],
                "sum_balance": c["save_sum"],
                "sum_cost": c["cost_sum"],
                "first_save": c["first_save"],
            }
        order_id = params["order_id"]
        if route.op == "pay":
            order = state.pay(openid, zone_id, params["amount"], order_id)
            return {
                "errcode": 0,
                "errmsg": "ok",
                "order_id": order_id,
                "balance": order.balance_after,
                "used_present_amount": order.used_gen,
            }
        if route.op == "cancelpay":
            state.cancelpay(
                openid,
                zone_id,
                params["pay_order_id"],
                cancel_bill_no=order_id,
                amount=params.get("amount"),
            )
            return {"errcode": 0, "errmsg": "ok", "order_id": order_id}
        order = state.credit("present", openid, zone_id, params["amount"], order_id)
        return {"errcode": 0, "errmsg": "ok", "balance": order.balance_after, "order_id": order_id}
    except MoveRefused as exc:
        return {"errcode": exc.errcode, "errmsg": exc.errmsg}


def _credentials_error(
    config: SimConfig, grant_type: object, appid: object, secret: object
) -> Json | None:
    if not isinstance(appid, str) or not appid:
        return error(41002)
    if not isinstance(secret, str) or not secret:
        return error(41004)
    if grant_type != "client_credential":
        return error(40002)
    if appid != config.appid:
        return error(40013)
    if not constant_time_equal(secret, config.app_secret):
        return error(40125)
    return None


def _stable_token(state: SimState, config: SimConfig, method: str, body: bytes) -> Json:
    if method != "POST":
        return error(43002)
    params = _json_object(body)
    if params is None:
        return error(47001)
    failed = _credentials_error(
        config, params.get("grant_type"), params.get("appid"), params.get("secret")
    )
    if failed:
        return failed
    force = params.get("force_refresh", False)
    if not isinstance(force, bool):
        return error(40097, "force_refresh")
    token, expires_in = state.stable_token(force_refresh=force)
    return {"access_token": token, "expires_in": expires_in}


def _basic_token(state: SimState, config: SimConfig, method: str, query: dict[str, str]) -> Json:
    if method != "GET":
        return error(43001)
    failed = _credentials_error(
        config, query.get("grant_type"), query.get("appid"), query.get("secret")
    )
    if failed:
        return failed
    token, expires_in = state.basic_token()
    return {"access_token": token, "expires_in": expires_in}
