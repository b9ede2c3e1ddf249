"""Production never talks plain HTTP to Midas: `balance` against an http:// capture server with
MIDAS_ENV=production sends nothing (not even a connection), says why in one line, exits 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("midas-recon"))
APP_SECRET = "prod-app-secret-5b1d07e2"


class Capture:
    """A loopback TCP listener that records every connection and the bytes sent on it, then
    hangs up (whatever arrives is what a network observer would have seen)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                except OSError:
                    self.received.append(b"")

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    with Capture() as server:
        yield server


def balance(base_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MIDAS_", "RECON_"))}
    clean.pop("REDIS_URL", None)
    clean |= {
        "DATABASE_URL": "sqlite:////nonexistent/never-used.db",
        "MIDAS_API_BASE": base_url,
        "MIDAS_APPID": "wx0123456789abcdef",
        "MIDAS_APP_SECRET": APP_SECRET,
        "MIDAS_OFFER_ID": "1450000000",
        "MIDAS_APP_KEY": "prod-appkey-9c3e5a71",
        "MIDAS_TIMEOUT_S": "2",
        **env,
    }
    return subprocess.run(
        [CLI, "balance", "oPlainHttp", "--no-session-key-from-db"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_over_http_sends_nothing_and_says_why(capture: Capture) -> None:
    done = balance(capture.base_url, MIDAS_ENV="production")
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("midas-recon: MIDAS_API_BASE is http:// with MIDAS_ENV=production")
    assert "https://" in line and "MIDAS_ALLOW_PLAIN_HTTP" in line
    assert APP_SECRET not in done.stderr and "Traceback" not in done.stderr
    assert capture.received == []  # not a connection, let alone the app secret


def test_the_capture_does_see_a_sandbox_request(capture: Capture) -> None:
    """The control: the same command in sandbox does reach the server (and its secret with it,
    which is why production refuses plain HTTP)."""
    done = balance(capture.base_url, MIDAS_ENV="sandbox")
    assert done.returncode == 1, done.stdout + done.stderr
    assert capture.received and APP_SECRET.encode() in b"".join(capture.received)
