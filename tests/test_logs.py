"""JSON log lines and the redaction every line and error text goes through."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from worker.config import load_settings
from worker.logs import (
    REDACTED,
    JsonFormatter,
    RedactionFilter,
    configure_logging,
    redact,
    register_secret,
    register_settings_secrets,
)


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_fields(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info("run.started", extra={"run_id": 7, "openid": "o1", "nested": {"a": [1, 2]}})
    logger.warning("midas.quota_paused")
    first, second = _lines(stream)
    assert first["event"] == "run.started" and first["level"] == "INFO"
    assert first["logger"] == "tests.logs" and first["run_id"] == 7 and first["openid"] == "o1"
    assert first["nested"] == {"a": [1, 2]}
    assert str(first["ts"]).endswith("+00:00") and "T" in str(first["ts"])
    assert second["event"] == "midas.quota_paused" and second["level"] == "WARNING"


def test_secrets_are_removed_everywhere(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    key, token = "c2Vzc2lvbi1rZXktbG9ncw==", "runtime-token-0123456789"
    register_secret(key)
    register_secret(token)
    logger.info("message %s with %r", key, {"t": token}, extra={"detail": f"k={key}"})
    logger.info("url", extra={"url": "http://h/p?access_token=unregistered-tok&x=1"})
    logger.info("nested", extra={"obj": {"list": [key, {"deep": token}]}, "n": 5})
    try:
        raise RuntimeError(f"failed for {key} at /cgi?access_token={token}")
    except RuntimeError:
        logger.exception("with.traceback")
    logger.info("stack", stack_info=True, extra={"k": key})
    text = stream.getvalue()
    for secret in (key, token, "unregistered-tok"):
        assert secret not in text
    lines = _lines(stream)
    assert lines[1]["url"] == f"http://h/p?access_token={REDACTED}&x=1"
    assert lines[2]["n"] == 5
    assert "RuntimeError: failed for [REDACTED]" in str(lines[3]["exc"])


def test_redact_handles_encodings_json_and_is_idempotent() -> None:
    key = "a+b/c==session-key"
    register_secret(key)
    text = (
        f"raw {key} url a%2Bb%2Fc%3D%3Dsession-key plus a%2Bb%2Fc%3D%3Dsession-key "
        '{"access_token": "tok-json", "secret": "s3cr3t-value"} access_token=abc&z=1'
    )
    once = redact(text)
    assert key not in once and "a%2Bb" not in once
    assert "tok-json" not in once and "s3cr3t-value" not in once and "abc" not in once
    assert redact(once) == once


def test_overlapping_and_adjacent_secrets() -> None:
    register_secret("overlap-secret-AAAA")
    register_secret("secret-AAAA-BBBB-tail")
    out = redact("x overlap-secret-AAAA-BBBB-tail y")
    assert out == f"x {REDACTED} y"


def test_upper_case_variable_names_stay_readable() -> None:
    # Config errors name variables in upper case; only lower-case parameters are redacted.
    assert redact("MIDAS_APP_SECRET: field required") == "MIDAS_APP_SECRET: field required"


def test_short_strings_are_not_treated_as_secrets() -> None:
    register_secret("ab")
    assert redact("a bab abc") == "a bab abc"


def test_many_runtime_secrets_stay_fast() -> None:
    for i in range(5000):
        register_secret(f"bulk-session-key-{i:06d}==")
    line = "event openid=o123 " * 30 + "bulk-session-key-004999=="
    started = time.perf_counter()
    for _ in range(100):
        out = redact(line)
    assert REDACTED in out and "004999" not in out
    assert time.perf_counter() - started < 2.0  # ~ms per line, whatever the number of keys


def test_the_runtime_registry_is_bounded_and_keeps_the_latest_keys() -> None:
    from worker import logs

    register_settings_secrets(load_settings({"MIDAS_APP_KEY": "pinned-appkey-bounded-test"}))
    count = logs._MAX_RUNTIME_SECRETS  # each key has 2 forms: twice the bound in forms
    for i in range(count):
        register_secret(f"bounded-session-key-{i:06d}==")
    assert len(logs._registry._runtime) <= logs._MAX_RUNTIME_SECRETS
    held = sum(len(forms) for forms in logs._registry._by_len.values())
    assert held <= logs._MAX_RUNTIME_SECRETS + len(logs._registry._pinned)
    latest = f"bounded-session-key-{count - 1:06d}=="
    assert redact(f"x {latest} y") == f"x {REDACTED} y"
    assert redact("x bounded-session-key-000000== y") == "x bounded-session-key-000000== y"
    assert redact("x pinned-appkey-bounded-test y") == f"x {REDACTED} y"  # never evicted


def test_configure_logging_once_with_settings_secrets() -> None:
    settings = load_settings({"MIDAS_APP_KEY": "configured-appkey-xyz"})
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        configure_logging(settings, "INFO", stream=stream)
        handler = configure_logging(settings, "INFO", stream=stream)  # again: replaces
        ours = [h for h in root.handlers if h not in before]
        assert ours == [handler]
        logging.getLogger("worker.test").info("x", extra={"v": "configured-appkey-xyz"})
        logging.getLogger("worker.test").debug("hidden")
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["v"] == REDACTED
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(logging.WARNING)


def test_a_child_logger_at_debug_does_not_leak_into_an_info_log() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    chatty = logging.getLogger("worker.test.chatty")
    chatty.setLevel(logging.DEBUG)  # as a library or a test harness may do
    try:
        configure_logging(None, "INFO", stream=stream)
        chatty.debug("debug detail")
        chatty.info("kept")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["event"] for line in lines] == ["kept"]
    finally:
        chatty.setLevel(logging.NOTSET)
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
