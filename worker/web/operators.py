"""Operators: who may log in to the console. Passwords are kept as Argon2id hashes only.

A wrong password and an unknown (or disabled) name get the same answer, after the same work:
an unknown name is verified against a dummy hash, so the time taken does not tell them apart.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from worker.db import operators as repo
from worker.db.models import Operator

# Recorded in case events as "operator:<name>": mismatch_events.actor holds 64 characters, and
# the lifecycle (worker/recon/cases.py) accepts 1 to 55 characters without whitespace.
NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,55}")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024  # Argon2 takes any length; a megabyte "password" is a denial of service


class OperatorError(Exception):
    """An operator command that cannot be done; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    """What `operators list` and the console show: never the hash."""

    name: str
    disabled_at: dt.datetime | None
    last_login_at: dt.datetime | None
    created_at: dt.datetime


@lru_cache(maxsize=1)
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2-cffi's defaults: Argon2id, RFC 9106 low-memory profile


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher().hash("not a password of anyone: an unknown name costs the same work")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise OperatorError("an operator name is 1 to 55 characters without spaces")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise OperatorError(f"the password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise OperatorError(f"the password must be at most {MAX_PASSWORD} characters")
    return password


def add_operator(session: Session, name: str, password: str, *, now: dt.datetime) -> OperatorInfo:
    check_name(name)
    password_hash = _hasher().hash(check_password(password))
    try:
        with session.begin_nested():  # a taken name fails this insert, not the transaction
            operator = repo.insert_operator(session, name, password_hash, now=now)
    except IntegrityError:
        raise OperatorError(f"operator {name!r} exists already") from None
    return _info(operator)


def list_operators(session: Session) -> list[OperatorInfo]:
    return [_info(o) for o in repo.list_operators(session)]


def disable_operator(session: Session, name: str, *, now: dt.datetime) -> None:
    if not repo.disable(session, name, now=now):
        raise OperatorError(f"no operator {name!r}")


def authenticate(session: Session, name: str, password: str, *, now: dt.datetime) -> str | None:
    """The operator's name when the name and password match an enabled operator, else None."""
    operator = repo.get_operator(session, name) if NAME.fullmatch(name) else None
    stored = operator.password_hash if operator is not None else _dummy_hash()
    try:
        _hasher().verify(stored, password[:MAX_PASSWORD])
    except (VerificationError, InvalidHashError):
        return None
    if operator is None or operator.disabled_at is not None:
        return None
    if _hasher().check_needs_rehash(stored):  # parameters raised since it was set
        repo.set_password_hash(session, operator.id, _hasher().hash(password))
    repo.record_login(session, operator.id, now=now)
    return operator.name


def may_act(session: Session, name: str, *, vouched_by_proxy: bool) -> bool:
    """Whether an operator is (still) allowed in: enabled, checked on every request so that
    `operators disable` ends a session at once. A name the single sign-on proxy vouches for
    needs no row here, but a disabled row with that name still wins."""
    operator = repo.get_operator(session, name)
    if operator is None:
        return vouched_by_proxy
    return operator.disabled_at is None


def _info(operator: Operator) -> OperatorInfo:
    return OperatorInfo(
        operator.name, operator.disabled_at, operator.last_login_at, operator.created_at
    )
