"""Signatures (API.md §2): the official vectors exactly, and the properties the client relies on."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.midas.fakes import APP_KEY, V1_OK, make_client
from worker.midas import signing
from worker.midas.client import serialise

PARAMS = {
    "openid": "odkx20ENSNa2w5y3g_qOkOvBNM1g",
    "appid": "wx1234567",
    "offer_id": "12345678",
    "ts": 1507530737,
    "zone_id": "1",
    "pf": "android",
}
KEY = "zNLgAGgqsEWJOg1nFVaO5r7fAlIQxr1u"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _vectors(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert data["v1"] and data["v2"], "the vector file lost its examples"
    return data


def test_every_official_vector_is_reproduced(test_vectors_path: Path) -> None:
    data = _vectors(test_vectors_path)
    seen = 0
    for vec in data["v1"] + data["v2"]:
        kind = vec["kind"]
        if kind == "sig":
            text = signing.v1_sig_string(vec["params"], vec["uri"], vec["app_key"])
            value = signing.v1_sig(vec["params"], vec["uri"], vec["app_key"])
        elif kind == "mp_sig":
            text = signing.v1_mp_sig_string(vec["params"], vec["uri"], vec["session_key"])
            value = signing.v1_mp_sig(vec["params"], vec["uri"], vec["session_key"])
        elif kind == "pay_sig":
            body = vec["post_body"].encode("utf-8")
            text = vec["uri"] + "&" + vec["post_body"]
            value = signing.v2_pay_sig(vec["uri"], body, vec["app_key"])
        elif kind == "signature":
            body = vec["post_body"].encode("utf-8")
            text = vec["post_body"]
            value = signing.v2_signature(body, vec["session_key"])
        else:
            pytest.fail(f"unknown vector kind {kind!r}")
        assert text == vec["string_to_sign"], vec["name"]
        assert value == vec["expected"], vec["name"]
        seen += 1
    assert seen == 4


def test_v1_sandbox_path_is_the_org_loc() -> None:
    prod = signing.v1_sig(PARAMS, "/cgi-bin/midas/getbalance", KEY)
    sandbox_path = "/cgi-bin/midas/sandbox/getbalance"
    sandbox = signing.v1_sig(PARAMS, sandbox_path, KEY)
    assert sandbox != prod
    text = signing.v1_sig_string(PARAMS, sandbox_path, KEY)
    assert f"&org_loc={sandbox_path}&method=POST&secret={KEY}" in text
    expected = hmac.new(KEY.encode(), text.encode(), hashlib.sha256).hexdigest()
    assert sandbox == expected


def test_v1_parameter_order_does_not_matter() -> None:
    reversed_params = dict(reversed(list(PARAMS.items())))
    assert list(reversed_params) != list(PARAMS)
    path = "/cgi-bin/midas/getbalance"
    assert signing.v1_sig(reversed_params, path, KEY) == signing.v1_sig(PARAMS, path, KEY)
    assert signing.v1_sig_string(reversed_params, path, KEY).startswith("appid=wx1234567&offer_id")


def test_v1_sig_and_mp_sig_are_not_signed_over_themselves() -> None:
    path = "/cgi-bin/midas/getbalance"
    with_sigs = {**PARAMS, "sig": "x" * 64, "mp_sig": "y" * 64}
    assert signing.v1_sig(with_sigs, path, KEY) == signing.v1_sig(PARAMS, path, KEY)
    # mp_sig covers sig (and the token), never mp_sig itself.
    base = {**PARAMS, "sig": "x" * 64, "access_token": "T"}
    assert signing.v1_mp_sig({**base, "mp_sig": "z"}, path, "k") == signing.v1_mp_sig(
        base, path, "k"
    )
    assert signing.v1_mp_sig({**base, "sig": "w" * 64}, path, "k") != signing.v1_mp_sig(
        base, path, "k"
    )


def test_v1_ts_is_an_integer_in_the_string() -> None:
    text = signing.v1_sig_string(PARAMS, "/p", KEY)
    assert "&ts=1507530737&" in text
    # A float ts would be signed as "1507530737.0" and Midas would answer 90011.
    as_float = {**PARAMS, "ts": float(PARAMS["ts"])}
    assert signing.v1_sig(as_float, "/p", KEY) != signing.v1_sig(PARAMS, "/p", KEY)


def test_signatures_are_lowercase_hex() -> None:
    body = b'{"a":1}'
    for value in (
        signing.v1_sig(PARAMS, "/p", KEY),
        signing.v1_mp_sig({**PARAMS, "access_token": "T"}, "/p", "c2Vzc2lvbg=="),
        signing.v2_pay_sig("/wxa/game/getbalance", body, KEY),
        signing.v2_signature(body, "c2Vzc2lvbg=="),
    ):
        assert HEX64.match(value), value


def test_mp_sig_key_is_the_base64_text_not_its_bytes() -> None:
    key = "V7Q38/i2KXaqrQyl2Yx9Hg=="
    params = {**PARAMS, "access_token": "T", "sig": "s"}
    text = signing.v1_mp_sig_string(params, "/p", key)
    assert signing.v1_mp_sig(params, "/p", key) == (
        hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()
    )


def test_v2_signs_exact_bytes_and_reserialising_changes_the_signature() -> None:
    obj = {"offer_id": "12345678", "openid": "oUrsf", "ts": 1668136271, "zone_id": "1", "env": 0}
    sent = serialise(obj)
    other = json.dumps(obj).encode()  # same object, default separators
    assert json.loads(sent) == json.loads(other) and sent != other
    path = "/wxa/game/getbalance"
    assert signing.v2_pay_sig(path, sent, KEY) != signing.v2_pay_sig(path, other, KEY)
    assert signing.v2_signature(sent, "k") != signing.v2_signature(other, "k")


# -- the client posts exactly the bytes it signed -------------------------------------------


def test_client_posts_the_bytes_it_signed_v2() -> None:
    client, capture = make_client("v2", env="production")
    client.get_balance("oUser", "1", session_key="c2Vzc2lvbmtleQ==")
    (req,) = capture.sent
    body = req.body
    assert isinstance(body, bytes)
    query = parse_qs(urlsplit(req.url).query)
    assert urlsplit(req.url).path == "/wxa/game/getbalance"
    assert query["sig_method"] == ["hmac_sha256"]
    assert query["pay_sig"] == [signing.v2_pay_sig("/wxa/game/getbalance", body, APP_KEY)]
    assert query["signature"] == [signing.v2_signature(body, "c2Vzc2lvbmtleQ==")]
    # The bytes sent are the compact serialisation, not a re-serialised copy of the object.
    reserialised = json.dumps(json.loads(body)).encode()
    assert reserialised != body
    assert query["pay_sig"] != [signing.v2_pay_sig("/wxa/game/getbalance", reserialised, APP_KEY)]
    sent = json.loads(body)
    assert sent == {
        "offer_id": "1450000000",
        "openid": "oUser",
        "ts": sent["ts"],
        "zone_id": "1",
        "env": 0,
        "user_ip": "127.0.0.1",
    }
    assert type(sent["ts"]) is int


@pytest.mark.parametrize(
    ("env", "path"),
    [("sandbox", "/cgi-bin/midas/sandbox/getbalance"), ("production", "/cgi-bin/midas/getbalance")],
)
def test_client_v1_body_is_the_six_params_plus_sig(env: str, path: str) -> None:
    client, capture = make_client("v1", env=env)
    client.get_balance("oUser", "7", session_key="c2Vzc2lvbmtleQ==")  # unused: mp_sig off
    (req,) = capture.sent
    assert urlsplit(req.url).path == path
    assert parse_qs(urlsplit(req.url).query) == {"access_token": ["static-secret-token"]}
    assert isinstance(req.body, bytes)
    sent = json.loads(req.body)
    assert set(sent) == {"openid", "appid", "offer_id", "ts", "zone_id", "pf", "sig"}
    assert type(sent["ts"]) is int and sent["pf"] == "android" and sent["zone_id"] == "7"
    assert sent["sig"] == signing.v1_sig(sent, path, APP_KEY)


def test_client_v1_mp_sig_when_enabled_and_a_session_key_is_known() -> None:
    client, capture = make_client("v1", V1_OK, V1_OK, send_mp_sig=True)
    key = "c2Vzc2lvbmtleQ=="
    client.get_balance("oUser", "1", session_key=key)
    client.get_balance("oOther", "1", session_key=None)
    with_key, without_key = (json.loads(r.body) for r in capture.sent)  # type: ignore[arg-type]
    path = "/cgi-bin/midas/sandbox/getbalance"
    signed = {k: v for k, v in with_key.items() if k != "mp_sig"}
    signed["access_token"] = "static-secret-token"
    assert with_key["mp_sig"] == signing.v1_mp_sig(signed, path, key)
    assert "mp_sig" not in without_key
