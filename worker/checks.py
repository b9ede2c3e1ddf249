"""The vocabulary of the comparison: what a check is, the default checks of PRODUCT.md §5, and
how RECON_CHECKS names them. A leaf: settings validate RECON_CHECKS with it, and the
comparison rules (worker/recon/rules.py) use it, without either importing the other.

`RECON_CHECKS` replaces the defaults with a JSON object, one member per check:

    {"balance": {"midas_field": "balance",
                 "ledger": {"save": 1, "present": 1, "cost": -1, "cancel": 1}}}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from worker.midas.types import COUNTER_FIELDS
from worker.vocabulary import LEDGER_KINDS, LedgerKind

# A check name is stored in mismatch_cases.check (32 characters) and typed by operators.
_CHECK_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True, slots=True)
class Check:
    """One comparison: a Midas counter against a signed sum of ledger kinds."""

    name: str
    midas_field: str
    ledger_terms: Mapping[str, int]  # ledger kind -> +1 or -1

    def __post_init__(self) -> None:
        if not _CHECK_NAME.fullmatch(self.name):
            raise ValueError(
                f"check name {self.name!r} must be lower case letters, digits and _ "
                "(at most 32, starting with a letter)"
            )
        if self.midas_field not in COUNTER_FIELDS:
            raise ValueError(
                f"check {self.name!r}: unknown Midas field {self.midas_field!r} "
                f"(one of {', '.join(COUNTER_FIELDS)})"
            )
        if not self.ledger_terms:
            raise ValueError(f"check {self.name!r}: names no ledger kind")
        for kind, sign in self.ledger_terms.items():
            if kind not in LEDGER_KINDS:
                raise ValueError(
                    f"check {self.name!r}: unknown ledger kind {kind!r} "
                    f"(one of {', '.join(LEDGER_KINDS)})"
                )
            # bool is an int in Python and 1.0 == 1: `true` or `1.0` in the JSON is a typo.
            if type(sign) is not int or sign not in (1, -1):
                raise ValueError(f"check {self.name!r}: the sign of {kind!r} must be 1 or -1")
        # Read-only, so a shared check (DEFAULT_CHECKS) cannot be changed behind our back.
        object.__setattr__(self, "ledger_terms", MappingProxyType(dict(self.ledger_terms)))

    def __hash__(self) -> int:
        return hash((self.name, self.midas_field, tuple(sorted(self.ledger_terms.items()))))

    def ledger_value(self, ledger_sums: Mapping[str, int]) -> int:
        """The ledger side; a kind with no entries counts as zero coins."""
        return sum(sign * ledger_sums.get(kind, 0) for kind, sign in self.ledger_terms.items())


DEFAULT_CHECKS: tuple[Check, ...] = (
    Check("save_sum", "save_sum", {LedgerKind.SAVE: 1}),
    Check("cost_sum", "cost_sum", {LedgerKind.COST: 1, LedgerKind.CANCEL: -1}),
    Check("present_sum", "present_sum", {LedgerKind.PRESENT: 1}),
    Check(
        "balance",
        "balance",
        {LedgerKind.SAVE: 1, LedgerKind.PRESENT: 1, LedgerKind.COST: -1, LedgerKind.CANCEL: 1},
    ),
)


def parse_checks(raw: str) -> tuple[Check, ...]:
    """Parse the RECON_CHECKS JSON; ValueError with a one-line reason when it is wrong."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(doc, dict) or not doc:
        raise ValueError('must be a non-empty JSON object {"check name": {...}, ...}')
    checks = []
    for name, spec in doc.items():
        if not isinstance(spec, dict):
            raise ValueError(f'check {name!r} must be an object {{"midas_field", "ledger"}}')
        unknown = set(spec) - {"midas_field", "ledger"}
        if unknown:
            raise ValueError(f"check {name!r}: unknown key {sorted(unknown)[0]!r}")
        field, terms = spec.get("midas_field"), spec.get("ledger")
        if not isinstance(field, str):
            raise ValueError(f"check {name!r}: midas_field must be a string")
        if not isinstance(terms, dict):
            raise ValueError(f'check {name!r}: ledger must be an object {{"kind": 1 or -1}}')
        checks.append(Check(name, field, terms))
    return tuple(checks)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a check named twice is a mistake to report.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} is named twice")
        out[key] = value
    return out
