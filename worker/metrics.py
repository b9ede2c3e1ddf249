"""Prometheus metrics (PRODUCT.md §10), defined once and imported where they are counted.

Workers run several processes: set PROMETHEUS_MULTIPROC_DIR so the client library aggregates
them; `worker.metrics_server` serves the result.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

# In multiprocess mode every metric below opens a file in that folder as it is created: make
# sure the folder exists (a fresh container has no /tmp/prometheus).
if _multiproc_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiproc_dir, exist_ok=True)

MIDAS_REQUESTS = Counter(
    "midas_requests_total",
    "Midas API attempts, by endpoint and errcode (0 ok, 'timeout', 'http_5xx', 'malformed').",
    ["endpoint", "errcode"],
)
MIDAS_LATENCY = Histogram(
    "midas_request_seconds",
    "Wall time of one Midas HTTP attempt.",
    ["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LIMITER_WAIT = Histogram(
    "midas_limiter_wait_seconds",
    "Time a caller waited for a rate and in-flight slot.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60),
)
LIMITER_IN_FLIGHT = Gauge(
    "midas_limiter_in_flight",
    "Requests holding an in-flight slot in this process.",
    multiprocess_mode="livesum",
)
SNAPSHOTS = Counter("recon_snapshots_total", "Balance snapshots stored, by status.", ["status"])
CASE_TRANSITIONS = Counter(
    "recon_case_transitions_total", "Mismatch case transitions, by new status.", ["to_status"]
)
RUN_ITEMS_DONE = Counter("recon_run_items_done_total", "Run items finished, by run kind.", ["kind"])
TOKEN_REQUESTS = Counter(
    "midas_token_requests_total",
    "stable_token calls, by outcome (ok, timeout, error, or the errcode WeChat answered).",
    ["outcome"],
)
FLEET_PAUSES = Counter(
    "midas_fleet_pauses_total",
    "Fleet-wide pauses after a 45011 (minute quota), each counted once over the fleet.",
)
OPERATOR_ACTIONS = Counter(
    "recon_operator_actions_total",
    "Changes made by an operator (acknowledge, resolve, start a run, alert test...), by action.",
    ["action"],
)
ALERTS_SENT = Counter(
    "recon_alerts_sent_total",
    "Alert deliveries, by kind and result (sent, retry, failed).",
    ["kind", "result"],
)
# Read from Postgres by the periodic alert check (worker.tasks.check_alerts); "mostrecent":
# the last value any process set, not a sum over the pool's processes.
LAST_COMPLETE_NIGHTLY = Gauge(
    "recon_last_complete_nightly_timestamp_seconds",
    "When the newest complete nightly run finished (unix seconds); 0 before the first.",
    multiprocess_mode="mostrecent",
)
LAST_COMPLETE_NIGHTLY_DATE = Gauge(
    "recon_last_complete_nightly_business_date_seconds",
    "The business date of the newest complete nightly run, as midnight UTC (unix seconds).",
    multiprocess_mode="mostrecent",
)
LATEST_NIGHTLY_STATUS = Gauge(
    "recon_latest_nightly_status",
    "1 for the status of the newest nightly run (planning, running, complete, incomplete, "
    "failed), 0 for the others.",
    ["status"],
    multiprocess_mode="mostrecent",
)
OPEN_CASES = Gauge(
    "recon_open_cases",
    "Open mismatch cases, by status (suspected, confirmed, acknowledged).",
    ["status"],
    multiprocess_mode="mostrecent",
)
FLEET_PAUSES_LAST_HOUR = Gauge(
    "midas_fleet_pauses_last_hour",
    "Fleet pauses (45011) that ended within the last hour, from Redis.",
    multiprocess_mode="mostrecent",
)
RATE_LIMIT = Gauge(
    "midas_rate_limit",
    "MIDAS_RATE_LIMIT of the fleet (requests per second), to draw the request rate against.",
    multiprocess_mode="mostrecent",
)


# -- coverage of the nightly (issue 14: worker/recon/coverage.py) ------------------------------
# Set by the process that plans or closes a nightly; "mostrecent" across processes.
NIGHTLY_CAPACITY = Gauge(
    "recon_nightly_capacity_accounts",
    "Accounts the latest nightly could fetch before its deadline at the rate it may use.",
    multiprocess_mode="mostrecent",
)
NIGHTLY_DEFERRED = Counter(
    "recon_nightly_deferred_accounts_total",
    "Active accounts a nightly did not observe, by reason (capacity, deadline, superseded).",
    ["reason"],
)
COVERAGE_OBSERVED_SHARE = Gauge(
    "recon_coverage_observed_share",
    "Share of active accounts observed ok in the last 1d/7d/30d, when the latest nightly closed.",
    ["window"],
    multiprocess_mode="mostrecent",
)
COVERAGE_OLDEST_AGE = Gauge(
    "recon_coverage_observation_age_seconds",
    "Age of the last ok observation over active accounts (p50, p99, max; +Inf: never observed),"
    " when the latest nightly closed.",
    ["quantile"],
    multiprocess_mode="mostrecent",
)
COVERAGE_MOVED = Gauge(
    "recon_coverage_moved_accounts",
    "Accounts with ledger movement the latest nightly planned for, observed ok or not.",
    ["covered"],
    multiprocess_mode="mostrecent",
)
