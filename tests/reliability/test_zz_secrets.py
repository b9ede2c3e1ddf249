"""Runs last in tests/reliability: no secret the suite used appears in any log line (the
project's records before redaction, every other logger's), any exception text, any CLI output,
any stored errmsg or any Celery process log the suite collected (conftest.Witness)."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import WITNESS


def test_no_secret_in_any_text_the_suite_produced() -> None:
    if len(WITNESS.texts) < 100:
        pytest.fail(
            "the reliability suite did not run before this test: run the whole directory"
            " (pytest tests/reliability)",
            pytrace=False,
        )
    # Session keys and access tokens of every simulator, the AppKeys, the app secret and
    # the encryption key: dozens of distinct strings, each long enough to be unambiguous.
    secrets = {s for s in WITNESS.secrets if len(s) >= 8}
    assert len(secrets) > 100, len(secrets)
    leaks = {s[:4] + "…": i for i, text in enumerate(WITNESS.texts) for s in secrets if s in text}
    assert not leaks, f"secrets found in {len(leaks)} collected texts: {sorted(leaks)[:5]}"
    print(
        f"\nsecret check: {len(secrets)} secrets, {len(WITNESS.texts)} texts, "
        f"{sum(map(len, WITNESS.texts)) / 1e6:.1f} MB"
    )
