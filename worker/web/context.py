"""What every request of the console reads: the console's parts, the client's address as far
as our proxies are trusted, whether it came over TLS, and the session's CSRF token.

Its own module so that the app (which installs the guard) and the views (which use these)
both import it, and not each other.
"""

from __future__ import annotations

import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from ipaddress import ip_address

from flask import request, session
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db.session import session_scope
from worker.web.actions import Actions
from worker.web.throttle import LoginThrottle


@dataclass
class Console:
    """What the views need besides the request: settings, login throttle, actions."""

    settings: Settings
    throttle: LoginThrottle
    actions: Actions

    def db(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.DATABASE_URL)


def console() -> Console:
    from flask import current_app

    return current_app.extensions["midas_recon"]  # type: ignore[no-any-return]


def _trusted(address: str | None) -> bool:
    proxies = console().settings.trusted_proxies
    if not proxies or not address:
        return False
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def peer_trusted() -> bool:
    return _trusted(request.remote_addr)


def client_address() -> str:
    """The client's address: the proxies' word for it only as far as they are trusted."""
    if not peer_trusted():
        return request.remote_addr or "-"
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
    # From our side backwards: the first hop that is not one of our proxies is the client;
    # anything before it the client could have written itself.
    for hop in reversed([h for h in hops if h]):
        if not _trusted(hop):
            return hop
    return request.remote_addr or "-"


def via_tls() -> bool:
    if request.scheme == "https":
        return True
    return peer_trusted() and request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token
