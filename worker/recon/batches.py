"""A batch: account ids of one run claimed together, and the claim token its message carries.

The pump, the recheck and confirm planners hand batches out; a fetch batch works only on the
items its claim still holds (worker/db/runs.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Batch:
    """Account ids of one run claimed together; `claim` identifies this claim."""

    run_id: int
    account_ids: list[int]
    claim: dt.datetime

    @property
    def claim_token(self) -> str:
        return self.claim.isoformat()


def parse_claim(token: str) -> dt.datetime:
    claim = dt.datetime.fromisoformat(token)
    if claim.tzinfo is None:
        raise ValueError("a claim token carries its time zone")
    return claim
