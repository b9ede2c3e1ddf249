"""Strict response validation: a full Balance or a clear error, never a half-filled value."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.midas.fakes import V1_OK, V2_OK
from worker.logs import register_secret
from worker.midas.errors import (
    AccountUnobservable,
    ConfigurationError,
    MalformedResponse,
    MidasError,
    QuotaExhausted,
    QuotaPaused,
    RequestRejected,
    RetryableError,
    TokenError,
)
from worker.midas.parse import MAX_COINS, error_for, meaning, parse_getbalance
from worker.midas.types import Balance


def _body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def test_v1_ok_answer() -> None:
    assert parse_getbalance(_body(V1_OK), "v1") == Balance(
        balance=105,
        gen_balance=5,
        first_save=True,
        save_amt=100,
        save_sum=100,
        cost_sum=5,
        present_sum=10,
        api_version="v1",
    )


def test_v2_names_map_to_v1_names() -> None:
    v2 = {**V2_OK, "present_balance": 6, "sum_save": 101, "sum_balance": 102}
    v2 |= {"sum_cost": 7, "sum_present": 11}
    got = parse_getbalance(_body(v2), "v2")
    assert (got.gen_balance, got.save_amt, got.save_sum, got.cost_sum, got.present_sum) == (
        6,
        101,
        102,
        7,
        11,
    )
    assert got.api_version == "v2"


def test_v1_names_are_not_read_for_v2_and_vice_versa() -> None:
    with pytest.raises(MalformedResponse, match="'present_balance' is missing"):
        parse_getbalance(_body(V1_OK), "v2")
    with pytest.raises(MalformedResponse, match="'gen_balance' is missing"):
        parse_getbalance(_body(V2_OK), "v1")


@pytest.mark.parametrize(
    ("value", "expected"), [(1, True), (2, False), (True, True), (False, False)]
)
def test_first_save_accepts_documented_forms(value: Any, expected: bool) -> None:
    assert parse_getbalance(_body({**V1_OK, "first_save": value}), "v1").first_save is expected


@pytest.mark.parametrize("value", [0, 3, -1, "1", "true", None, 1.0, [1]])
def test_first_save_refuses_anything_else(value: Any) -> None:
    with pytest.raises(MalformedResponse, match="first_save"):
        parse_getbalance(_body({**V1_OK, "first_save": value}), "v1")


def test_first_save_missing() -> None:
    payload = {k: v for k, v in V1_OK.items() if k != "first_save"}
    with pytest.raises(MalformedResponse, match="'first_save' is missing"):
        parse_getbalance(_body(payload), "v1")


@pytest.mark.parametrize(
    "field", ["balance", "gen_balance", "save_amt", "save_sum", "cost_sum", "present_sum"]
)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("10", "must be an integer"),
        (10.0, "must be an integer"),
        (10.5, "must be an integer"),
        (True, "must be an integer"),
        (None, "must be an integer"),
        ({"v": 1}, "must be an integer"),
        (-1, "is out of range"),
        (MAX_COINS + 1, "is out of range"),
        (10**30, "is out of range"),
    ],
)
def test_counter_type_and_range_are_strict(field: str, value: Any, why: str) -> None:
    with pytest.raises(MalformedResponse, match=f"'{field}' {why}"):
        parse_getbalance(_body({**V1_OK, field: value}), "v1")


@pytest.mark.parametrize(
    "field", ["balance", "gen_balance", "save_amt", "save_sum", "cost_sum", "present_sum"]
)
def test_each_counter_must_be_present(field: str) -> None:
    payload = {k: v for k, v in V1_OK.items() if k != field}
    with pytest.raises(MalformedResponse, match=f"'{field}' is missing"):
        parse_getbalance(_body(payload), "v1")


@given(st.lists(st.integers(min_value=0, max_value=MAX_COINS), min_size=6, max_size=6))
def test_any_in_range_integers_round_trip(values: list[int]) -> None:
    names = ["balance", "gen_balance", "save_amt", "save_sum", "cost_sum", "present_sum"]
    got = parse_getbalance(_body({**V1_OK, **dict(zip(names, values, strict=True))}), "v1")
    assert [getattr(got, n) for n in names] == values


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_COINS + 1)))
def test_any_out_of_range_integer_is_refused(value: int) -> None:
    with pytest.raises(MalformedResponse):
        parse_getbalance(_body({**V1_OK, "cost_sum": value}), "v1")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not JSON"),
        (b"<html>502 Bad Gateway</html>", "not JSON"),
        (b'{"errcode":0,"errmsg":"ok","balance":1', "not JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'"ok"', "a JSON str, not an object"),
        (b"null", "a JSON NoneType, not an object"),
        (b'{"errcode":0,"balance":1,"balance":2}', "duplicate field 'balance'"),
        (b"\xff\xfe{}", "not JSON"),
    ],
)
def test_malformed_bodies(body: bytes, why: str) -> None:
    with pytest.raises(MalformedResponse, match="malformed Midas answer") as info:
        parse_getbalance(body, "v1")
    assert why in str(info.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e3"])
def test_non_integer_json_numbers_are_refused(literal: str) -> None:
    body = json.dumps({**V1_OK, "balance": 0}).replace('"balance": 0', f'"balance": {literal}')
    with pytest.raises(MalformedResponse, match="'balance' must be an integer"):
        parse_getbalance(body.encode(), "v1")


@pytest.mark.parametrize("errcode", [None, "0", 0.0, True])
def test_errcode_must_be_an_integer(errcode: Any) -> None:
    payload = {**V1_OK, "errcode": errcode}
    if errcode is None:
        del payload["errcode"]
    with pytest.raises(MalformedResponse, match="errcode must be an integer"):
        parse_getbalance(_body(payload), "v1")


def test_a_large_body_is_never_echoed_whole() -> None:
    register_secret("tok-in-body-123456")
    body = b"not json " + b"x" * 100_000 + b" access_token=tok-in-body-123456"
    with pytest.raises(MalformedResponse) as info:
        parse_getbalance(body, "v1")
    assert len(str(info.value)) < 400
    big = b'{"errcode":0 ' + b"y" * 5000 + b"access_token=tok-in-body-123456"
    with pytest.raises(MalformedResponse) as info:
        parse_getbalance(big, "v1")
    assert len(str(info.value)) < 400 and "tok-in-body" not in str(info.value)


def test_the_echoed_excerpt_is_redacted() -> None:
    register_secret("echo-secret-abcdef")
    with pytest.raises(MalformedResponse) as info:
        parse_getbalance(b"oops echo-secret-abcdef access_token=zzz", "v1")
    text = str(info.value)
    assert "echo-secret-abcdef" not in text and "zzz" not in text and "[REDACTED]" in text


# -- error codes ------------------------------------------------------------------------------

COMMON = [
    (-1, RetryableError),
    (40001, TokenError),
    (42001, TokenError),
    (40014, TokenError),
    (45011, QuotaPaused),
    (45009, QuotaExhausted),
    (90011, ConfigurationError),
    (90017, ConfigurationError),
    (90018, RequestRejected),
    (40101, RequestRejected),
    (12345, RequestRejected),
]
V1_ONLY = [(90009, AccountUnobservable), (90010, AccountUnobservable), (90016, RequestRejected)]
V2_ONLY = [(90010, AccountUnobservable), (90016, AccountUnobservable)]


@pytest.mark.parametrize(
    ("version", "code", "cls"),
    [("v1", c, k) for c, k in COMMON + V1_ONLY] + [("v2", c, k) for c, k in COMMON + V2_ONLY],
)
def test_each_errcode_maps_to_its_typed_error(version: Any, code: int, cls: type) -> None:
    body = _body({"errcode": code, "errmsg": f"midas says {code}"})
    with pytest.raises(MidasError) as info:
        parse_getbalance(body, version)
    assert type(info.value) is cls
    assert info.value.errcode == code
    assert info.value.errmsg == f"midas says {code}"
    assert f"Midas errcode {code}" in str(info.value)
    assert f"midas says {code}" in str(info.value)


def test_codes_whose_meaning_changed_in_v2_say_so() -> None:
    assert "sig wrong" in meaning(90011, "v1") and "pay_sig wrong" in meaning(90011, "v2")
    assert "not logged in" in meaning(90010, "v1") and "signature" in meaning(90010, "v2")
    assert "order in progress" in meaning(90016, "v1") and "expired" in meaning(90016, "v2")


def test_an_error_answer_needs_no_counters() -> None:
    # errcode != 0 is reported as such even though no counter is present.
    with pytest.raises(RetryableError):
        parse_getbalance(b'{"errcode":-1}', "v1")


def test_errmsg_is_capped_and_redacted() -> None:
    register_secret("errmsg-secret-999")
    err = error_for(-1, "busy " * 1000 + "errmsg-secret-999", "v1")
    assert len(err.errmsg) < 300 and len(str(err)) < 500
    err = error_for(-1, "leak errmsg-secret-999 access_token=abc", "v1")
    assert "errmsg-secret-999" not in str(err) and "abc" not in err.errmsg
