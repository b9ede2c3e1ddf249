"""The console on waitress, a production WSGI server (threads, no development reloader)."""

from __future__ import annotations

from typing import Any

from waitress.server import create_server

from worker.config import Settings
from worker.web.app import create_app

THREADS = 8


def make_server(settings: Settings, host: str, port: int, **kwargs: Any) -> Any:
    """A bound, not yet serving, server; `.run()` serves, `.close()` stops. Port 0 = any."""
    app = create_app(settings, **kwargs)
    # waitress' own proxy handling stays off: worker/web/app.py decides which peers to trust.
    return create_server(app, host=host, port=port, threads=THREADS, ident="midas-recon")
