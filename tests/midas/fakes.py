"""Test doubles for the Midas client: a no-op limiter and a scripted HTTP transport."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import requests
from requests.adapters import BaseAdapter

from worker.midas.client import MidasClient
from worker.midas.token import StaticToken

T = TypeVar("T")

BASE = "http://midas.test"
APP_KEY = "unit-test-appkey-0123456789"

V1_OK = {
    "errcode": 0,
    "errmsg": "ok",
    "balance": 105,
    "gen_balance": 5,
    "first_save": 1,
    "save_amt": 100,
    "save_sum": 100,
    "cost_sum": 5,
    "present_sum": 10,
}
V2_OK = {
    "errcode": 0,
    "errmsg": "ok",
    "balance": 105,
    "present_balance": 5,
    "first_save": True,
    "sum_save": 100,
    "sum_balance": 100,
    "sum_cost": 5,
    "sum_present": 10,
}


class NoLimiter:
    """Lets everything through; counts slots and records pauses."""

    def __init__(self) -> None:
        self.slots = 0
        self.pauses: list[float] = []

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.slots += 1
        yield

    @contextmanager
    def slot_prepared(self, prepare: Callable[[], T]) -> Iterator[T]:
        self.slots += 1
        yield prepare()

    def pause_until(self, unix_ts: float) -> None:
        self.pauses.append(unix_ts)

    def paused_until(self) -> float | None:
        return max(self.pauses) if self.pauses else None


class _Raw:
    def __init__(self, data: bytes, fail: Exception | None = None) -> None:
        self._data = data
        self._fail = fail

    def stream(self, chunk_size: int, decode_content: bool = True) -> Iterator[bytes]:
        if self._data:
            yield self._data
        if self._fail is not None:
            raise self._fail

    def read(self, *args: Any, **kwargs: Any) -> bytes:
        data, self._data = self._data, b""
        return data

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


Step = dict[str, Any] | bytes | tuple[int, bytes] | Exception


class ScriptedAdapter(BaseAdapter):
    """Answers each request with the next scripted step; records every prepared request.

    A step is a dict (JSON answer, HTTP 200), raw bytes (HTTP 200), (status, bytes), an
    exception to raise from send(), or ("body-error", exc) to fail while the body is read.
    """

    def __init__(self, *steps: Step | tuple[str, Exception]) -> None:
        super().__init__()
        self.steps = list(steps)
        self.sent: list[requests.PreparedRequest] = []
        self.kwargs: list[dict[str, Any]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        self.kwargs.append(kwargs)
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if isinstance(step, Exception):
            raise step
        status, data, fail = 200, b"", None
        if isinstance(step, dict):
            data = json.dumps(step).encode()
        elif isinstance(step, bytes):
            data = step
        elif isinstance(step[0], str):
            data, fail = b'{"errcode":0', step[1]  # type: ignore[assignment]
        else:
            status, data = step  # type: ignore[assignment]
        resp = requests.Response()
        resp.status_code = status
        resp.url = request.url or ""
        resp.request = request
        resp.raw = _Raw(data, fail)
        return resp

    def close(self) -> None:
        pass


class CountingTokens:
    """A token provider that hands out TOKEN-1, TOKEN-2, ... and counts invalidations."""

    def __init__(self) -> None:
        self.n = 1
        self.invalidated: list[str] = []

    def get(self) -> str:
        return f"secret-token-{self.n}"

    def invalidate(self, bad_token: str) -> None:
        self.invalidated.append(bad_token)
        if bad_token == self.get():
            self.n += 1


def make_client(
    api_version: str = "v1",
    *steps: Step | tuple[str, Exception],
    env: str = "sandbox",
    tokens: Any = None,
    limiter: Any = None,
    send_mp_sig: bool = False,
) -> tuple[MidasClient, ScriptedAdapter]:
    client = MidasClient(
        base_url=BASE,
        api_version=api_version,  # type: ignore[arg-type]
        env=env,  # type: ignore[arg-type]
        appid="wxunit",
        offer_id="1450000000",
        app_key=APP_KEY,
        limiter=limiter or NoLimiter(),
        tokens=tokens or StaticToken("static-secret-token"),
        send_mp_sig=send_mp_sig,
    )
    adapter = ScriptedAdapter(*(steps or (V1_OK if api_version == "v1" else V2_OK,)))
    client.session.mount(BASE, adapter)
    return client, adapter
