"""How a simulator is set up: its fake credentials, its limits and its synthetic players."""

from __future__ import annotations

import sys
from dataclasses import dataclass

# Faults answered *instead of* handling the request: nothing moves (a pay is not deducted).
PRE_FAULTS = frozenset({"minus1", "quota_minute", "quota_day", "token_expired"})
# Faults that spoil the answer *after* the request was handled: like a real lost answer, a pay
# has been deducted although the caller cannot tell.
TRANSPORT_FAULTS = frozenset({"timeout", "http500", "malformed_json", "truncated"})
# Faults that corrupt the numbers of an ok answer carrying a balance (only such answers match).
VALUE_FAULTS = frozenset({"wrong_types", "negative", "huge"})
FAULT_KINDS = PRE_FAULTS | TRANSPORT_FAULTS | VALUE_FAULTS


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a `Simulator` needs; the defaults are the fake credentials tests use."""

    appid: str = "wxsim0000000000"
    app_secret: str = "sim-app-secret"  # noqa: S105  (the simulator's own fake secret)
    offer_id: str = "1450000000"
    app_key_sandbox: str = "sim-sandbox-appkey"
    app_key_production: str = "sim-prod-appkey"
    rate_limit: float | None = None  # req/s over all Midas endpoints; above it -> 45011
    latency_ms: float = 0.0  # added to every Midas answer
    token_ttl_s: int = 7200  # expires_in of a new access token (WeChat: 7200)
    # stable_token hands out a new token only within this many seconds of the old one's
    # expiry; the old one stays valid until it expires (WeChat: 5 minutes of overlap).
    stable_token_overlap_s: int = 300
    seed: int = 0
    players: int = 0  # synthetic players created at construction
    expired_session_ratio: float = 0.1  # synthetic players created without a live session
    max_ts_skew_s: int = 600  # a request `ts` further than this from now -> 90018
    timeout_fault_s: float = 30.0  # how long a "timeout" fault holds the answer back
    # Arrival times kept for `arrivals()`: a staging simulator running for weeks keeps the
    # latest ones only (max_per_second still covers everything since the last reset).
    max_recorded_arrivals: int = 2_000_000
    # Also record each Midas arrival's kernel receive time (Linux SO_TIMESTAMPNS), next to the
    # handler's: `arrival_stamps()`. For benchmarks and timing tests; it assumes clients wait
    # for each answer before writing the next request on a connection (no HTTP pipelining,
    # as http.client and requests do), since it peeks at the socket before the parser reads.
    kernel_stamps: bool = False
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port chosen by the OS

    def __post_init__(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError("rate_limit must be positive or None")
        if self.latency_ms < 0 or self.timeout_fault_s < 0:
            raise ValueError("latency_ms and timeout_fault_s must not be negative")
        if self.token_ttl_s <= 0 or self.stable_token_overlap_s < 0:
            raise ValueError("token_ttl_s must be positive, stable_token_overlap_s >= 0")
        if self.players < 0 or not 0.0 <= self.expired_session_ratio <= 1.0:
            raise ValueError("players must be >= 0 and expired_session_ratio within [0, 1]")
        if self.max_recorded_arrivals < 10:
            raise ValueError("max_recorded_arrivals must be at least 10")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be within 0..65535")
        if self.kernel_stamps and not sys.platform.startswith("linux"):
            raise ValueError("kernel_stamps needs Linux (SO_TIMESTAMPNS on TCP sockets)")

    def app_key(self, env: str) -> str:
        """The AppKey of `env` ("sandbox" or "production"): they differ, as at WeChat."""
        return self.app_key_sandbox if env == "sandbox" else self.app_key_production
