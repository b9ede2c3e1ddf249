"""Property tests of the comparison through the database: random ledgers and Midas counters
built to agree open nothing; one perturbation opens exactly the cases PRODUCT.md §5 implies.

Each example writes to Postgres, so the counts are moderate; test_rules.py runs the pure
comparison with many more examples.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.recon.conftest import AFFECTED_BY_FIELD, AFFECTED_BY_KIND, KINDS, SETTLE, T0, Books
from worker.db.models import MismatchCase
from worker.recon.cases import reconcile_snapshots
from worker.recon.rules import DEFAULT_CHECKS

pytestmark = pytest.mark.integration

_accounts = itertools.count()

# Rows from an hour before the fetch to a minute after it (those must not count).
rows = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(min_value=1, max_value=10**12),
        st.integers(min_value=-3600, max_value=60).map(lambda s: T0 + dt.timedelta(seconds=s)),
    ),
    max_size=12,
)
perturbations = st.one_of(
    st.tuples(
        st.just("counter"),
        st.sampled_from(sorted(AFFECTED_BY_FIELD)),
        st.integers(min_value=-(10**6), max_value=10**6).filter(lambda n: n != 0),
    ),
    st.tuples(st.just("row"), st.sampled_from(KINDS), st.integers(min_value=1, max_value=10**6)),
)
db_settings = settings(
    max_examples=40,
    deadline=None,
    # The session fixture is shared by the examples; each example uses accounts of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@db_settings
@given(ledger=rows, perturbation=perturbations, zone=st.sampled_from(["1", "2", "zone-9"]))
def test_agreeing_books_open_nothing_and_one_change_opens_exactly_its_cases(
    pg_session: Session,
    ledger: list[tuple[str, int, dt.datetime]],
    perturbation: tuple[str, str, int],
    zone: str,
) -> None:
    books = Books(pg_session)
    n = next(_accounts)
    same, changed = f"same{n}", f"changed{n}"
    for openid in (same, changed):
        for kind, amount, at in ledger:
            books.ledger(openid, kind, amount, at, zone_id=zone)

    what, name, amount = perturbation
    if what == "counter":
        expected = AFFECTED_BY_FIELD[name]
        changed_snap = books.snapshot(changed, T0, zone_id=zone, off={name: amount})
    else:
        expected = AFFECTED_BY_KIND[name]
        changed_snap = books.snapshot(changed, T0, zone_id=zone)  # Midas never saw the row
        books.ledger(changed, name, amount, T0 - dt.timedelta(seconds=1), zone_id=zone)
    same_snap = books.snapshot(same, T0, zone_id=zone)
    pg_session.flush()

    result = reconcile_snapshots(
        pg_session,
        [same_snap.id, changed_snap.id],
        checks=DEFAULT_CHECKS,
        settle_seconds=SETTLE,
        now=T0,
    )

    opened = pg_session.scalars(
        select(MismatchCase).where(MismatchCase.openid.in_([same, changed]))
    ).all()
    assert {(c.openid, c.zone_id, c.check) for c in opened} == {
        (changed, zone, check) for check in expected
    }
    assert result.opened == len(expected)
    assert all(abs(c.delta) == abs(amount) and c.status == "suspected" for c in opened)
