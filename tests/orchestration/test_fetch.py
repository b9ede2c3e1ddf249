"""The error policy of one batch (PRODUCT.md §6), against a scripted Midas."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from worker.midas.errors import (
    AccountUnobservable,
    ConfigurationError,
    MalformedResponse,
    MidasTimeout,
    QuotaExhausted,
    QuotaPaused,
    RequestRejected,
    RetryableError,
    TokenError,
)
from worker.midas.types import Balance
from worker.recon.fetch import FetchTarget, RetryPolicy, fetch_all

BALANCE = Balance(100, 0, True, 100, 100, 0, 0, "v1")
FAST = RetryPolicy(attempts=4, base_s=0.001, cap_s=0.004, quota_waits=2)


class Scripted:
    """Answers per openid from a list (an exception or a Balance); the last one repeats."""

    def __init__(self, script: dict[str, list[object]]) -> None:
        self.script = script
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def get_balance(
        self, openid: str, zone_id: str = "1", session_key: str | None = None
    ) -> Balance:
        with self.lock:
            n = self.calls[openid]
            self.calls[openid] += 1
        answers = self.script[openid]
        answer = answers[min(n, len(answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, Balance)
        return answer


def targets(*openids: str) -> list[FetchTarget]:
    return [FetchTarget(i, o, "1") for i, o in enumerate(openids, start=1)]


def run(script: dict[str, list[object]], *openids: str, deadline_s: float = 30):  # type: ignore[no-untyped-def]
    source = Scripted(script)
    report = fetch_all(
        source, targets(*openids), threads=4, deadline=time.monotonic() + deadline_s, policy=FAST
    )
    return source, report, {o.target.openid: o for o in report.outcomes}


def test_retryable_errors_are_retried_within_bounds() -> None:
    minus1 = RetryableError("Midas errcode -1: system busy", errcode=-1)
    source, report, by = run(
        {
            "a": [minus1, MidasTimeout("timeout"), MalformedResponse("not json"), BALANCE],
            "b": [minus1],
            "c": [TokenError("still bad", errcode=42001), BALANCE],
        },
        "a", "b", "c",
    )  # fmt: skip
    assert by["a"].status == "ok" and by["a"].balance == BALANCE and by["a"].attempts == 4
    assert by["b"].status == "error" and by["b"].errcode == -1 and source.calls["b"] == 4
    assert by["b"].balance is None and "-1" in (by["b"].errmsg or "")
    assert by["c"].status == "ok"
    assert report.stopper is None and report.unfetched == []


def test_unobservable_and_rejected_accounts_are_not_retried() -> None:
    source, _, by = run(
        {
            "gone": [AccountUnobservable("session expired", errcode=90016)],
            "bad": [RequestRejected("bad parameters", errcode=90018)],
        },
        "gone", "bad",
    )  # fmt: skip
    assert by["gone"].status == "unobservable" and by["gone"].errcode == 90016
    assert by["bad"].status == "error" and by["bad"].errcode == 90018
    assert source.calls == {"gone": 1, "bad": 1}


def test_a_quota_pause_is_waited_out_a_bounded_number_of_times() -> None:
    paused = QuotaPaused("minute quota", errcode=45011)
    source, _, by = run({"a": [paused, paused, BALANCE], "b": [paused]}, "a", "b")
    assert by["a"].status == "ok" and by["a"].attempts == 1  # the pauses were not its fault
    assert by["b"].status == "error" and by["b"].errcode == 45011
    assert source.calls["b"] == FAST.quota_waits + 1


@pytest.mark.parametrize(
    "stopper",
    [QuotaExhausted("day quota", errcode=45009), ConfigurationError("sig wrong", errcode=90011)],
)
def test_a_run_stopper_stops_the_batch(stopper: Exception) -> None:
    names = [f"o{i}" for i in range(40)]
    script: dict[str, list[object]] = {name: [BALANCE] for name in names}
    script["o0"] = [stopper]
    source = Scripted(script)
    report = fetch_all(
        source, targets(*names), threads=1, deadline=time.monotonic() + 30, policy=FAST
    )
    assert report.stopper is stopper
    # One thread: o0 came first, nothing was fetched after it, and o0 gets no snapshot.
    assert report.outcomes == []
    assert [t.openid for t in report.unfetched] == names
    assert sum(source.calls.values()) == 1


def test_the_deadline_leaves_the_rest_unfetched() -> None:
    names = [f"o{i}" for i in range(10)]
    _, report, _ = run({n: [BALANCE] for n in names}, *names, deadline_s=-1)
    assert report.outcomes == [] and len(report.unfetched) == 10


def test_an_unexpected_exception_is_an_error_without_its_message() -> None:
    _, _, by = run({"a": [ValueError("secret-looking text")]}, "a")
    assert by["a"].status == "error"
    assert by["a"].errmsg == "internal error (ValueError)"


def test_backoff_grows_and_is_jittered() -> None:
    policy = RetryPolicy(base_s=0.25, cap_s=4.0)
    for attempt, ceiling in ((1, 0.25), (2, 0.5), (3, 1.0), (6, 4.0), (10, 4.0)):
        delays = {policy.backoff(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1
