"""The comparison rules of PRODUCT.md §5: which Midas counter each check reads, which ledger
kinds it sums, and the pure comparison (tolerance zero). No SQL, no HTTP.

The mapping is configuration because Midas does not document its counters precisely; what a
check is and how RECON_CHECKS spells it live in worker/checks.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from worker.checks import DEFAULT_CHECKS, Check, parse_checks
from worker.config import ConfigError, Settings

# The checks' vocabulary is re-exported: the comparison's users read it from here.
__all__ = [
    "DEFAULT_CHECKS",
    "Check",
    "Difference",
    "checks_from_settings",
    "evaluate",
    "parse_checks",
]


@dataclass(frozen=True, slots=True)
class Difference:
    """The two sides of one check for one snapshot; they agree when `delta` is zero."""

    check: str
    midas_value: int
    ledger_value: int

    @property
    def delta(self) -> int:
        return self.midas_value - self.ledger_value

    @property
    def agrees(self) -> bool:
        return self.delta == 0  # tolerance is zero: one coin off is a difference


def evaluate(
    midas_values: Mapping[str, int], ledger_sums: Mapping[str, int], checks: Iterable[Check]
) -> list[Difference]:
    """Both sides of every check, agreeing or not, in the order of `checks`."""
    return [
        Difference(c.name, int(midas_values[c.midas_field]), c.ledger_value(ledger_sums))
        for c in checks
    ]


def checks_from_settings(settings: Settings) -> tuple[Check, ...]:
    """The configured checks: RECON_CHECKS when set, else DEFAULT_CHECKS."""
    if settings.RECON_CHECKS is None:
        return DEFAULT_CHECKS
    try:
        return parse_checks(settings.RECON_CHECKS)
    except ValueError as exc:  # Settings validates this already; a hand-built one may not
        raise ConfigError(f"RECON_CHECKS: {exc}") from None
