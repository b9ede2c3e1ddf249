"""The simulator's model of Midas: players, orders, access tokens, injected faults and request
statistics. One lock guards all of it; callers hash, parse JSON and sleep outside it.

Counter semantics (one coin per unit of top-up). They are PRODUCT.md §5's default checks, so a
ledger built from the same movements (`movements()`) agrees with every answer:

- ``save_sum``    = Σ top-ups (save)                           ledger: Σ save
- ``save_amt``    = ``save_sum`` (a top-up of N coins costs N: there is one price)
- ``present_sum`` = Σ gifts (present)                          ledger: Σ present
- ``cost_sum``    = Σ spends (pay) - Σ cancelled spends        ledger: Σ cost - Σ cancel
- ``balance``     = save_sum + present_sum - cost_sum          ledger: Σ save + Σ present
                                                                       - Σ cost + Σ cancel
- ``gen_balance`` = gifted coins still held: a spend uses gifted coins first (its
  ``used_gen_amt``) and a cancel gives the same split back, so 0 <= gen_balance <= balance
- ``first_save``  = a top-up has happened (v1 answers 1 yes / 2 no, v2 true / false)

v2 names: present_balance = gen_balance, sum_save = save_amt, sum_balance = save_sum,
sum_present = present_sum, sum_cost = cost_sum.
"""

from __future__ import annotations

import base64
import random
import secrets
import string
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.simulator.config import FAULT_KINDS, PRE_FAULTS, VALUE_FAULTS, SimConfig

# Amounts above this are refused as bad parameters (far inside BIGINT, far above any purchase).
MAX_AMOUNT = 10**12
_OPENID_ALPHABET = string.ascii_letters + string.digits + "-_"


