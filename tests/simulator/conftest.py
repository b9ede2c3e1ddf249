"""A started simulator and a small hand-signed Midas client for its tests.

The signed requests are built here with `worker.midas.signing` on purpose: the simulator is
tested on its own, not through the project's Midas client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from worker.midas.signing import v1_mp_sig, v1_sig, v2_pay_sig, v2_signature
from worker.simulator import SimConfig, Simulator

OPENID = "oSIMtest000000000000000000001"
SESSION_KEY = "V7Q38/i2KXaqrQyl2Yx9Hg=="


class Api:
    """Signs and sends requests to one simulator as a careful client would."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.cfg = sim.config
        self.base = sim.base_url
        self.http = requests.Session()
        self.token = self.stable_token()["access_token"]

    def stable_token(self, **extra: Any) -> dict[str, Any]:
        body = {"grant_type": "client_credential", "appid": self.cfg.appid}
        body["secret"] = self.cfg.app_secret
        body.update(extra)
        return self.http.post(f"{self.base}/cgi-bin/stable_token", json=body, timeout=5).json()

    def v1_params(self, openid: str = OPENID, zone_id: str = "1", **extra: Any) -> dict[str, Any]:
        params = {
            "openid": openid,
            "appid": self.cfg.appid,
            "offer_id": self.cfg.offer_id,
            "ts": int(time.time()),
            "zone_id": zone_id,
            "pf": "android",
        }
        params.update(extra)
        return params

    def v1(
        self,
        op: str,
        params: dict[str, Any] | None = None,
        *,
        env: str = "sandbox",
        app_key: str | None = None,
        sign_path: str | None = None,
        session_key: str | None = None,
        token: str | None = None,
        sign: bool = True,
        raw: bool = False,
        timeout: float = 5,
    ) -> Any:
        """POST a v1 request; `sign_path`/`app_key` override what the sig is computed with."""
        path = f"/cgi-bin/midas/sandbox/{op}" if env == "sandbox" else f"/cgi-bin/midas/{op}"
        token = self.token if token is None else token
        body = dict(self.v1_params() if params is None else params)
        if sign and "sig" not in body:
            body["sig"] = v1_sig(body, sign_path or path, app_key or self.cfg.app_key(env))
        if session_key is not None:
            signed = {**body, "access_token": token}
            body["mp_sig"] = v1_mp_sig(signed, sign_path or path, session_key)
        r = self.http.post(
            f"{self.base}{path}", params={"access_token": token}, json=body, timeout=timeout
        )
        return r if raw else r.json()

    def v2_params(self, openid: str = OPENID, zone_id: str = "1", **extra: Any) -> dict[str, Any]:
        params = {
            "openid": openid,
            "offer_id": self.cfg.offer_id,
            "ts": int(time.time()),
            "zone_id": zone_id,
            "env": 1,
            "user_ip": "127.0.0.1",
        }
        params.update(extra)
        return params

    def v2(
        self,
        op: str,
        params: dict[str, Any] | None = None,
        *,
        session_key: str = SESSION_KEY,
        app_key: str | None = None,
        body: bytes | None = None,
        query: dict[str, str] | None = None,
        token: str | None = None,
        raw: bool = False,
    ) -> Any:
        """POST a v2 request: pay_sig and signature over the exact bytes sent."""
        path = f"/wxa/game/{op}"
        params = self.v2_params() if params is None else params
        data = json.dumps(params).encode() if body is None else body
        env = "production" if params.get("env") == 0 else "sandbox"
        q = {
            "access_token": self.token if token is None else token,
            "sig_method": "hmac_sha256",
            "pay_sig": v2_pay_sig(path, data, app_key or self.cfg.app_key(env)),
            "signature": v2_signature(data, session_key),
        }
        q.update(query or {})
        r = self.http.post(
            f"{self.base}{path}",
            params=q,
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=5,
        )
        return r if raw else r.json()

    def close(self) -> None:
        self.http.close()


def start(config: SimConfig | None = None) -> Simulator:
    sim = Simulator(config or SimConfig())
    sim.start()
    return sim


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A running simulator with one known player (save 1000, present 100, live session)."""
    simulator = start()
    simulator.add_player(OPENID, save=1000, present=100, session_key=SESSION_KEY)
    yield simulator
    simulator.stop()


@pytest.fixture
def api(sim: Simulator) -> Iterator[Api]:
    client = Api(sim)
    yield client
    client.close()
