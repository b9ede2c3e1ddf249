"""The operators' console: a server-rendered Flask app served by waitress (`midas-recon web`).

Every route but the login page and the static files needs an operator: logged in with a
password (`midas-recon operators add`) or named by a trusted single sign-on proxy
(RECON_WEB_AUTH_HEADER, honoured only from RECON_WEB_TRUSTED_PROXIES). Every state-changing
request carries the session's CSRF token; without it nothing changes. Templates autoescape
everything, and the Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from pathlib import Path

from flask import Flask, g, jsonify, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.wrappers.response import Response

from worker import business_calendar as clock
from worker.config import Settings
from worker.web.actions import Actions
from worker.web.context import (
    Console,
    client_address,
    console,
    csrf_token,
    peer_trusted,
    via_tls,
)
from worker.web.operators import NAME as OPERATOR_NAME
from worker.web.operators import may_act
from worker.web.throttle import LoginThrottle

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_ENDPOINTS = frozenset({"auth.login", "static"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_HOURS = 12
HERE = Path(__file__).resolve().parent


def create_app(settings: Settings, *, actions: Actions | None = None) -> Flask:
    app = Flask(
        "worker.web",
        template_folder=str(HERE / "templates"),
        static_folder=str(HERE / "static"),
    )
    secret = settings.RECON_WEB_SESSION_SECRET
    app.config.update(
        # A random key per process when none is set: sessions end with the process.
        SECRET_KEY=secret.get_secret_value() if secret else secrets.token_bytes(32),
        SESSION_COOKIE_NAME="midas_recon_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=dt.timedelta(hours=SESSION_HOURS),
        MAX_CONTENT_LENGTH=256 * 1024,  # forms only: a note, a list of case ids
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.session_interface = _Sessions()
    app.jinja_env.autoescape = True  # every template, whatever its file name
    app.extensions["midas_recon"] = Console(
        settings, LoginThrottle(), actions if actions is not None else Actions(settings)
    )

    from worker.web import filters, views

    filters.register(app, settings)
    app.register_blueprint(views.auth)
    app.register_blueprint(views.pages)
    app.register_blueprint(views.api)
    app.before_request(_guard)
    app.after_request(_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token
    return app


# -- who is asking ------------------------------------------------------------------------------


def _proxy_operator() -> str | None:
    header = console().settings.RECON_WEB_AUTH_HEADER
    if header is None or not peer_trusted():
        return None  # from anyone else the header is just text a client typed
    return request.headers.get(header) or None


class _Sessions(SecureCookieSessionInterface):
    """Flask's signed cookie session, `Secure` whenever the request came over TLS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return via_tls()


# -- the guard ----------------------------------------------------------------------------------


def _csrf_ok() -> bool:
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    return isinstance(expected, str) and hmac.compare_digest(expected.encode(), given.encode())


def _guard() -> Response | tuple[Response, int] | None:
    g.operator = None
    if request.endpoint == "static":
        return None  # the stylesheet and the script: no data, no database round trip
    if request.method not in SAFE_METHODS and not _csrf_ok():
        # Checked before anything else runs: a forged or stale form changes nothing.
        return _refuse(400, "the form's security token is missing or expired; reload the page")
    proxied = _proxy_operator()
    if proxied is not None and not OPERATOR_NAME.fullmatch(proxied):
        # Case events record "operator:<name>"; a name that cannot be recorded cannot act.
        return _refuse(403, "the single sign-on name must be 1 to 55 characters without spaces")
    name = proxied or session.get("operator")
    if isinstance(name, str) and name:
        with console().db() as db:
            allowed = may_act(db, name, vouched_by_proxy=proxied is not None)
        if allowed:
            g.operator = name
        else:
            session.clear()
    if g.operator is None and request.path.startswith("/api/") and request.authorization:
        refused = _basic_auth()
        if refused is not None:
            return refused
    if g.operator is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if request.path.startswith("/api/"):
            return _refuse(401, "log in first")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return None


def _basic_auth() -> tuple[Response, int] | None:
    """HTTP Basic on the read-only API, for ticketing and BI tools that hold no session: the
    same operators, the same throttle and the same answer for a wrong name or password. Each
    request pays one Argon2 verification; no session is created. (No WWW-Authenticate header:
    the console's own polling must not make a browser pop up a password dialog.)"""
    from worker.web.operators import authenticate

    auth = request.authorization
    if auth is None or auth.type != "basic" or not auth.username:
        return None
    c = console()
    name = auth.username.strip()[:100]
    keys = (f"ip:{client_address()}", f"name:{name.lower()}")
    if c.throttle.blocked(*keys):
        return _refuse(429, "too many login attempts; wait a few minutes")
    with c.db() as db:
        who = authenticate(db, name, auth.password or "", now=clock.utcnow())
    if who is None:
        c.throttle.failed(*keys)
        return _refuse(401, "wrong name or password")
    g.operator = who
    return None


def _refuse(status: int, message: str) -> tuple[Response, int]:
    if request.path.startswith("/api/"):
        return jsonify(error=message), status
    from flask import render_template

    return Response(render_template("error.html", message=message), status=status), status


def _headers(response: Response) -> Response:
    h = response.headers
    h["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "same-origin"
    if request.endpoint != "static":
        h["Cache-Control"] = "no-store"  # pages hold account data: keep them out of caches
    if via_tls():
        h["Strict-Transport-Security"] = "max-age=31536000"
    return response
