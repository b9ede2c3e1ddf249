"""v1 endpoints over real HTTP: answers, signatures (sig, mp_sig), parameters, tokens."""

from __future__ import annotations

import time

import pytest

from tests.simulator.conftest import OPENID, SESSION_KEY, Api
from worker.midas.signing import v1_sig
from worker.simulator import Simulator

pytestmark = pytest.mark.integration

V1_FIELDS = {"errcode", "errmsg", "balance", "gen_balance", "first_save", "save_amt"} | {
    "save_sum",
    "cost_sum",
    "present_sum",
}


@pytest.mark.parametrize("env", ["sandbox", "production"])
def test_getbalance_answers_the_v1_shape(api: Api, env: str) -> None:
    answer = api.v1("getbalance", env=env)
    assert answer == {
        "errcode": 0,
        "errmsg": "ok",
        "balance": 1100,
        "gen_balance": 100,
        "first_save": 1,
        "save_amt": 1000,
        "save_sum": 1000,
        "cost_sum": 0,
        "present_sum": 100,
    }
    assert set(answer) == V1_FIELDS


def test_getbalance_of_a_player_who_never_paid_is_zero_and_first_save_2(api: Api) -> None:
    answer = api.v1("getbalance", api.v1_params("oNEVERPAID00000000000000000000"))
    assert answer["errcode"] == 0
    assert answer["balance"] == answer["save_sum"] == answer["gen_balance"] == 0
    assert answer["first_save"] == 2


def test_getbalance_without_mp_sig_needs_no_session(api: Api, sim: Simulator) -> None:
    sim.expire_session(OPENID)
    assert api.v1("getbalance")["errcode"] == 0


def test_sig_uses_the_path_posted_to_as_org_loc(api: Api) -> None:
    # Signed for the production path but posted to the sandbox one.
    answer = api.v1("getbalance", sign_path="/cgi-bin/midas/getbalance")
    assert answer["errcode"] == 90011


@pytest.mark.parametrize(
    ("env", "wrong_key"),
    [("sandbox", "sim-prod-appkey"), ("production", "sim-sandbox-appkey")],
)
def test_each_environment_has_its_own_app_key(api: Api, env: str, wrong_key: str) -> None:
    assert api.v1("getbalance", env=env, app_key=wrong_key)["errcode"] == 90011


def test_uppercase_sig_is_rejected(api: Api) -> None:
    params = api.v1_params()
    params["sig"] = v1_sig(params, "/cgi-bin/midas/sandbox/getbalance", "sim-sandbox-appkey")
    assert api.v1("getbalance", dict(params))["errcode"] == 0
    params["sig"] = params["sig"].upper()
    answer = api.v1("getbalance", params)
    assert answer == {"errcode": 90011, "errmsg": "sig error"}


def test_sig_covers_every_parameter_sent(api: Api) -> None:
    params = api.v1_params(user_ip="10.0.0.1")
    params["sig"] = v1_sig(params, "/cgi-bin/midas/sandbox/getbalance", "sim-sandbox-appkey")
    assert api.v1("getbalance", dict(params))["errcode"] == 0
    params["user_ip"] = "10.0.0.2"  # changed after signing
    assert api.v1("getbalance", params)["errcode"] == 90011


def test_mp_sig_right_wrong_and_without_session(api: Api, sim: Simulator) -> None:
    assert api.v1("getbalance", session_key=SESSION_KEY)["errcode"] == 0
    answer = api.v1("getbalance", session_key="c3RhbGVrZXlzdGFsZWtleQ==")
    assert answer == {"errcode": 90009, "errmsg": "mp_sig error"}
    sim.expire_session(OPENID)
    assert api.v1("getbalance", session_key=SESSION_KEY)["errcode"] == 90010
    unknown = api.v1_params("oUNKNOWN000000000000000000000")
    assert api.v1("getbalance", unknown, session_key=SESSION_KEY)["errcode"] == 90010


