"""The answer to "what does Midas say?", in v1 field names whatever the API version."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

ApiVersion = Literal["v1", "v2"]

# Counter fields in the order of API.md §1; every one is a non-negative integer of coins.
COUNTER_FIELDS = ("balance", "gen_balance", "save_amt", "save_sum", "cost_sum", "present_sum")


@dataclass(frozen=True, slots=True)
class Balance:
    """A validated getbalance answer. Built only by the response parser: never half-filled."""

    balance: int
    gen_balance: int
    first_save: bool
    save_amt: int
    save_sum: int
    cost_sum: int
    present_sum: int
    api_version: ApiVersion

    def as_v1_dict(self) -> dict[str, int | bool | str]:
        """The v1 field names of API.md §1 (what `midas-recon balance --format json` prints)."""
        return asdict(self)
