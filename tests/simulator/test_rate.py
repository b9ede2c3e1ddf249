"""The rate rule (45011 above the configured rate) and the arrivals it is measured on."""

from __future__ import annotations

import threading

import pytest

from tests.simulator.conftest import Api, start
from worker.simulator import SimConfig, max_per_window


def test_max_per_window_counts_sliding_half_open_windows() -> None:
    assert max_per_window([]) == 0
    assert max_per_window([5.0]) == 1
    # (t - 1, t]: 0.0 and 1.0 are not in one window, 0.1 .. 1.0 are.
    assert max_per_window([0.0, 1.0]) == 1
    assert max_per_window([1.0, 0.1, 0.5, 0.0, 0.9]) == 4
    assert max_per_window([0.0, 0.2, 0.4, 2.0, 2.1, 2.2, 2.3, 5.0]) == 4
    assert max_per_window([0.0, 0.0, 0.0]) == 3


def window_counts(arrivals: list[float]) -> list[int]:
    """For each arrival: the arrivals in (t - 1, t], itself included (brute force)."""
    return [sum(1 for u in arrivals[: i + 1] if u > t - 1.0) for i, t in enumerate(arrivals)]


@pytest.mark.integration
def test_arrivals_above_the_rate_get_45011_exactly_as_the_windows_say() -> None:
    sim = start(SimConfig(rate_limit=10))
    api = Api(sim)
    try:
        codes = [api.v1("getbalance")["errcode"] for _ in range(40)]
        arrivals = sim.arrivals()
        stats = sim.stats()
    finally:
        api.close()
        sim.stop()
    assert len(arrivals) == 40
    # Sequential requests: the i-th answer belongs to the i-th arrival.
    expected = [45011 if n > 10 else 0 for n in window_counts(arrivals)]
    assert codes == expected
    assert codes[:10] == [0] * 10
    assert 45011 in codes  # 40 local requests take far less than the 3 s that would avoid it
    assert stats["by_errcode"].get(45011, 0) == codes.count(45011)
    assert stats["max_per_second"] == max(window_counts(arrivals)) == max_per_window(arrivals)


@pytest.mark.integration
def test_without_a_rate_limit_nothing_is_refused_and_concurrent_arrivals_are_all_kept() -> None:
    sim = start()
    try:
        results: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            api = Api(sim)
            try:
                for _ in range(25):
                    code = api.v1("getbalance")["errcode"]
                    with lock:
                        results.append(code)
            finally:
                api.close()

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = sim.stats()
        arrivals = sim.arrivals()
    finally:
        sim.stop()
    assert results == [0] * 100
    assert len(arrivals) == 100 == stats["by_path"]["/cgi-bin/midas/sandbox/getbalance"]
    assert arrivals == sorted(arrivals)
    assert stats["requests"] == 104  # plus one stable_token per thread
    assert stats["max_per_second"] == max_per_window(arrivals)


@pytest.mark.integration
def test_configure_changes_the_rate_while_running_and_reset_stats_clears_the_record() -> None:
    sim = start(SimConfig(rate_limit=1))
    api = Api(sim)
    try:
        assert api.v1("getbalance")["errcode"] == 0
        assert api.v1("getbalance")["errcode"] == 45011
        sim.configure(rate_limit=None)
        assert api.v1("getbalance")["errcode"] == 0
        sim.reset_stats()
        stats = sim.stats()
        assert stats["requests"] == 0
        assert stats["max_per_second"] == 0
        assert sim.arrivals() == []
    finally:
        api.close()
        sim.stop()


def test_a_long_running_simulator_keeps_the_latest_arrivals_and_the_true_maximum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.simulator import state as state_module

    # Binary fractions, so the window edges are exact: 128 arrivals a second, then 4.
    times = [i / 128 for i in range(200)] + [10 + i / 4 for i in range(100)]
    clock = iter(times)
    monkeypatch.setattr(state_module.time, "monotonic", lambda: next(clock))
    sim_state = state_module.SimState(SimConfig(rate_limit=1000, max_recorded_arrivals=50))
    for _ in times:
        sim_state.admit("/cgi-bin/midas/getbalance", "midas")
    kept = sim_state.arrivals()
    assert len(kept) <= 50
    assert kept == times[-len(kept) :]
    # The burst of 100 per second was long forgotten by the record, not by the maximum.
    assert sim_state.stats()["max_per_second"] == max_per_window(times) == 128
    assert sim_state.stats()["requests"] == 300
