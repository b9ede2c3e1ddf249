"""The error policy of one batch (PRODUCT.md §6), against a scripted Midas."""

from __future__ import annotations

import os
import signal
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
from worker.recon.fetch import FetchPool, FetchTarget, RetryPolicy, fetch_all

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
        source,
        targets(*openids),
        pool=FetchPool(4),
        deadline=time.monotonic() + deadline_s,
        policy=FAST,
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
        source, targets(*names), pool=FetchPool(1), deadline=time.monotonic() + 30, policy=FAST
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


class Slow(Scripted):
    """Every answer takes `delay` seconds; notes which thread asked (by name: a thread's
    ident may be reused by the next one)."""

    def __init__(self, script: dict[str, list[object]], delay: float) -> None:
        super().__init__(script)
        self.delay = delay
        self.threads: set[str] = set()

    def get_balance(
        self, openid: str, zone_id: str = "1", session_key: str | None = None
    ) -> Balance:
        with self.lock:
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return super().get_balance(openid, zone_id, session_key)


def test_the_fetch_threads_serve_every_batch_of_the_process() -> None:
    pool = FetchPool(4)
    names = [f"o{i}" for i in range(12)]
    source = Slow({name: [BALANCE] for name in names}, delay=0.002)
    threads_before = threading.active_count()
    for _ in range(5):
        report = fetch_all(source, targets(*names), pool=pool, deadline=time.monotonic() + 30)
        assert len(report.outcomes) == 12 and report.unfetched == []
    # Five batches, the same four threads at most: none started per batch, none left over.
    assert len(source.threads) <= 4
    assert threading.active_count() <= threads_before + 4
    pool.shutdown()
    assert threading.active_count() <= threads_before


class TimeLimit(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded, raised by a signal in the task's thread."""


def test_a_batch_interrupted_in_its_thread_stops_its_fetches() -> None:
    pool = FetchPool(1)
    names = [f"o{i}" for i in range(20)]
    script: dict[str, list[object]] = {name: [BALANCE] for name in names}
    script["busy"] = [RetryableError("Midas errcode -1: system busy", errcode=-1)]
    source = Slow(script, delay=0.01)
    slow_retries = RetryPolicy(attempts=4, base_s=0.2, cap_s=0.4)

    def expire(signum: int, frame: object) -> None:
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 0.05)  # while "busy" waits before its second attempt
    try:
        with pytest.raises(TimeLimit):
            fetch_all(
                source,
                targets("busy", *names),
                pool=pool,
                deadline=time.monotonic() + 30,
                policy=slow_retries,
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(0.6)  # "busy" would be on its third attempt, the others under way
    assert dict(source.calls) == {"busy": 1}
    # The pool still serves the next batch.
    report = fetch_all(source, targets("o1", "o2"), pool=pool, deadline=time.monotonic() + 30)
    assert len(report.outcomes) == 2
    pool.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_process_gets_threads_of_its_own() -> None:
    pool = FetchPool(2)
    names = ["a", "b", "c"]
    script: dict[str, list[object]] = {name: [BALANCE] for name in names}
    assert len(fetch_all(Slow(script, 0), targets(*names), pool=pool, deadline=1e12).outcomes) == 3
    pid = os.fork()
    if pid == 0:  # the child: the inherited executor has no threads here
        signal.alarm(10)  # a hang ends the child with SIGALRM instead of hanging the test
        try:
            report = fetch_all(Slow(script, 0), targets(*names), pool=pool, deadline=1e12)
            os._exit(0 if len(report.outcomes) == 3 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pool.shutdown()
