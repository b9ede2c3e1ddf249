"""stable_token and token: reuse, overlap, invalidation, credential errors."""

from __future__ import annotations

import pytest

from tests.simulator.conftest import Api, start
from worker.simulator import SimConfig, Simulator

pytestmark = pytest.mark.integration


def basic_token(api: Api, **overrides: str) -> dict[str, object]:
    params = {"grant_type": "client_credential", "appid": api.cfg.appid}
    params["secret"] = api.cfg.app_secret
    params.update(overrides)
    return api.http.get(f"{api.base}/cgi-bin/token", params=params, timeout=5).json()


def test_stable_token_is_the_same_until_close_to_expiry(api: Api, sim: Simulator) -> None:
    first = api.stable_token()
    second = api.stable_token()
    assert first["access_token"] == second["access_token"] == api.token
    assert 7190 <= int(second["expires_in"]) <= 7200
    assert sim.stats()["force_refresh_calls"] == 0


def test_stable_token_overlaps_old_and_new() -> None:
    # A 10 s token renewed within its last 10 s: every call gives a new one, the old still works.
    sim = start(SimConfig(token_ttl_s=10, stable_token_overlap_s=10))
    api = Api(sim)
    try:
        old = api.token
        new = api.stable_token()["access_token"]
        assert new != old
        assert api.v1("getbalance", token=old)["errcode"] == 0
        assert api.v1("getbalance", token=new)["errcode"] == 0
    finally:
        api.close()
        sim.stop()


def test_force_refresh_invalidates_the_old_token_and_is_counted(api: Api, sim: Simulator) -> None:
    new = api.stable_token(force_refresh=True)["access_token"]
    assert new != api.token
    assert api.v1("getbalance", token=api.token)["errcode"] == 40001
    assert api.v1("getbalance", token=new)["errcode"] == 0
    assert sim.stats()["force_refresh_calls"] == 1
    assert api.stable_token(force_refresh="yes")["errcode"] == 40097


def test_expired_tokens_answer_42001_and_stable_token_hands_out_a_new_one(
    api: Api, sim: Simulator
) -> None:
    sim.expire_tokens()
    assert api.v1("getbalance")["errcode"] == 42001
    fresh = api.stable_token()["access_token"]
    assert fresh != api.token
    assert api.v1("getbalance", token=fresh)["errcode"] == 0


def test_cgi_bin_token_invalidates_the_previous_one(api: Api) -> None:
    first = basic_token(api)
    second = basic_token(api)
    assert first["expires_in"] == 7200
    assert first["access_token"] != second["access_token"]
    assert api.v1("getbalance", token=str(first["access_token"]))["errcode"] == 40001
    assert api.v1("getbalance", token=str(second["access_token"]))["errcode"] == 0
    # The two kinds of token are separate: the stable one still works.
    assert api.v1("getbalance")["errcode"] == 0


def test_issued_token_works_like_a_token_service(api: Api, sim: Simulator) -> None:
    assert api.v1("getbalance", token=sim.issue_token())["errcode"] == 0


@pytest.mark.parametrize(
    ("overrides", "errcode"),
    [
        ({"appid": "wxsomeoneelse"}, 40013),
        ({"secret": "wrong"}, 40125),
        ({"grant_type": "password"}, 40002),
        ({"appid": ""}, 41002),
        ({"secret": ""}, 41004),
    ],
)
def test_credential_errors(api: Api, overrides: dict[str, str], errcode: int) -> None:
    assert api.stable_token(**overrides)["errcode"] == errcode
    assert basic_token(api, **overrides)["errcode"] == errcode


def test_wrong_methods(api: Api) -> None:
    assert api.http.get(f"{api.base}/cgi-bin/stable_token", timeout=5).json()["errcode"] == 43002
    assert api.http.post(f"{api.base}/cgi-bin/token", timeout=5).json()["errcode"] == 43001


def test_token_calls_are_counted_apart_from_the_midas_rate() -> None:
    sim = start(SimConfig(rate_limit=2))
    api = Api(sim)  # one stable_token call
    try:
        for _ in range(5):
            assert "access_token" in api.stable_token()
        assert api.v1("getbalance")["errcode"] == 0  # the token calls used no Midas quota
        stats = sim.stats()
        assert stats["token_calls"] == 6
        assert stats["by_path"]["/cgi-bin/stable_token"] == 6
        assert stats["max_per_second"] == 1
        assert sim.arrivals() == sim.arrivals("/cgi-bin/midas/")
        assert len(sim.arrivals("/cgi-bin/stable_token")) == 6
    finally:
        api.close()
        sim.stop()


def test_a_token_answer_carries_no_errcode(api: Api, sim: Simulator) -> None:
    answer = api.stable_token()
    assert set(answer) == {"access_token", "expires_in"}
    assert sim.stats()["by_errcode"][0] >= 2