class MoveRefused(Exception):
    """Midas refused a coin movement; `errcode` is the code its API answers (90012, 90013...)."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg


@dataclass(slots=True)
class Player:
    openid: str
    zone_id: str
    save_sum: int = 0
    present_sum: int = 0
    cost_sum: int = 0
    gen_balance: int = 0  # gifted coins still held (see the module docstring)
    session_key: str | None = None  # None: no live session (logged out long ago, or expired)

    @property
    def balance(self) -> int:
        return self.save_sum + self.present_sum - self.cost_sum

    def counters(self) -> dict[str, int | bool]:
        """The v1 field names; ``first_save`` as a bool (v1 answers it as 1 / 2)."""
        return {
            "balance": self.balance,
            "gen_balance": self.gen_balance,
            "first_save": self.save_sum > 0,
            "save_amt": self.save_sum,
            "save_sum": self.save_sum,
            "cost_sum": self.cost_sum,
            "present_sum": self.present_sum,
        }


@dataclass(slots=True)
class Order:
    """A save, present or pay, kept under its bill_no so a replay gets the first answer."""

    kind: str  # "save" | "present" | "pay"
    bill_no: str
    openid: str
    zone_id: str
    amount: int
    balance_after: int
    used_gen: int = 0  # pay: gifted coins it used
    cancelled: bool = False


@dataclass(slots=True)
class Fault:
    kind: str
    count: int | None  # fires on the next `count` matching requests, then is gone
    rate: float | None  # or fires on each matching request with this probability
    path: str | None  # a path prefix; None = every Midas endpoint


@dataclass(slots=True)
class _Token:
    expires_at: float  # wall clock (time.time()), like WeChat's expires_in
    revoked: bool = False


def max_per_window(times: Sequence[float], width: float = 1.0) -> int:
    """The most events in any window (t - width, t]: two pointers over the sorted times."""
    ts = sorted(times)
    best = 0
    left = 0
    for right, t in enumerate(ts):
        while ts[left] <= t - width:
            left += 1
        best = max(best, right - left + 1)
    return best


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise MoveRefused(90018, f"invalid parameter: {name}")
    return value


def _check_amount(name: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoveRefused(90018, f"invalid parameter: {name}")
    if value > MAX_AMOUNT or value < 0 or (value == 0 and not allow_zero):
        raise MoveRefused(90018, f"invalid parameter: {name}")
    return value


class SimState:
    """Players, orders, tokens, faults and statistics behind one lock."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        # One lock for everything: each critical section is a few dict operations, so a
        # single lock costs less than the bookkeeping several would need.
        self._lock = threading.Lock()
        self._players: dict[tuple[str, str], Player] = {}
        self._orders: dict[str, Order] = {}  # save, present and pay share one bill_no space
        self._movements: list[dict[str, Any]] = []
        self._tokens: dict[str, _Token] = {}
        self._stable_token: str | None = None
        self._basic_token: str | None = None
        self._faults: list[Fault] = []
        self._fault_rng = random.Random(config.seed)  # seeded: reproducible faults
        self.rate_limit = config.rate_limit
        self.latency_s = config.latency_ms / 1000.0
        # The rate rule's own record of the last second of Midas arrivals. Not reset with the
        # stats: enforcement must not forget requests that really arrived.
        self._window: deque[float] = deque()
        self._reset_stats_locked()
        if config.players:
            self._add_synthetic(config.players, config.seed, config.expired_session_ratio)

    # -- statistics -------------------------------------------------------------------------

    def _reset_stats_locked(self) -> None:
        self._requests = 0
        self._by_path: Counter[str] = Counter()
        self._by_errcode: Counter[int] = Counter()
        self._faults_fired: Counter[str] = Counter()
        self._token_calls = 0
        self._force_refresh_calls = 0
        self._connections = 0
        self._arrivals: list[tuple[float, str]] = []
        self._midas_arrivals: list[float] = []
        # With `kernel_stamps`: per Midas arrival (kernel receive, handler), unix seconds.
        self._stamps: list[tuple[float | None, float]] = []
        # Midas arrivals of the last second since the reset, and the most it ever held: the
        # same number `max_per_window` finds over all arrivals, kept as they come so it
        # survives the trimming of the recorded arrivals in a long-running simulator.
        self._stats_window: deque[float] = deque()
        self._max_per_second = 0

    def reset_stats(self) -> None:
        with self._lock:
            self._reset_stats_locked()

    def admit(
        self, path: str, kind: str, kernel_at: float | None = None
    ) -> tuple[bool, str | None]:
        """Record one arrival (kind "midas", "token" or "other"); `kernel_at` is when the
        kernel received its first bytes (unix seconds), with `kernel_stamps`.

        Returns whether the rate rule refuses it (45011) and which answer-replacing fault fires.
        """
        with self._lock:
            now = time.monotonic()  # taken under the lock, so arrivals are recorded in order
            if kind == "midas" and self._config.kernel_stamps:
                # The handler's moment on the kernel's clock (CLOCK_REALTIME), so the two
                # subtract; the rate rule below keeps counting the handler's moments.
                self._stamps.append((kernel_at, time.time()))
            self._requests += 1
            self._by_path[path] += 1
            self._arrivals.append((now, path))
            if len(self._arrivals) > self._config.max_recorded_arrivals:
                self._trim_locked()
            limited = False
            if kind == "midas":
                self._midas_arrivals.append(now)
                # Windows are (now - 1 s, now], the ones `max_per_second` measures: a client
                # that never exceeds the rate in any such window never sees a 45011.
                edge = now - 1.0
                window = self._window
                window.append(now)
                while window[0] <= edge:
                    window.popleft()
                limited = self.rate_limit is not None and len(window) > self.rate_limit
                seen = self._stats_window
                seen.append(now)
                while seen[0] <= edge:
                    seen.popleft()
                self._max_per_second = max(self._max_per_second, len(seen))
            elif kind == "token":
                self._token_calls += 1
            if limited or not self._faults:
                return limited, None
            return False, self._take_fault_locked(path, kind == "midas", has_balance=False)

    def _trim_locked(self) -> None:
        # Forget the oldest tenth at once, so the copying is rare (amortised O(1)).
        keep = self._config.max_recorded_arrivals * 9 // 10
        cutoff = self._arrivals[-keep][0]
        del self._arrivals[:-keep]
        self._midas_arrivals = [t for t in self._midas_arrivals if t >= cutoff]
        if self._stamps:  # one pair per Midas arrival, in the same order: keep the same ones
            del self._stamps[: len(self._stamps) - len(self._midas_arrivals)]

    def take_answer_fault(self, path: str, is_midas: bool, *, has_balance: bool) -> str | None:
        """After handling: the transport or value fault (if any) that spoils this answer."""
        if not self._faults:  # unlocked peek: the common case pays for no lock
            return None
        with self._lock:
            return self._take_fault_locked(path, is_midas, has_balance=has_balance, after=True)

    def _take_fault_locked(
        self, path: str, is_midas: bool, *, has_balance: bool, after: bool = False
    ) -> str | None:
        for i, fault in enumerate(self._faults):
            if (fault.kind not in PRE_FAULTS) != after:
                continue
            if fault.path is None and not is_midas:
                continue
            if fault.path is not None and not path.startswith(fault.path):
                continue
            if fault.kind in VALUE_FAULTS and not has_balance:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count == 0:
                    del self._faults[i]
            elif self._fault_rng.random() >= (fault.rate or 0.0):
                continue
            self._faults_fired[fault.kind] += 1
            return fault.kind
        return None

    def record_answer(self, errcode: int) -> None:
        with self._lock:
            self._by_errcode[errcode] += 1

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self._requests,
                "by_path": dict(self._by_path),
                "by_errcode": dict(self._by_errcode),
                "token_calls": self._token_calls,
                "force_refresh_calls": self._force_refresh_calls,
                "faults": dict(self._faults_fired),
                "connections": self._connections,
                "max_per_second": self._max_per_second,
            }

    def arrivals(self, path_prefix: str | None = None) -> list[float]:
        with self._lock:
            if path_prefix is None:
                times = list(self._midas_arrivals)
            else:
                times = [t for t, p in self._arrivals if p.startswith(path_prefix)]
        times.sort()
        return times

    def arrival_stamps(self) -> list[tuple[float | None, float]]:
        with self._lock:
            stamps = list(self._stamps)
        stamps.sort(key=lambda s: s[1])
        return stamps

    # -- faults and runtime settings --------------------------------------------------------

    def inject(
        self,
        kind: str,
        *,
        count: int | None = None,
        rate: float | None = None,
        path: str | None = None,
    ) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {kind!r}; known: {', '.join(sorted(FAULT_KINDS))}"
            )
        if count is not None and rate is not None:
            raise ValueError("give count (next N requests) or rate (probability), not both")
        if count is None and rate is None:
            count = 1  # just the next matching request
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 1
        ):
            raise ValueError("count must be a positive integer")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0
        ):
            raise ValueError("rate must be a probability within [0, 1]")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError("path must be a URL path prefix starting with '/'")
        with self._lock:
            self._faults.append(Fault(kind, count, None if rate is None else float(rate), path))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def configure(self, *, rate_limit: float | None, latency_ms: float) -> None:
        if rate_limit is not None and not rate_limit > 0:
            raise ValueError("rate_limit must be positive or None")
        if latency_ms < 0:
            raise ValueError("latency_ms must not be negative")
        with self._lock:
            self.rate_limit = rate_limit
            self.latency_s = latency_ms / 1000.0

    # -- access tokens ----------------------------------------------------------------------

    def _new_token_locked(self, now: float, ttl_s: float) -> str:
        token = secrets.token_urlsafe(48)  # unguessable, unlike the seeded player data
        self._tokens[token] = _Token(now + ttl_s)
        return token

    def stable_token(self, *, force_refresh: bool) -> tuple[str, int]:
        """Same token until `stable_token_overlap_s` before expiry; old and new then overlap."""
        now = time.time()
        with self._lock:
            token = self._stable_token or ""
            current = self._tokens.get(token)
            if force_refresh:
                self._force_refresh_calls += 1
                if current is not None:
                    current.revoked = True
                current = None
            if (
                current is None
                or current.revoked
                or current.expires_at - now <= self._config.stable_token_overlap_s
            ):
                token = self._stable_token = self._new_token_locked(now, self._config.token_ttl_s)
                current = self._tokens[token]
            return token, int(current.expires_at - now)

    def basic_token(self) -> tuple[str, int]:
        """`/cgi-bin/token`: a new token on every call, and the previous one stops working."""
        now = time.time()
        with self._lock:
            previous = self._tokens.get(self._basic_token or "")
            if previous is not None:
                previous.revoked = True
            self._basic_token = self._new_token_locked(now, self._config.token_ttl_s)
            return self._basic_token, self._config.token_ttl_s

    def issue_token(self, ttl_s: float | None = None) -> str:
        """A valid token outside both endpoints, as a central token service would hold."""
        with self._lock:
            return self._new_token_locked(time.time(), ttl_s or self._config.token_ttl_s)

    def token_status(self, token: str | None) -> int:
        """0 valid, 41001 missing, 40001 unknown or revoked, 42001 expired."""
        if not token:
            return 41001
        with self._lock:
            found = self._tokens.get(token)
            if found is None or found.revoked:
                return 40001
            return 42001 if found.expires_at <= time.time() else 0

    def expire_tokens(self) -> None:
        now = time.time()
        with self._lock:
            for token in self._tokens.values():
                token.expires_at = min(token.expires_at, now)

    # -- players ----------------------------------------------------------------------------

    def _add_synthetic(self, n: int, seed: int, expired_ratio: float) -> None:
        rng = random.Random(seed)  # seeded: the same players every time
        while len(self._players) < n:
            openid = "o" + "".join(rng.choices(_OPENID_ALPHABET, k=27))
            if (openid, "1") in self._players:
                continue
            save = rng.randint(1, 50_000) if rng.random() < 0.8 else 0
            present = rng.randint(1, 5_000) if rng.random() < 0.5 else 0
            cost = rng.randint(0, save + present)
            live = rng.random() >= expired_ratio
            key = base64.b64encode(rng.randbytes(16)).decode("ascii")
            self._players[(openid, "1")] = Player(
                openid, "1", save, present, cost, max(0, present - cost), key if live else None
            )

    def add_player(
        self,
        openid: str,
        zone_id: str,
        *,
        save: int,
        present: int,
        cost: int,
        session_key: str | None,
    ) -> None:
        try:
            _check_id("openid", openid)
            _check_id("zone_id", zone_id)
            for name, value in (("save", save), ("present", present), ("cost", cost)):
                _check_amount(name, value, allow_zero=True)
        except MoveRefused as exc:
            raise ValueError(exc.errmsg) from None
        if cost > save + present:
            raise ValueError("cost exceeds save + present: the balance would be negative")
        if session_key is not None and (not isinstance(session_key, str) or not session_key):
            raise ValueError("session_key must be a non-empty string or None")
        with self._lock:
            if (openid, zone_id) in self._players:
                raise ValueError(f"player {openid!r} zone {zone_id!r} exists already")
            # Gifts are spent first, so only the gifts beyond all spending are still held.
            gen = max(0, present - cost)
            self._players[(openid, zone_id)] = Player(
                openid, zone_id, save, present, cost, gen, session_key
            )

    def players(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "openid": p.openid,
                    "zone_id": p.zone_id,
                    "session_key": p.session_key,
                    "counters": p.counters(),
                }
                for p in self._players.values()
            ]

    def counters(
        self, openid: str, zone_id: str, *, missing_ok: bool = False
    ) -> dict[str, int | bool]:
        """A player's counters; an unknown one is a KeyError, or all zero with `missing_ok`
        (what getbalance answers for a player who never paid)."""
        with self._lock:
            player = self._players.get((openid, zone_id))
            if player is not None:
                return player.counters()
        if missing_ok:
            return Player(openid, zone_id).counters()
        raise KeyError(f"unknown player {openid!r} zone {zone_id!r}")

    def session_key(self, openid: str, zone_id: str) -> str | None:
        with self._lock:
            player = self._players.get((openid, zone_id))
            return None if player is None else player.session_key

    def set_session(self, openid: str, zone_id: str, session_key: str | None) -> None:
        """A login (a new key replaces the old one) or, with None, an expiry."""
        if session_key is not None and (not isinstance(session_key, str) or not session_key):
            raise ValueError("session_key must be a non-empty string or None")
        with self._lock:
            player = self._players.get((openid, zone_id))
            if player is None:
                raise KeyError(f"unknown player {openid!r} zone {zone_id!r}")
            player.session_key = session_key

    # -- coin movements ---------------------------------------------------------------------

    def _replay_locked(
        self, kind: str, bill_no: str, openid: str, zone_id: str, amount: int
    ) -> Order | None:
        order = self._orders.get(bill_no)
        if order is None:
            return None
        if (order.kind, order.openid, order.zone_id, order.amount) == (
            kind,
            openid,
            zone_id,
            amount,
        ):
            return order  # idempotent: the same order again gets the first answer
        raise MoveRefused(90012, "order exists: bill_no already used by a different order")

    def _record_locked(self, order: Order, kind: str, bill_no: str, **extra: Any) -> None:
        self._movements.append(
            {
                "bill_no": bill_no,
                "kind": kind,
                "openid": order.openid,
                "zone_id": order.zone_id,
                "amount": order.amount,
                "at": time.time(),
                **extra,
            }
        )

    def credit(self, kind: str, openid: str, zone_id: str, amount: int, bill_no: str) -> Order:
        """A top-up (kind "save") or a gift ("present"); creates an unknown player."""
        _check_id("openid", openid)
        _check_id("zone_id", zone_id)
        _check_id("bill_no", bill_no)
        _check_amount("amount", amount)
        with self._lock:
            replay = self._replay_locked(kind, bill_no, openid, zone_id, amount)
            if replay is not None:
                return replay
            player = self._players.get((openid, zone_id))
            if player is None:
                player = self._players[(openid, zone_id)] = Player(openid, zone_id)
            if kind == "save":
                player.save_sum += amount
            else:
                player.present_sum += amount
                player.gen_balance += amount
            order = Order(kind, bill_no, openid, zone_id, amount, player.balance)
            self._orders[bill_no] = order
            self._record_locked(order, kind, bill_no)
            return order

    def pay(self, openid: str, zone_id: str, amount: int, bill_no: str) -> Order:
        """A spend; gifted coins go first. 90013 when the balance is short (nothing moves)."""
        _check_id("openid", openid)
        _check_id("zone_id", zone_id)
        _check_id("bill_no", bill_no)
        _check_amount("amount", amount)
        with self._lock:
            replay = self._replay_locked("pay", bill_no, openid, zone_id, amount)
            if replay is not None:
                return replay
            player = self._players.get((openid, zone_id))
            if player is None or player.balance < amount:
                raise MoveRefused(90013, "balance not enough")
            used_gen = min(player.gen_balance, amount)
            player.cost_sum += amount
            player.gen_balance -= used_gen
            order = Order("pay", bill_no, openid, zone_id, amount, player.balance, used_gen)
            self._orders[bill_no] = order
            self._record_locked(order, "cost", bill_no)
            return order

    def cancelpay(
        self,
        openid: str,
        zone_id: str,
        bill_no: str,
        *,
        cancel_bill_no: str | None = None,
        amount: int | None = None,
    ) -> Order:
        """Roll back the pay `bill_no`: 90000 unknown (for this player), 90015 already done."""
        _check_id("bill_no", bill_no)
        with self._lock:
            order = self._orders.get(bill_no)
            if (
                order is None
                or order.kind != "pay"
                or (order.openid, order.zone_id)
                != (
                    openid,
                    zone_id,
                )
            ):
                raise MoveRefused(90000, "order not found")
            if order.cancelled:
                raise MoveRefused(90015, "order already rolled back")
            if amount is not None and amount != order.amount:
                raise MoveRefused(90018, "invalid parameter: amount differs from the pay")
            player = self._players[(openid, zone_id)]
            player.cost_sum -= order.amount
            player.gen_balance += order.used_gen
            order.cancelled = True
            self._record_locked(
                order, "cancel", cancel_bill_no or f"{bill_no}.cancel", ref_bill_no=bill_no
            )
            return order

    def movements(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m) for m in self._movements]