def test_mp_sig_is_checked_against_the_current_session_after_a_new_login(
    api: Api, sim: Simulator
) -> None:
    sim.set_session(OPENID, "1", "bmV3c2Vzc2lvbmtleTEyMw==")
    assert api.v1("getbalance", session_key=SESSION_KEY)["errcode"] == 90009
    assert api.v1("getbalance", session_key="bmV3c2Vzc2lvbmtleTEyMw==")["errcode"] == 0


@pytest.mark.parametrize("missing", ["openid", "appid", "offer_id", "ts", "zone_id", "pf", "sig"])
def test_missing_parameter_is_40101(api: Api, missing: str) -> None:
    params = api.v1_params()
    params.pop(missing, None)
    answer = api.v1("getbalance", params, sign=missing != "sig")  # the rest signed correctly
    assert answer["errcode"] == 40101
    assert missing in answer["errmsg"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ts", "1700000000"),  # a string, not a number
        ("ts", 1.5e9),
        ("zone_id", 1),  # a number, not a string
        ("openid", ""),
        ("pf", "ios"),
        ("pf", None),
        ("user_ip", True),
        ("extra", {"nested": 1}),
    ],
)
def test_bad_parameter_is_90018(api: Api, name: str, value: object) -> None:
    assert api.v1("getbalance", api.v1_params(**{name: value}))["errcode"] == 90018


@pytest.mark.parametrize("skew", [-700, 700])
def test_ts_far_from_now_is_90018(api: Api, skew: int) -> None:
    answer = api.v1("getbalance", api.v1_params(ts=int(time.time()) + skew))
    assert answer["errcode"] == 90018
    assert api.v1("getbalance", api.v1_params(ts=int(time.time()) + skew // 2))["errcode"] == 0


@pytest.mark.parametrize("name", ["appid", "offer_id"])
def test_another_app_or_offer_is_90017(api: Api, name: str) -> None:
    assert api.v1("getbalance", api.v1_params(**{name: "someone-else"}))["errcode"] == 90017


def test_token_errors(api: Api, sim: Simulator) -> None:
    assert api.v1("getbalance", token="not-a-token")["errcode"] == 40001
    assert api.v1("getbalance", token="")["errcode"] == 41001
    sim.expire_tokens()
    assert api.v1("getbalance")["errcode"] == 42001


def test_body_that_is_not_a_json_object_is_47001(api: Api) -> None:
    for data in (b"not json", b"[1, 2]", b"\xff\xfe"):
        r = api.http.post(
            f"{api.base}/cgi-bin/midas/sandbox/getbalance",
            params={"access_token": api.token},
            data=data,
            timeout=5,
        )
        assert r.status_code == 200
        assert r.json()["errcode"] == 47001


def test_get_on_a_post_endpoint_is_43002(api: Api) -> None:
    r = api.http.get(
        f"{api.base}/cgi-bin/midas/getbalance", params={"access_token": api.token}, timeout=5
    )
    assert r.json()["errcode"] == 43002


def test_unknown_path_is_404_and_counted(api: Api, sim: Simulator) -> None:
    r = api.http.post(f"{api.base}/cgi-bin/midas/nothing", json={}, timeout=5)
    assert r.status_code == 404
    assert sim.stats()["by_path"]["/cgi-bin/midas/nothing"] == 1


def test_answers_keep_the_connection_alive(api: Api, sim: Simulator) -> None:
    for _ in range(20):
        r = api.v1("getbalance", raw=True)
        assert r.headers["Content-Length"] == str(len(r.content))
    # The token request and the 20 balance requests shared one TCP connection.
    assert sim.stats()["connections"] == 1


def test_many_sequential_requests_are_fast(api: Api) -> None:
    # 40 ms of Nagle/delayed-ACK stall per answer would make this take 8 s.
    start = time.monotonic()
    for _ in range(200):
        assert api.v1("getbalance")["errcode"] == 0
    assert time.monotonic() - start < 4.0
