"""One POST to one webhook, its answer judged. No error text ever carries the URL."""

from __future__ import annotations

import json
from typing import Any

import requests

from worker.alerts.events import Alert
from worker.alerts.formats import render
from worker.alerts.targets import Format, Target

DEFAULT_TIMEOUT_S = 10.0


class DeliveryFailed(Exception):
    """The webhook did not take the message; the text names the target's label only."""


def post(
    target: Target,
    alert: Alert,
    *,
    session: requests.Session | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Send `alert` to `target`; DeliveryFailed unless the receiver says it took it."""
    sender = session or requests
    failure: str | None = None
    try:
        resp = sender.post(
            target.url,
            json=render(alert, target.format),
            timeout=(timeout_s, timeout_s),
            # A redirect would send the body (and our trust) somewhere else.
            allow_redirects=False,
        )
    except requests.RequestException as exc:
        # requests' messages hold the URL, and with it the bot's key: only the type goes on.
        failure = type(exc).__name__
    if failure is not None:
        raise DeliveryFailed(f"{target.label}: {failure}")
    if not 200 <= resp.status_code < 300:
        raise DeliveryFailed(f"{target.label}: HTTP {resp.status_code}")
    problem = _refused(target.format, resp)
    if problem:
        raise DeliveryFailed(f"{target.label}: {problem}")


def _refused(fmt: Format, resp: requests.Response) -> str | None:
    """WeCom and Feishu answer 200 with an error code in the body."""
    if fmt not in (Format.WECOM, Format.FEISHU):
        return None
    try:
        answer: Any = resp.json()
    except (ValueError, json.JSONDecodeError):
        return "answer is not JSON"
    if not isinstance(answer, dict):
        return "answer is not a JSON object"
    code = (
        answer.get("errcode")
        if fmt is Format.WECOM
        else answer.get("code", answer.get("StatusCode"))
    )
    if code not in (0, None) or (fmt is Format.WECOM and code is None):
        # Their messages ("invalid webhook url", "sign match fail") quote no key; keep them short.
        msg = str(answer.get("errmsg") or answer.get("msg") or "")[:100]
        return f"refused with code {code} {msg}".strip()
    return None
