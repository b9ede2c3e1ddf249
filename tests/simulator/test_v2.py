"""v2 endpoints over real HTTP: the v2 shape, pay_sig and signature over the exact bytes."""

from __future__ import annotations

import json

import pytest

from tests.simulator.conftest import OPENID, Api
from worker.midas.signing import v2_pay_sig
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("env", [0, 1])
def test_getbalance_answers_the_v2_shape(api: Api, env: int) -> None:
    assert api.v2("getbalance", api.v2_params(env=env)) == {
        "errcode": 0,
        "errmsg": "ok",
        "balance": 1100,
        "present_balance": 100,
        "sum_save": 1000,
        "sum_present": 100,
        "sum_balance": 1000,
        "sum_cost": 0,
        "first_save": True,
    }


def test_the_env_in_the_body_picks_the_app_key(api: Api) -> None:
    production = api.v2("getbalance", api.v2_params(env=0), app_key="sim-sandbox-appkey")
    sandbox = api.v2("getbalance", api.v2_params(env=1), app_key="sim-prod-appkey")
    assert production["errcode"] == sandbox["errcode"] == 90011


def test_wrong_pay_sig_is_90011(api: Api) -> None:
    answer = api.v2("getbalance", query={"pay_sig": "0" * 64})
    assert answer == {"errcode": 90011, "errmsg": "pay_sig error"}


def test_pay_sig_and_signature_cover_the_exact_bytes(api: Api) -> None:
    params = api.v2_params()
    compact = json.dumps(params, separators=(",", ":")).encode()
    assert api.v2("getbalance", params, body=compact)["errcode"] == 0
    # Signed over one serialisation, another posted: same JSON, different bytes.
    spaced = json.dumps(params).encode()
    query = {"pay_sig": v2_pay_sig("/wxa/game/getbalance", compact, "sim-sandbox-appkey")}
    assert api.v2("getbalance", params, body=spaced, query=query)["errcode"] == 90011


def test_uppercase_hex_is_rejected(api: Api) -> None:
    params = api.v2_params()
    data = json.dumps(params).encode()
    pay_sig = v2_pay_sig("/wxa/game/getbalance", data, "sim-sandbox-appkey")
    answer = api.v2("getbalance", params, body=data, query={"pay_sig": pay_sig.upper()})
    assert answer["errcode"] == 90011


def test_wrong_signature_is_90010(api: Api) -> None:
    answer = api.v2("getbalance", session_key="c3RhbGVrZXlzdGFsZWtleQ==")
    assert answer == {"errcode": 90010, "errmsg": "signature error"}


def test_expired_or_unknown_session_is_90016(api: Api, sim: Simulator) -> None:
    unknown = api.v2_params("oUNKNOWN000000000000000000000")
    assert api.v2("getbalance", unknown)["errcode"] == 90016
    sim.expire_session(OPENID)
    answer = api.v2("getbalance")
    assert answer == {"errcode": 90016, "errmsg": "session_key expired, please login again"}


def test_new_login_replaces_the_session_key(api: Api, sim: Simulator) -> None:
    sim.set_session(OPENID, "1", "bmV3c2Vzc2lvbmtleTEyMw==")
    assert api.v2("getbalance")["errcode"] == 90010  # signed with the old key
    assert api.v2("getbalance", session_key="bmV3c2Vzc2lvbmtleTEyMw==")["errcode"] == 0


@pytest.mark.parametrize("missing", ["signature", "sig_method", "pay_sig"])
def test_missing_query_parameter_is_40101(api: Api, missing: str) -> None:
    assert api.v2("getbalance", query={missing: ""})["errcode"] == 40101


def test_other_sig_method_is_90018(api: Api) -> None:
    assert api.v2("getbalance", query={"sig_method": "md5"})["errcode"] == 90018


@pytest.mark.parametrize("missing", ["openid", "offer_id", "ts", "zone_id", "env", "user_ip"])
def test_missing_body_parameter_is_40101(api: Api, missing: str) -> None:
    params = api.v2_params()
    del params[missing]
    answer = api.v2("getbalance", params)  # without env, the helper signs as sandbox
    assert answer["errcode"] == 40101
    assert missing in answer["errmsg"]


@pytest.mark.parametrize(
    ("name", "value"), [("env", 2), ("env", True), ("zone_id", 1), ("ts", "1"), ("user_ip", "")]
)
def test_bad_body_parameter_is_90018(api: Api, name: str, value: object) -> None:
    assert api.v2("getbalance", api.v2_params(**{name: value}))["errcode"] == 90018


def test_token_errors(api: Api, sim: Simulator) -> None:
    assert api.v2("getbalance", token="not-a-token")["errcode"] == 40001
    sim.expire_tokens()
    assert api.v2("getbalance")["errcode"] == 42001


def test_v2_pay_present_cancelpay(api: Api, sim: Simulator) -> None:
    pay = api.v2("pay", api.v2_params(amount=150, order_id="v2-pay-1"))
    assert pay == {
        "errcode": 0,
        "errmsg": "ok",
        "order_id": "v2-pay-1",
        "balance": 950,
        "used_present_amount": 100,
    }
    present = api.v2("present", api.v2_params(amount=30, order_id="v2-gift-1"))
    assert present == {"errcode": 0, "errmsg": "ok", "balance": 980, "order_id": "v2-gift-1"}
    cancel = api.v2("cancelpay", api.v2_params(pay_order_id="v2-pay-1", order_id="v2-cancel-1"))
    assert cancel == {"errcode": 0, "errmsg": "ok", "order_id": "v2-cancel-1"}
    assert sim.counters(OPENID) == {
        "balance": 1130,
        "gen_balance": 130,
        "first_save": True,
        "save_amt": 1000,
        "save_sum": 1000,
        "cost_sum": 0,
        "present_sum": 130,
    }
    again = api.v2("cancelpay", api.v2_params(pay_order_id="v2-pay-1", order_id="v2-cancel-2"))
    assert again["errcode"] == 90015
    too_much = api.v2("pay", api.v2_params(amount=5000, order_id="v2-pay-2"))
    assert too_much["errcode"] == 90013
