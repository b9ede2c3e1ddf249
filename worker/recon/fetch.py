"""Fetching a batch of balances: concurrency, retries, and what each answer becomes.

The Midas client makes one attempt per call (plus its own token refresh); the error policy
of PRODUCT.md §6 lives here:

- -1, timeouts, 5xx, malformed answers, a token that stays bad: retried with exponential
  backoff and jitter, at most `RetryPolicy.attempts` attempts, then an `error` snapshot;
- 45011 (QuotaPaused): the client already paused the whole fleet; the account is tried
  again after the pause, a bounded number of times;
- no live session (AccountUnobservable): an `unobservable` snapshot, never zeros;
- a stored session key that opens with no configured key: an `error` snapshot, no request;
- a rejected request (bad parameters and the like): an `error` snapshot, no retry;
- 90011 / 90017 / 45009 (RunStopper): every further call would fail too, so the batch stops
  starting fetches and reports the stopper; the account gets no snapshot (it is not at fault).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from worker import business_calendar as clock
from worker.midas.errors import (
    AccountUnobservable,
    MidasError,
    QuotaPaused,
    RequestRejected,
    RunStopper,
)
from worker.midas.types import Balance
from worker.vocabulary import SnapshotStatus

log = logging.getLogger(__name__)

ERRMSG_MAX = 500


class BalanceSource(Protocol):
    """What the fetch needs from `worker.midas.client.MidasClient`."""

    def get_balance(
        self, openid: str, zone_id: str = "1", session_key: str | None = None
    ) -> Balance: ...


@dataclass(frozen=True, slots=True)
class FetchTarget:
    account_id: int
    openid: str
    zone_id: str
    session_key: str | None = field(default=None, repr=False)
    # Why the stored session key could not be used (it opens with no configured key): the
    # account is an `error` without asking Midas.
    key_error: str | None = None


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """What Midas said about one account (or why we could not tell)."""

    target: FetchTarget
    status: SnapshotStatus
    fetched_at: dt.datetime
    balance: Balance | None = None
    errcode: int | None = None
    errmsg: str | None = None
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds for one account; the defaults spend at most ~4 s backing off."""

    attempts: int = 4
    base_s: float = 0.25
    cap_s: float = 4.0
    # 45011 pauses last until the next minute; a few in a row for one account means the
    # configured rate is above Midas' real quota, and the account is better left `error`.
    quota_waits: int = 5

    def backoff(self, attempt: int) -> float:
        """Delay before attempt `attempt + 1`: exponential, with jitter so that a burst of
        -1 answers does not come back as a synchronised burst of retries."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class FetchReport:
    outcomes: list[FetchOutcome]
    unfetched: list[FetchTarget]  # not tried (deadline, stop): back to the plan
    stopper: RunStopper | None = None


def describe(exc: BaseException) -> str:
    """A short message for errmsg and logs; MidasError messages hold no secret by contract."""
    if isinstance(exc, MidasError):
        text = str(exc) or exc.errmsg or type(exc).__name__
    else:  # unknown exceptions may echo anything: keep the class name only
        text = f"internal error ({type(exc).__name__})"
    return text[:ERRMSG_MAX]


class _Stopped(Exception):
    """The batch was told to stop (a run stopper elsewhere, the deadline) before an attempt."""


def fetch_one(
    source: BalanceSource,
    target: FetchTarget,
    *,
    policy: RetryPolicy,
    should_stop: Callable[[], bool],
    wait: Callable[[float], object],
) -> FetchOutcome:
    """One account through the error policy. Raises RunStopper or _Stopped."""
    if target.key_error is not None:
        return FetchOutcome(
            target,
            SnapshotStatus.ERROR,
            clock.utcnow(),
            None,
            None,
            target.key_error[:ERRMSG_MAX],
            0,
        )
    attempt = 0
    quota_waits = 0
    while True:
        if should_stop():
            raise _Stopped
        attempt += 1
        try:
            balance = source.get_balance(target.openid, target.zone_id, target.session_key)
        except RunStopper:
            raise
        except AccountUnobservable as exc:
            return FetchOutcome(
                target,
                SnapshotStatus.UNOBSERVABLE,
                clock.utcnow(),
                None,
                exc.errcode,
                describe(exc),
                attempt,
            )
        except QuotaPaused as exc:
            attempt -= 1  # the limiter waits out the pause; this was not the account's fault
            quota_waits += 1
            if quota_waits > policy.quota_waits:
                return FetchOutcome(
                    target,
                    SnapshotStatus.ERROR,
                    clock.utcnow(),
                    None,
                    exc.errcode,
                    describe(exc),
                    0,
                )
            continue
        except RequestRejected as exc:
            return FetchOutcome(
                target,
                SnapshotStatus.ERROR,
                clock.utcnow(),
                None,
                exc.errcode,
                describe(exc),
                attempt,
            )
        except MidasError as exc:
            # RetryableError, MidasTimeout, MalformedResponse, and a TokenError the client's
            # one refresh did not cure (the token service may be catching up).
            if attempt >= policy.attempts:
                return FetchOutcome(
                    target,
                    SnapshotStatus.ERROR,
                    clock.utcnow(),
                    None,
                    exc.errcode,
                    describe(exc),
                    attempt,
                )
            log.info(
                "midas_retry",
                extra={"account_id": target.account_id, "attempt": attempt, "errcode": exc.errcode},
            )
            wait(policy.backoff(attempt))
            continue
        except Exception as exc:  # a bug must not lose the account: record it as an error
            log.exception("fetch_internal_error", extra={"account_id": target.account_id})
            return FetchOutcome(
                target, SnapshotStatus.ERROR, clock.utcnow(), None, None, describe(exc), attempt
            )
        return FetchOutcome(target, SnapshotStatus.OK, clock.utcnow(), balance, None, None, attempt)


class FetchPool:
    """The fetch threads of one process, kept from batch to batch instead of 16 threads
    started and stopped for every 200 accounts.

    (The RSS growth per account once suspected of those threads came from glibc's malloc
    arenas, and MALLOC_ARENA_MAX=2 is what flattened it: docs/benchmarks.md §4.) Made lazily,
    and again after a fork: a child inherits the executor but none of its threads.
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._lock = threading.Lock()
        self._executor: tuple[int, ThreadPoolExecutor] | None = None

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._executor[0] != os.getpid():
                pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fetch")
                self._executor = (os.getpid(), pool)
            return self._executor[1]

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None and self._executor[0] == os.getpid():
                self._executor[1].shutdown(wait=True)
            self._executor = None


