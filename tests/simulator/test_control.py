"""The /__sim/ control endpoints, for a simulator running in another process."""

from __future__ import annotations

from typing import Any

import pytest

from tests.simulator.conftest import OPENID, Api
from worker.simulator import Simulator

pytestmark = pytest.mark.integration


def call(api: Api, method: str, name: str, body: Any = None, **query: str) -> tuple[int, Any]:
    r = api.http.request(
        method, f"{api.base}/__sim/{name}", json=body, params=query or None, timeout=5
    )
    return r.status_code, r.json()


def test_stats_and_reset(api: Api) -> None:
    api.v1("getbalance")
    status, stats = call(api, "GET", "stats")
    assert status == 200
    assert stats["requests"] == 2  # the token and the balance; control calls are not counted
    assert stats["by_path"] == {"/cgi-bin/stable_token": 1, "/cgi-bin/midas/sandbox/getbalance": 1}
    assert stats["by_errcode"] == {"0": 2}  # JSON object keys are strings
    assert stats["max_per_second"] == 1
    assert stats["token_calls"] == 1
    assert call(api, "GET", "arrivals")[1] == [pytest.approx(x) for x in api.sim.arrivals()]
    assert len(call(api, "GET", "arrivals", path_prefix="/cgi-bin/")[1]) == 2
    assert call(api, "POST", "reset_stats") == (200, {"ok": True})
    assert call(api, "GET", "stats")[1]["requests"] == 0


def test_faults(api: Api) -> None:
    assert call(api, "POST", "faults", {"kind": "minus1", "count": 1})[0] == 201
    assert api.v1("getbalance")["errcode"] == -1
    day = {"kind": "quota_day", "rate": 1.0, "path": "/cgi-bin/"}
    assert call(api, "POST", "faults", day)[0] == 201
    assert api.v1("getbalance")["errcode"] == 45009
    assert call(api, "DELETE", "faults") == (200, {"ok": True})
    assert api.v1("getbalance")["errcode"] == 0
    status, answer = call(api, "POST", "faults", {"kind": "nope", "count": 1})
    assert status == 400
    assert "unknown fault kind" in answer["error"]


def test_players(api: Api, sim: Simulator) -> None:
    status, players = call(api, "GET", "players")
    assert status == 200
    assert players == [
        {
            "openid": OPENID,
            "zone_id": "1",
            "session_key": "V7Q38/i2KXaqrQyl2Yx9Hg==",
            "counters": sim.counters(OPENID),
        }
    ]
    new = {"openid": "oNEW", "zone_id": "2", "save": 70, "present": 5, "cost": 10}
    assert call(api, "POST", "players", new) == (201, {"ok": True})
    assert sim.counters("oNEW", "2")["balance"] == 65
    assert call(api, "POST", "players", new)[0] == 400  # exists already
    assert call(api, "POST", "players", {"openid": "oBAD", "save": "lots"})[0] == 400
    assert call(api, "GET", "counters", openid="oNEW", zone_id="2")[1]["save_sum"] == 70
    assert call(api, "GET", "counters", openid="o-nobody")[0] == 404


def test_move(api: Api, sim: Simulator) -> None:
    move = {"op": "pay", "openid": OPENID, "zone_id": "1", "amount": 30, "bill_no": "m1"}
    status, answer = call(api, "POST", "move", move)
    assert status == 200
    assert answer == {"errcode": 0, "counters": sim.counters(OPENID)}
    assert answer["counters"]["cost_sum"] == 30
    status, answer = call(api, "POST", "move", {**move, "amount": 31})
    assert (status, answer["errcode"]) == (409, 90012)
    status, answer = call(api, "POST", "move", {**move, "bill_no": "m2", "amount": 10**6})
    assert (status, answer["errcode"]) == (409, 90013)
    for op, bill_no in (("save", "m3"), ("present", "m4")):
        assert call(api, "POST", "move", {**move, "op": op, "bill_no": bill_no})[0] == 200
    status, answer = call(
        api, "POST", "move", {"op": "cancelpay", "openid": OPENID, "bill_no": "m1"}
    )
    assert status == 200
    assert answer["counters"]["cost_sum"] == 0
    assert call(api, "POST", "move", {**move, "op": "steal"})[0] == 400
    status, movements = call(api, "GET", "movements")
    assert [(m["kind"], m["bill_no"]) for m in movements] == [
        ("cost", "m1"),
        ("save", "m3"),
        ("present", "m4"),
        ("cancel", "m1.cancel"),
    ]


def test_sessions_tokens_and_config(api: Api, sim: Simulator) -> None:
    assert call(api, "POST", "expire_session", {"openid": OPENID})[0] == 200
    assert api.v2("getbalance")["errcode"] == 90016
    login = {"openid": OPENID, "session_key": "bmV3a2V5"}
    assert call(api, "POST", "session", login)[0] == 200
    assert api.v2("getbalance", session_key="bmV3a2V5")["errcode"] == 0
    assert call(api, "POST", "expire_session", {"openid": "o-nobody"})[0] == 404
    status, answer = call(api, "POST", "token")
    assert status == 201
    assert api.v1("getbalance", token=answer["access_token"])["errcode"] == 0
    assert call(api, "POST", "expire_tokens")[0] == 200
    assert api.v1("getbalance")["errcode"] == 42001
    fresh = api.stable_token()["access_token"]
    assert call(api, "POST", "config", {"rate_limit": 1, "latency_ms": 0})[0] == 200
    codes = [api.v1("getbalance", token=fresh)["errcode"] for _ in range(3)]
    assert codes[1:] == [45011, 45011]
    assert call(api, "POST", "config", {"rate_limit": -1})[0] == 400


def test_bad_control_requests(api: Api) -> None:
    r = api.http.post(f"{api.base}/__sim/faults", data=b"{not json", timeout=5)
    assert r.status_code == 400
    assert call(api, "POST", "faults", [1, 2])[0] == 400
    assert call(api, "GET", "nothing")[0] == 404
    assert call(api, "DELETE", "stats")[0] == 404
