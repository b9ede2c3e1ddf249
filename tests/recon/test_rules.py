"""The comparison rules on their own: the default checks, the RECON_CHECKS parser, evaluate()."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.recon.conftest import AFFECTED_BY_FIELD, AFFECTED_BY_KIND, KINDS, expected_counters
from worker.config import ConfigError, Settings, load_settings
from worker.recon.rules import (
    DEFAULT_CHECKS,
    Check,
    Difference,
    checks_from_settings,
    evaluate,
    parse_checks,
)

amounts = st.integers(min_value=1, max_value=10**12)
ledgers = st.lists(st.tuples(st.sampled_from(KINDS), amounts), max_size=40)


def differing(
    midas: dict[str, int], sums: dict[str, int], checks: tuple[Check, ...]
) -> list[Difference]:
    """The differing checks, as the mismatch lifecycle reads them (worker.recon.cases)."""
    return [d for d in evaluate(midas, sums, checks) if not d.agrees]


def sums_of(rows: list[tuple[str, int]]) -> dict[str, int]:
    return {k: sum(a for kind, a in rows if kind == k) for k in KINDS}


def test_default_checks_are_product_section_5() -> None:
    table = {c.name: (c.midas_field, dict(c.ledger_terms)) for c in DEFAULT_CHECKS}
    assert table == {
        "save_sum": ("save_sum", {"save": 1}),
        "cost_sum": ("cost_sum", {"cost": 1, "cancel": -1}),
        "present_sum": ("present_sum", {"present": 1}),
        "balance": ("balance", {"save": 1, "present": 1, "cost": -1, "cancel": 1}),
    }


def test_default_checks_cannot_be_changed_in_place() -> None:
    with pytest.raises(TypeError):
        DEFAULT_CHECKS[0].ledger_terms["cost"] = 1  # type: ignore[index]


def test_tolerance_is_zero() -> None:
    midas = {**expected_counters([("save", 600)]), "balance": 601}
    [diff] = differing(midas, {"save": 600}, DEFAULT_CHECKS)
    assert (diff.check, diff.midas_value, diff.ledger_value, diff.delta) == ("balance", 601, 600, 1)


def test_missing_kinds_count_as_zero() -> None:
    midas = expected_counters([])
    assert differing(midas, {}, DEFAULT_CHECKS) == []
    assert [d.ledger_value for d in evaluate(midas, {}, DEFAULT_CHECKS)] == [0, 0, 0, 0]


@given(ledgers)
def test_agreeing_books_show_no_difference(rows: list[tuple[str, int]]) -> None:
    assert differing(expected_counters(rows), sums_of(rows), DEFAULT_CHECKS) == []


@given(
    ledgers,
    st.sampled_from(sorted(AFFECTED_BY_FIELD)),
    st.integers(min_value=-(10**9), max_value=10**9).filter(lambda n: n != 0),
)
def test_one_counter_off_shows_exactly_its_checks(
    rows: list[tuple[str, int]], field: str, delta: int
) -> None:
    midas = expected_counters(rows)
    midas[field] += delta
    diffs = differing(midas, sums_of(rows), DEFAULT_CHECKS)
    assert {d.check for d in diffs} == AFFECTED_BY_FIELD[field]
    assert all(d.delta == delta for d in diffs)


@given(ledgers, st.sampled_from(KINDS), amounts)
def test_one_extra_ledger_row_shows_exactly_its_checks(
    rows: list[tuple[str, int]], kind: str, amount: int
) -> None:
    midas = expected_counters(rows)  # Midas never saw the extra row
    diffs = differing(midas, sums_of([*rows, (kind, amount)]), DEFAULT_CHECKS)
    assert {d.check for d in diffs} == AFFECTED_BY_KIND[kind]
    assert all(abs(d.delta) == amount for d in diffs)


# -- configuration --------------------------------------------------------------------------


def test_unset_or_blank_recon_checks_means_the_defaults() -> None:
    assert checks_from_settings(load_settings({})) == DEFAULT_CHECKS
    assert checks_from_settings(load_settings({"RECON_CHECKS": "  "})) == DEFAULT_CHECKS


def test_recon_checks_replaces_the_mapping() -> None:
    raw = json.dumps(
        {
            "balance": {"midas_field": "gen_balance", "ledger": {"present": 1}},
            "topups": {"midas_field": "save_amt", "ledger": {"save": 1, "cancel": -1}},
        }
    )
    checks = checks_from_settings(load_settings({"RECON_CHECKS": raw}))
    assert checks == (
        Check("balance", "gen_balance", {"present": 1}),
        Check("topups", "save_amt", {"save": 1, "cancel": -1}),
    )
    midas = {**expected_counters([]), "gen_balance": 5, "save_amt": 7}
    diffs = differing(midas, {"present": 5, "save": 10, "cancel": 3}, checks)
    assert diffs == []


def test_a_settings_object_built_without_validation_still_fails_cleanly() -> None:
    hand_built = Settings.model_construct(RECON_CHECKS='{"a": 1}')
    with pytest.raises(ConfigError, match=r"^RECON_CHECKS: check 'a' must be an object"):
        checks_from_settings(hand_built)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{", "not valid JSON"),
        ("[]", "non-empty JSON object"),
        ("{}", "non-empty JSON object"),
        ('{"a": 1}', "check 'a' must be an object"),
        ('{"a": {"midas_field": "coins", "ledger": {"save": 1}}}', "unknown Midas field 'coins'"),
        ('{"a": {"midas_field": "balance", "ledger": {"refund": 1}}}', "unknown ledger kind"),
        ('{"a": {"midas_field": "balance", "ledger": {"save": 2}}}', "must be 1 or -1"),
        ('{"a": {"midas_field": "balance", "ledger": {"save": 1.0}}}', "must be 1 or -1"),
        ('{"a": {"midas_field": "balance", "ledger": {"save": true}}}', "must be 1 or -1"),
        ('{"a": {"midas_field": "balance", "ledger": {}}}', "names no ledger kind"),
        ('{"a": {"midas_field": "balance", "ledger": {"save": 1}, "x": 1}}', "unknown key 'x'"),
        ('{"a": {"ledger": {"save": 1}}}', "midas_field must be a string"),
        ('{"Bad Name": {"midas_field": "balance", "ledger": {"save": 1}}}', "check name"),
        (
            '{"a": {"midas_field": "balance", "ledger": {"save": 1}},'
            ' "a": {"midas_field": "save_sum", "ledger": {"save": 1}}}',
            "'a' is named twice",
        ),
    ],
)
def test_bad_recon_checks_fail_at_start_in_one_line(raw: str, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings({"RECON_CHECKS": raw})
    message = str(exc.value)
    assert message.startswith("RECON_CHECKS: ")
    assert reason in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_checks(raw)
