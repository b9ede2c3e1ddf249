"""Injected latency and faults: every kind, by count, by seeded rate, by path."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.simulator.conftest import OPENID, Api, start
from worker.simulator import FAULT_KINDS, SimConfig, Simulator

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kind", "errcode"),
    [("minus1", -1), ("quota_minute", 45011), ("quota_day", 45009), ("token_expired", 42001)],
)
def test_answer_replacing_faults_fire_count_times(
    api: Api, sim: Simulator, kind: str, errcode: int
) -> None:
    sim.inject(kind, count=2)
    codes = [api.v1("getbalance")["errcode"] for _ in range(3)]
    assert codes == [errcode, errcode, 0]
    assert sim.stats()["faults"] == {kind: 2}
    assert sim.stats()["by_errcode"][errcode] == 2


def test_minus1_on_pay_moves_nothing(api: Api, sim: Simulator) -> None:
    sim.inject("minus1", count=1)
    answer = api.v1("pay", api.v1_params(amt=10, bill_no="p1"))
    assert answer == {"errcode": -1, "errmsg": "system error"}
    assert sim.counters(OPENID)["cost_sum"] == 0


def test_http500(api: Api, sim: Simulator) -> None:
    sim.inject("http500", count=1)
    r = api.v1("getbalance", raw=True)
    assert r.status_code == 500
    assert api.v1("getbalance")["errcode"] == 0


def test_malformed_json(api: Api, sim: Simulator) -> None:
    sim.inject("malformed_json", count=1)
    r = api.v1("getbalance", raw=True)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    assert api.v1("getbalance")["errcode"] == 0  # the connection is still usable


def test_truncated_answer_breaks_the_read(api: Api, sim: Simulator) -> None:
    sim.inject("truncated", count=1)
    with pytest.raises(requests.exceptions.RequestException):
        api.v1("getbalance", raw=True)
    assert api.v1("getbalance")["errcode"] == 0  # a new connection works


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("wrong_types", lambda a: a["balance"] == "1100" and a["save_sum"] == "1000"),
        ("negative", lambda a: a["balance"] < 0),
        ("huge", lambda a: a["balance"] == 10**30),
    ],
)
def test_value_faults_corrupt_an_ok_balance(
    api: Api, sim: Simulator, kind: str, check: Callable[[dict[str, Any]], bool]
) -> None:
    sim.inject(kind, count=1)
    # An error answer carries no balance: the fault waits for an ok one.
    assert api.v1("getbalance", token="bad")["errcode"] == 40001
    answer = api.v1("getbalance")
    assert answer["errcode"] == 0
    assert check(answer)
    assert api.v1("getbalance")["balance"] == 1100


def test_timeout_holds_the_answer_but_the_pay_happened() -> None:
    sim = start(SimConfig(timeout_fault_s=3))
    sim.add_player(OPENID, save=100)
    api = Api(sim)
    try:
        sim.inject("timeout", count=1)
        with pytest.raises(requests.exceptions.Timeout):
            api.v1("pay", api.v1_params(amt=10, bill_no="p1"), timeout=0.3)
        # A lost answer, not a refused request: the replay gets the first answer.
        assert sim.counters(OPENID)["cost_sum"] == 10
        replay = api.v1("pay", api.v1_params(amt=10, bill_no="p1"))
        assert replay["errcode"] == 0
        assert replay["balance"] == 90
    finally:
        api.close()
        sim.stop()


def test_stop_interrupts_a_timeout_fault() -> None:
    sim = start()  # the default 30 s timeout fault
    api = Api(sim)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            api.v1("getbalance", timeout=60)
            outcome.append(None)
        except requests.exceptions.RequestException as exc:
            outcome.append(exc)

    sim.inject("timeout", count=1)
    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)
    started = time.monotonic()
    sim.stop()
    caller.join(timeout=10)
    api.close()
    assert time.monotonic() - started < 5
    assert not caller.is_alive()
    assert isinstance(outcome[0], requests.exceptions.ConnectionError)


def test_rate_faults_are_seeded_and_reproducible() -> None:
    def pattern(seed: int) -> list[int]:
        sim = start(SimConfig(seed=seed))
        api = Api(sim)
        try:
            sim.inject("minus1", rate=0.5)
            return [api.v1("getbalance")["errcode"] for _ in range(30)]
        finally:
            api.close()
            sim.stop()

    first, second = pattern(3), pattern(3)
    assert first == second
    assert 0 < first.count(-1) < 30
    assert pattern(4) != first


def test_without_count_or_rate_the_next_request_is_faulted(api: Api, sim: Simulator) -> None:
    sim.inject("minus1")
    assert [api.v1("getbalance")["errcode"] for _ in range(2)] == [-1, 0]


def test_rate_one_and_zero(api: Api, sim: Simulator) -> None:
    sim.inject("quota_minute", rate=0.0)
    assert api.v1("getbalance")["errcode"] == 0
    sim.clear_faults()
    sim.inject("minus1", rate=1.0)
    assert [api.v1("getbalance")["errcode"] for _ in range(5)] == [-1] * 5
    sim.clear_faults()
    assert api.v1("getbalance")["errcode"] == 0


def test_path_filter(api: Api, sim: Simulator) -> None:
    sim.inject("minus1", rate=1.0, path="/wxa/game/")
    assert api.v1("getbalance")["errcode"] == 0
    assert api.v2("getbalance")["errcode"] == -1
    # Without a path only Midas endpoints match; with one, a token endpoint can fail too.
    sim.clear_faults()
    sim.inject("http500", count=5)
    assert "access_token" in api.stable_token()
    sim.clear_faults()
    sim.inject("http500", count=1, path="/cgi-bin/stable_token")
    r = api.http.post(f"{api.base}/cgi-bin/stable_token", json={}, timeout=5)
    assert r.status_code == 500


def test_inject_rejects_bad_requests(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.inject("explode", count=1)
    with pytest.raises(ValueError, match="not both"):
        sim.inject("minus1", count=1, rate=0.5)
    with pytest.raises(ValueError):
        sim.inject("minus1", count=0)
    with pytest.raises(ValueError):
        sim.inject("minus1", rate=1.5)
    with pytest.raises(ValueError):
        sim.inject("minus1", count=1, path="wxa")
    assert FAULT_KINDS == {
        "minus1",
        "timeout",
        "http500",
        "malformed_json",
        "truncated",
        "wrong_types",
        "negative",
        "huge",
        "quota_minute",
        "quota_day",
        "token_expired",
    }


def test_latency_is_added_to_midas_answers_only() -> None:
    sim = start(SimConfig(latency_ms=200))
    api = Api(sim)
    try:
        started = time.monotonic()
        api.stable_token()
        token_time = time.monotonic() - started
        started = time.monotonic()
        assert api.v1("getbalance")["errcode"] == 0
        midas_time = time.monotonic() - started
    finally:
        api.close()
        sim.stop()
    assert midas_time >= 0.2
    assert token_time < midas_time
