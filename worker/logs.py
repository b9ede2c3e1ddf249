"""JSON logs with static event names, and the redaction every log line and error text passes.

    log.info("midas.request", extra={"openid": openid, "errcode": 0})
    -> {"ts": "...", "level": "INFO", "event": "midas.request", "logger": "...", "openid": ...}

Secrets (settings.secret_values(), plus access tokens and session keys the code meets at run
time and hands to `register_secret`) are replaced by ``[REDACTED]`` in the message, its args,
the extra fields and the exception text, and so is any ``access_token=...`` value. `redact()`
is the same function for exception messages and anything else that leaves the process.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading
import traceback
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from worker.config import MIN_SECRET_LENGTH

if TYPE_CHECKING:
    from worker.config import Settings

REDACTED = "[REDACTED]"

# `access_token=...` in a URL or form, `"access_token": "..."` in JSON; same for the other
# credential-bearing parameter names. Lower case only: config messages name the variables in
# upper case (MIDAS_APP_SECRET: ...) and must stay readable. A JSON literal is no credential
# (`"with_session_key": true`), and replacing it would break the JSON line.
_NAMED = re.compile(
    r"""((?:access_token|secret|session_key)["']?\s*[=:]\s*["']?)"""
    r"""(?!\[REDACTED\])(?!(?:true|false|null)\b)([^&\s"',;})\]]+)"""
)

# Runtime secrets (tokens, session keys) are kept in a bounded registry: a long-running worker
# meets millions of session keys, and one that left memory long ago will not be logged again.
# The bound counts forms (up to 4 per secret, _forms). A process holds the keys of one batch
# at a time (at most 200 accounts, worker.recon.runs.MAX_BATCH), and every fetch registers
# its key again just before using it; 8,192 forms keep the last 2,048 keys or more (ten
# batches) in ~2 MiB. The former 50,000 was the owner of the pool processes' RSS growth from
# 10k to 100k accounts (+18 MiB as it filled, bench/memtrace.py, docs/benchmarks.md §4).
_MAX_RUNTIME_SECRETS = 8_192


class _Registry:
    """Secret strings grouped by length, so that redaction is one set lookup per (position,
    length) whatever the number of secrets (a regex alternation would scale with it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # writers only; readers rely on atomic set lookups
        self._pinned: set[str] = set()  # from settings: never evicted
        self._runtime: OrderedDict[str, None] = OrderedDict()  # oldest first
        self._by_len: dict[int, set[str]] = {}

    def add(self, value: str, *, pinned: bool = False) -> None:
        forms = _forms(value)
        if not forms:
            return
        with self._lock:
            for form in forms:
                if pinned:
                    self._pinned.add(form)
                elif form in self._runtime:
                    self._runtime.move_to_end(form)
                    continue
                else:
                    self._runtime[form] = None
                self._by_len.setdefault(len(form), set()).add(form)
            while len(self._runtime) > _MAX_RUNTIME_SECRETS:
                old, _ = self._runtime.popitem(last=False)
                if old not in self._pinned:
                    self._by_len[len(old)].discard(old)

    def spans(self, text: str) -> list[tuple[int, int]]:
        found: list[tuple[int, int]] = []
        # A snapshot of the few lengths; the sets may grow meanwhile, which is harmless.
        for length, values in list(self._by_len.items()):
            for i in range(len(text) - length + 1):
                if text[i : i + length] in values:
                    found.append((i, i + length))
        return found


def _forms(value: str) -> set[str]:
    """The secret as written and as it appears URL-encoded or JSON-escaped."""
    value = value.strip()
    # Shorter strings occur naturally in text: redacting them would shred every line without
    # protecting anything (a secret that short is guessable). Production refuses such
    # secrets (Settings.require), so every real one is long enough.
    if len(value) < MIN_SECRET_LENGTH:
        return set()
    forms = {value, quote(value, safe=""), quote_plus(value, safe=""), json.dumps(value)[1:-1]}
    return {f for f in forms if f}


_registry = _Registry()


def register_secret(value: str | None) -> None:
    """Make `value` (an access token, a session key) disappear from every log line and `redact`."""
    if value:
        _registry.add(value)


def register_settings_secrets(settings: Settings) -> None:
    """Pin every secret of `settings` (AppKey, app secret, static token, encryption keys)."""
    for value in settings.secret_values():
        _registry.add(value, pinned=True)


def redact(text: str) -> str:
    """`text` with every known secret and every access_token value replaced by [REDACTED]."""
    text = _NAMED.sub(lambda m: m.group(1) + REDACTED, text)
    spans = _registry.spans(text)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    pos = 0
    for start, end in spans:
        if start >= pos:
            out += (text[pos:start], REDACTED)
            pos = end
        elif end > pos:  # overlaps the previous one: widen it
            pos = end
    out.append(text[pos:])
    return "".join(out)


def preview(text: str, limit: int = 200) -> str:
    """A redacted, length-capped excerpt of untrusted text, for error messages."""
    cleaned = redact(text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "...(truncated)"


def redact_exception(exc: BaseException) -> str:
    """A redacted traceback text (the chained causes included), for logs and reports."""
    return redact("".join(traceback.format_exception(exc)))


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def _redact_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


class RedactionFilter(logging.Filter):
    """Redact message, args, extra fields and exception text of every record in place.

    Attach it to *handlers*: a logger's own filters do not see records from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Merging the args into the message is the only way to be sure a %r of some object
        # holding a secret is caught; the project logs static event names without args anyway.
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not drop the line  # noqa: BLE001
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS:
                record.__dict__[key] = _redact_value(value)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact_exception(record.exc_info[1])
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, logger, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = record.exc_text or redact_exception(record.exc_info[1])
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        # Redact the finished line once more: a handler may use this formatter without the
        # filter, and a value's str() may only show a secret after serialisation.
        return redact(json.dumps(out, default=str, ensure_ascii=False))


_HANDLER_MARK = "_midas_recon_handler"


def configure_logging(
    settings: Settings | None = None, level: str = "INFO", *, stream: Any = None
) -> logging.Handler:
    """JSON lines on stderr from the root logger, redacted; idempotent (replaces our handler)."""
    if settings is not None:
        register_settings_secrets(settings)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    # The level on the handler too: a library or a test may lower a child logger's level,
    # and that must not put its DEBUG lines into the JSON log.
    handler.setLevel(level.upper())
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactionFilter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3 logs every new connection with the host; requests never logs the query string,
    # but its DEBUG lines are noise in a JSON log.
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))
    return handler
