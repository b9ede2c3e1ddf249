"""The fields of the product's outputs, in their order (PRODUCT.md §7): `mismatches` and
`runs` as JSON and CSV on the command line, and the console's /api/ twins. One list each,
so the two faces of the same data cannot drift apart."""

from __future__ import annotations

CASE_FIELDS = (
    "id",
    "openid",
    "zone_id",
    "check",
    "status",
    "midas_value",
    "ledger_value",
    "delta",
    "first_seen_at",
    "last_seen_at",
)
RUN_FIELDS = (
    "id",
    "business_date",
    "kind",
    "trigger",
    "status",
    "planned",
    "ok",
    "unobservable",
    "error",
    "mismatches_opened",
    "capacity",
    "deferred",
    "coverage_verdict",
    "started_at",
    "finished_at",
    "note",
    "failure_reason",
)
