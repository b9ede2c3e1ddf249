"""A webhook receiver on loopback (real HTTP), answering like WeCom, Feishu, Slack or a plain
JSON endpoint, with scripted failures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest


@dataclass
class Received:
    path: str
    query: str
    body: dict[str, Any]
    status: int


@dataclass
class Receiver:
    port: int
    received: list[Received] = field(default_factory=list)
    # path prefix -> statuses to answer first (then 200)
    failures: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ok(self, prefix: str) -> list[Received]:
        """The messages a path took (answered 200)."""
        return [r for r in self.received if r.path.startswith(prefix) and r.status == 200]


def _answer_for(path: str) -> bytes:
    if path.startswith("/cgi-bin/webhook/send"):  # WeCom
        return b'{"errcode":0,"errmsg":"ok"}'
    if path.startswith("/open-apis/bot/"):  # Feishu / Lark
        return b'{"code":0,"msg":"success","data":{}}'
    if path.startswith("/services/"):  # Slack
        return b"ok"
    return b'{"ok":true}'


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            with state.lock:
                script = next(
                    (v for k, v in state.failures.items() if parts.path.startswith(k)), []
                )
                status = script.pop(0) if script else 200
                state.received.append(Received(parts.path, parts.query, body, status))
            payload = _answer_for(parts.path) if status == 200 else b"boom"
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: Any) -> None:  # quiet: the test reads `received`
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
