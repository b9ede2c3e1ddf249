"""Operators of the console: the rows `midas-recon operators` and the login read and write."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from worker.db.models import Operator


def get_operator(session: Session, name: str) -> Operator | None:
    return session.scalars(select(Operator).where(Operator.name == name)).one_or_none()


def insert_operator(
    session: Session, name: str, password_hash: str, *, now: dt.datetime
) -> Operator:
    operator = Operator(name=name, password_hash=password_hash, created_at=now)
    session.add(operator)
    session.flush()  # the unique name is checked here, inside the caller's transaction
    return operator


def list_operators(session: Session) -> list[Operator]:
    return list(session.scalars(select(Operator).order_by(Operator.name)))


def set_password_hash(session: Session, operator_id: int, password_hash: str) -> None:
    session.execute(
        update(Operator).where(Operator.id == operator_id).values(password_hash=password_hash)
    )


def disable(session: Session, name: str, *, now: dt.datetime) -> bool:
    """Disable a named operator; False when there is no such operator."""
    result = session.execute(
        update(Operator)
        .where(Operator.name == name)
        # Disabling twice keeps the first time.
        .values(disabled_at=func.coalesce(Operator.disabled_at, now))
        .returning(Operator.id)
    )
    return result.scalar_one_or_none() is not None


def record_login(session: Session, operator_id: int, *, now: dt.datetime) -> None:
    session.execute(update(Operator).where(Operator.id == operator_id).values(last_login_at=now))
