"""Synthetic players and the simulator's own settings."""

from __future__ import annotations

import base64
import re

import pytest

from tests.simulator.conftest import Api, start
from worker.simulator import SimConfig, Simulator


def test_synthetic_players_are_deterministic_per_seed() -> None:
    first = Simulator(SimConfig(players=200, seed=11)).players()
    again = Simulator(SimConfig(players=200, seed=11)).players()
    other = Simulator(SimConfig(players=200, seed=12)).players()
    assert first == again
    assert [p["openid"] for p in first] != [p["openid"] for p in other]
    assert len({p["openid"] for p in first}) == 200


def test_synthetic_players_look_real_and_are_consistent() -> None:
    players = Simulator(SimConfig(players=500, seed=1, expired_session_ratio=0.2)).players()
    for p in players:
        assert re.fullmatch(r"o[A-Za-z0-9_-]{27}", p["openid"])
        assert p["zone_id"] == "1"
        c = p["counters"]
        assert c["balance"] == c["save_sum"] + c["present_sum"] - c["cost_sum"] >= 0
        assert 0 <= c["gen_balance"] <= c["balance"]
        assert c["first_save"] is (c["save_sum"] > 0)
        if p["session_key"] is not None:
            assert len(base64.b64decode(p["session_key"], validate=True)) == 16
    without = sum(p["session_key"] is None for p in players)
    assert 60 <= without <= 140  # about 20 % of 500


@pytest.mark.integration
def test_a_synthetic_player_answers_over_v1_and_v2() -> None:
    sim = start(SimConfig(players=20, seed=3, expired_session_ratio=0.0))
    api = Api(sim)
    try:
        player = sim.players()[7]
        counters = player["counters"]
        v1 = api.v1("getbalance", api.v1_params(player["openid"]))
        v2 = api.v2(
            "getbalance", api.v2_params(player["openid"]), session_key=player["session_key"]
        )
    finally:
        api.close()
        sim.stop()
    assert {k: v1[k] for k in ("balance", "gen_balance", "save_sum", "cost_sum")} == {
        k: counters[k] for k in ("balance", "gen_balance", "save_sum", "cost_sum")
    }
    assert (v2["balance"], v2["present_balance"], v2["sum_cost"]) == (
        counters["balance"],
        counters["gen_balance"],
        counters["cost_sum"],
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_limit": 0},
        {"latency_ms": -1},
        {"token_ttl_s": 0},
        {"players": -1},
        {"expired_session_ratio": 1.5},
        {"port": 70000},
    ],
)
def test_bad_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**bad)  # type: ignore[arg-type]


def test_start_once_and_stop_twice() -> None:
    sim = Simulator()
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    url = sim.start()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    with pytest.raises(RuntimeError):
        sim.start()
    sim.stop()
    sim.stop()
    with pytest.raises(RuntimeError):
        sim.start()
