"""Login attempts, rate-limited per client address and per name tried.

In memory: the console is one server process (waitress, threads). Five failures in five
minutes from one address or against one name lock that key until the oldest expires; the
answer says "too many attempts" whatever the password, so guessing cannot continue.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

MAX_FAILURES = 5
WINDOW_S = 300.0
MAX_KEYS = 100_000  # a flood of names must not grow memory without bound


class LoginThrottle:
    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, *keys: str) -> bool:
        now = self.clock()
        with self._lock:
            return any(len(self._recent(key, now)) >= self.max_failures for key in keys)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._failures) >= MAX_KEYS:
                self._forget_expired(now)
            for key in keys:
                self._recent(key, now).append(now)

    def _recent(self, key: str, now: float) -> deque[float]:
        stamps = self._failures.setdefault(key, deque())
        while stamps and now - stamps[0] > self.window_s:
            stamps.popleft()
        return stamps

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, v in self._failures.items() if not v or now - v[-1] > self.window_s]:
            del self._failures[key]
        if len(self._failures) >= MAX_KEYS:
            self._failures.clear()  # still full: a flood; forgetting beats running out of memory