def fetch_all(
    source: BalanceSource,
    targets: Sequence[FetchTarget],
    *,
    pool: FetchPool,
    deadline: float,
    policy: RetryPolicy | None = None,
) -> FetchReport:
    """Fetch `targets` with up to `pool.threads` in flight; stop starting new ones at
    `deadline` (time.monotonic()) or at the first RunStopper.

    The threads mostly wait in the limiter: it, not this pool, holds the fleet to the rate
    and the in-flight cap, so the pool only needs enough threads to keep the limiter's
    schedule full (in-flight ≈ rate x latency).
    """
    policy = policy or RetryPolicy()
    stop = threading.Event()
    stopper: list[RunStopper] = []

    def should_stop() -> bool:
        return stop.is_set() or time.monotonic() >= deadline

    def one(target: FetchTarget) -> FetchOutcome | None:
        try:
            return fetch_one(source, target, policy=policy, should_stop=should_stop, wait=stop.wait)
        except _Stopped:
            return None
        except RunStopper as exc:
            stopper.append(exc)
            stop.set()
            return None

    report = FetchReport(outcomes=[], unfetched=[])
    if not targets:
        return report
    try:
        results = list(pool.executor().map(one, targets))
    finally:
        # The threads outlive this call: when it ends early (a soft time limit raised in this
        # thread), the fetches already running must not carry on for a batch nobody awaits.
        # map() cancels the ones not started.
        stop.set()
    for target, outcome in zip(targets, results, strict=True):
        if outcome is None:
            report.unfetched.append(target)
        else:
            report.outcomes.append(outcome)
    report.stopper = stopper[0] if stopper else None
    return report
