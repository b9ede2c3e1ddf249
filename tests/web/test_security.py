"""The console's security musts, against the app in this process on the test Postgres:
anonymous requests refused everywhere, CSRF, escaping, the SSO header only from trusted
proxies, cookies, login answers and their rate, and no secret in any page or JSON."""

from __future__ import annotations

import datetime as dt
import re
import statistics
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.web.conftest import (
    OPERATOR,
    PASSWORD,
    SESSION_SECRET,
    Seeded,
    add_operator,
    csrf_of,
    log_in,
    make_client,
)
from worker.config import load_settings
from worker.db.crypto import SessionKeyCipher
from worker.db.models import Account, MismatchCase, MismatchEvent, Operator, Run
from worker.db.session import session_scope

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 11, 24, 18, 30, tzinfo=dt.UTC)
SAMPLE = {"case_id": "1", "run_id": "1", "openid": "o1", "day": "2026-11-24"}


def make_case(url: str, openid: str = "o1", status: str = "confirmed", **extra: Any) -> int:
    with session_scope(url) as session:
        case = MismatchCase(
            openid=openid,
            zone_id="1",
            check="balance",
            status=status,
            midas_value=100,
            ledger_value=40,
            delta=60,
            first_seen_at=T0,
            last_seen_at=T0,
            **extra,
        )
        session.add(case)
        session.flush()
        session.add(
            MismatchEvent(
                case_id=case.id, at=T0, actor="system", to_status="suspected", midas_value=100
            )
        )
        return case.id


def case_state(url: str, case_id: int) -> tuple[str, int]:
    with session_scope(url) as session:
        case = session.get(MismatchCase, case_id)
        assert case is not None
        events = session.scalar(
            select(func.count()).select_from(MismatchEvent).where(MismatchEvent.case_id == case_id)
        )
        return case.status, int(events or 0)


def routes(app: Any) -> list[tuple[str, str]]:
    """(method, concrete path) for every route but the login page and static files."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static", "auth.login"):
            continue
        values = {}
        for arg in rule.arguments:
            if arg == "action":
                values[arg] = "ack"
            elif arg == "fmt":
                values[arg] = "csv"
            else:
                values[arg] = SAMPLE[arg]
        path = rule.build(values)[1]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((method, path))
    return out


# -- anonymous ----------------------------------------------------------------------------------


def test_every_page_and_api_route_refuses_an_anonymous_request(app_env: dict[str, str]) -> None:
    case_id = make_case(app_env["DATABASE_URL"])
    client = make_client(app_env)
    token = csrf_of(client)  # even with a valid CSRF token, an anonymous POST does nothing
    checked = routes(client.application)
    paths = {p for _, p in checked}
    for expected in (
        "/cases",
        "/api/cases",
        "/accounts/o1",
        "/api/accounts/o1",
        "/runs",
        "/api/runs",
        "/runs/1",
        "/api/runs/1",
        "/statements/2026-11-24",
        "/api/statements/2026-11-24",
        "/health",
        "/api/health",
        "/cases/ack",
        "/accounts/o1/recheck",
        "/cases/1/ack",
        "/logout",
    ):
        assert expected in paths, expected
    for method, path in checked:
        answer = client.open(
            path, method=method, data={"csrf_token": token, "note": "x", "case_id": str(case_id)}
        )
        if path.startswith("/api/"):
            assert answer.status_code == 401, (method, path)
            assert answer.get_json() == {"error": "log in first"}
        elif path == "/logout":
            assert answer.status_code == 302
        else:
            assert answer.status_code == 302, (method, path)
            assert answer.headers["Location"].startswith("/login"), (method, path)
        assert b"o1" not in answer.data or path.startswith("/accounts"), (method, path)
    assert case_state(app_env["DATABASE_URL"], case_id) == ("confirmed", 1)
    with session_scope(app_env["DATABASE_URL"]) as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 0, "no recheck planned"


# -- CSRF ---------------------------------------------------------------------------------------


def test_a_post_without_the_csrf_token_changes_nothing(app_env: dict[str, str]) -> None:
    url = app_env["DATABASE_URL"]
    case_id = make_case(url)
    client = make_client(app_env)
    assert log_in(client).status_code == 302
    forged = [
        (f"/cases/{case_id}/ack", {"note": "forged"}),
        (f"/cases/{case_id}/resolve", {"note": "forged"}),
        ("/cases/ack", {"note": "forged", "case_id": str(case_id)}),
        ("/accounts/o1/recheck", {"zone_id": "1"}),
        ("/logout", {}),
    ]
    for path, form in forged:
        for token in (None, "", "not-the-token"):
            data = dict(form) if token is None else {**form, "csrf_token": token}
            answer = client.post(path, data=data)
            assert answer.status_code == 400, (path, token)
            assert "security token" in answer.get_data(as_text=True)
    assert case_state(url, case_id) == ("confirmed", 1)
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 0
    assert client.get("/cases").status_code == 200, "still logged in: logout was refused too"

    token = csrf_of(client, "/cases")
    done = client.post(f"/cases/{case_id}/ack", data={"note": "real", "csrf_token": token})
    assert done.status_code == 302
    assert case_state(url, case_id) == ("acknowledged", 2), "the same POST with its token works"
    header = client.post(
        f"/cases/{case_id}/resolve", data={"note": "by header"}, headers={"X-CSRF-Token": token}
    )
    assert header.status_code == 302 and case_state(url, case_id) == ("resolved", 3)


def test_login_itself_needs_the_csrf_token(app_env: dict[str, str]) -> None:
    client = make_client(app_env)
    client.get("/login")
    answer = client.post("/login", data={"name": OPERATOR, "password": PASSWORD})
    assert answer.status_code == 400
    assert client.get("/cases").status_code == 302


# -- markup shown as text -----------------------------------------------------------------------


def test_html_in_an_openid_a_note_or_an_operator_name_is_shown_as_text(
    app_env: dict[str, str],
) -> None:
    url = app_env["DATABASE_URL"]
    evil_openid = "<script>alert(1)</script>"
    evil_name = "<b>mallory</b>"
    evil_note = '<img src=x onerror="alert(2)"> & "quotes"'
    case_id = make_case(url, openid=evil_openid)
    add_operator(url, evil_name, PASSWORD)
    client = make_client(app_env)
    assert log_in(client, evil_name).status_code == 302
    token = csrf_of(client, "/cases")
    client.post(f"/cases/{case_id}/ack", data={"note": evil_note, "csrf_token": token})
    assert case_state(url, case_id) == ("acknowledged", 2)

    pages = ["/cases", f"/cases/{case_id}", "/cases?status=all&openid=%3Cscript%3E"]
    account = client.get(f"/cases/{case_id}").get_data(as_text=True)
    link = re.search(r'id="case-account" href="([^"]+)"', account)
    assert link, "the case links to its account"
    pages.append(link.group(1).replace("&amp;", "&"))
    for path in pages:
        page = client.get(path)
        assert page.status_code == 200, path
        body = page.get_data(as_text=True)
        for raw in (evil_openid, evil_name, "<img src=x"):
            assert raw not in body, (path, raw)
    body = client.get(f"/cases/{case_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&lt;b&gt;mallory&lt;/b&gt;" in body
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt; &amp; &#34;quotes&#34;" in body
    account_body = client.get(link.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in account_body
    # And as data in JSON, never markup.
    doc = client.get(f"/api/cases/{case_id}").get_json()
    assert doc["openid"] == evil_openid and doc["events"][-1]["note"] == evil_note
    assert doc["events"][-1]["actor"] == f"operator:{evil_name}"


# -- single sign-on header ----------------------------------------------------------------------


def test_the_proxy_header_counts_only_from_a_trusted_proxy(app_env: dict[str, str]) -> None:
    env = {
        **app_env,
        "RECON_WEB_AUTH_HEADER": "X-Remote-User",
        "RECON_WEB_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7",
    }
    client = make_client(env)
    trusted = {"REMOTE_ADDR": "10.1.2.3"}
    page = client.get("/cases", headers={"X-Remote-User": "sso.carol"}, environ_base=trusted)
    assert page.status_code == 200 and ">sso.carol<" in page.get_data(as_text=True)
    assert (
        client.get(
            "/api/cases",
            headers={"X-Remote-User": "sso.carol"},
            environ_base={"REMOTE_ADDR": "192.0.2.7"},
        ).status_code
        == 200
    )

    for untrusted in ("192.0.2.8", "127.0.0.1", "11.1.2.3"):
        other = make_client(env)
        answer = other.get(
            "/api/cases",
            headers={"X-Remote-User": OPERATOR, "X-Forwarded-For": "10.1.2.3"},
            environ_base={"REMOTE_ADDR": untrusted},
        )
        assert answer.status_code == 401, untrusted
        assert (
            other.get(
                "/cases",
                headers={"X-Remote-User": OPERATOR},
                environ_base={"REMOTE_ADDR": untrusted},
            ).status_code
            == 302
        )

    # A name that cannot be recorded as an event's actor is refused, not truncated.
    spaced = client.get("/api/cases", headers={"X-Remote-User": "Jane Doe"}, environ_base=trusted)
    assert spaced.status_code == 403 and "single sign-on name" in spaced.get_json()["error"]

    # Without RECON_WEB_TRUSTED_PROXIES the header is ignored from everyone.
    bare = make_client({**app_env, "RECON_WEB_AUTH_HEADER": "X-Remote-User"})
    assert (
        bare.get(
            "/api/cases", headers={"X-Remote-User": OPERATOR}, environ_base=trusted
        ).status_code
        == 401
    )

    # A disabled operator stays out, whoever vouches for the name.
    from worker.web.operators import disable_operator

    with session_scope(app_env["DATABASE_URL"]) as session:
        disable_operator(session, OPERATOR, now=dt.datetime.now(dt.UTC))
    assert (
        client.get(
            "/api/cases", headers={"X-Remote-User": OPERATOR}, environ_base=trusted
        ).status_code
        == 401
    )


def test_an_sso_operator_acts_under_the_proxy_name_with_a_csrf_token(
    app_env: dict[str, str],
) -> None:
    url = app_env["DATABASE_URL"]
    case_id = make_case(url)
    env = {
        **app_env,
        "RECON_WEB_AUTH_HEADER": "X-Remote-User",
        "RECON_WEB_TRUSTED_PROXIES": "10.0.0.1",
    }
    client = make_client(env)
    kw: dict[str, Any] = {
        "headers": {"X-Remote-User": "sso.dave"},
        "environ_base": {"REMOTE_ADDR": "10.0.0.1"},
    }
    assert client.post(f"/cases/{case_id}/ack", data={"note": "n"}, **kw).status_code == 400
    page = client.get("/cases", **kw).get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, "the page carries the session's CSRF token"
    token = found.group(1)
    done = client.post(f"/cases/{case_id}/ack", data={"note": "n", "csrf_token": token}, **kw)
    assert done.status_code == 302
    with session_scope(url) as session:
        last = session.scalars(select(MismatchEvent).order_by(MismatchEvent.id.desc())).first()
        assert last is not None and last.actor == "operator:sso.dave"


# -- cookies, login answers, rate ---------------------------------------------------------------


def _set_cookie(answer: Any) -> str:
    cookies = [v for k, v in answer.headers.items() if k == "Set-Cookie"]
    assert cookies, "a session cookie is set"
    return cookies[-1]


def test_session_cookie_is_httponly_samesite_lax_and_secure_over_tls(
    app_env: dict[str, str],
) -> None:
    plain = make_client(app_env)
    cookie = _set_cookie(log_in(plain))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie

    tls = make_client(app_env)
    page = tls.get("/login", base_url="https://console.example")
    assert "Secure" in _set_cookie(page)
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    assert "Strict-Transport-Security" not in plain.get("/login").headers
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert found
    token = found.group(1)
    answer = tls.post(
        "/login",
        base_url="https://console.example",
        data={"csrf_token": token, "name": OPERATOR, "password": PASSWORD},
    )
    cookie = _set_cookie(answer)
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie

    env = {**app_env, "RECON_WEB_TRUSTED_PROXIES": "10.0.0.1"}
    behind = make_client(env)
    tls_proxy = {
        "headers": {"X-Forwarded-Proto": "https"},
        "environ_base": {"REMOTE_ADDR": "10.0.0.1"},
    }
    assert "Secure" in _set_cookie(behind.get("/login", **tls_proxy))
    spoofed = make_client(env)
    answer = spoofed.get(
        "/login", headers={"X-Forwarded-Proto": "https"}, environ_base={"REMOTE_ADDR": "10.0.0.2"}
    )
    assert "Secure" not in _set_cookie(answer), "an untrusted peer's header is ignored"


def _body(answer: Any) -> str:
    return re.sub(r'value="[^"]*"', 'value=""', answer.get_data(as_text=True))


def test_wrong_password_and_unknown_name_get_the_same_answer(app_env: dict[str, str]) -> None:
    client = make_client(app_env)
    timings: dict[str, list[float]] = {"wrong": [], "unknown": []}
    answers = {}
    for i in range(8):
        kind = "wrong" if i % 2 else "unknown"
        name = OPERATOR if kind == "wrong" else f"nobody{i}"
        ip = {"REMOTE_ADDR": f"192.0.2.{i + 10}"}
        token = csrf_of(client)
        started = time.perf_counter()
        answer = client.post(
            "/login",
            environ_base=ip,
            data={"csrf_token": token, "name": name, "password": "wrong" * 3},
        )
        timings[kind].append(time.perf_counter() - started)
        answers[kind] = answer
    assert answers["wrong"].status_code == answers["unknown"].status_code == 401
    assert _body(answers["wrong"]).replace(OPERATOR, "X") == _body(answers["unknown"]).replace(
        "nobody6", "X"
    ).replace("nobody0", "X")
    assert "Wrong name or password." in _body(answers["wrong"])
    wrong, unknown = statistics.median(timings["wrong"]), statistics.median(timings["unknown"])
    # Both pay one Argon2 verification; a skipped one would make the ratio ~50 (shared machine:
    # a generous band).
    assert 1 / 3 < wrong / unknown < 3, (wrong, unknown)


def test_login_attempts_are_rate_limited(app_env: dict[str, str]) -> None:
    client = make_client(app_env)
    ip = {"REMOTE_ADDR": "198.51.100.9"}

    def attempt(password: str, env: dict[str, str] = ip, name: str = OPERATOR) -> Any:
        token = csrf_of(client)
        return client.post(
            "/login",
            environ_base=env,
            data={"csrf_token": token, "name": name, "password": password},
        )

    for _ in range(5):
        assert attempt("not-the-password").status_code == 401
    blocked = attempt(PASSWORD)
    assert blocked.status_code == 429 and "Too many login attempts" in _body(blocked)
    assert client.get("/api/cases").status_code == 401, "the right password did not get in"
    # The name is locked from other addresses too; other names from other addresses are not.
    assert attempt(PASSWORD, {"REMOTE_ADDR": "198.51.100.10"}).status_code == 429
    add_operator(app_env["DATABASE_URL"], "bob", PASSWORD)
    assert attempt(PASSWORD, {"REMOTE_ADDR": "198.51.100.11"}, "bob").status_code == 302


def test_a_disabled_operator_is_logged_out_at_the_next_request(app_env: dict[str, str]) -> None:
    from worker.web.operators import disable_operator

    client = make_client(app_env)
    assert log_in(client).status_code == 302
    assert client.get("/api/cases").status_code == 200
    with session_scope(app_env["DATABASE_URL"]) as session:
        disable_operator(session, OPERATOR, now=dt.datetime.now(dt.UTC))
    assert client.get("/api/cases").status_code == 401
    assert log_in(client).status_code == 401, "and cannot log in again"


def test_login_redirects_only_to_this_site(app_env: dict[str, str]) -> None:
    targets = {
        "//evil.example/x": "/cases",
        "https://evil.example/": "/cases",
        "/\\evil.example": "/cases",
        "/runs?kind=all": "/runs?kind=all",
    }
    for target, lands in targets.items():
        client = make_client(app_env)
        token = csrf_of(client)
        answer = client.post(
            "/login",
            data={"csrf_token": token, "name": OPERATOR, "password": PASSWORD, "next": target},
        )
        assert answer.headers["Location"] == lands, target


# -- no secret anywhere -------------------------------------------------------------------------


def test_no_secret_appears_in_any_page_or_json(seeded: Seeded) -> None:
    settings = load_settings(seeded.env)
    client = make_client(seeded.env)
    assert log_in(client).status_code == 302
    with session_scope(seeded.url) as session:
        accounts = session.scalars(select(Account)).all()
        cipher = SessionKeyCipher.from_settings(settings)
        session_keys = [cipher.decrypt(a.session_key_enc) for a in accounts if a.session_key_enc]
        ciphertexts = [a.session_key_enc for a in accounts if a.session_key_enc]
        hashes = list(session.scalars(select(Operator.password_hash)))
        case_ids = list(session.scalars(select(MismatchCase.id)))
        run_ids = list(session.scalars(select(Run.id)))
        some = accounts[:8]
    assert session_keys and hashes and case_ids
    # A recheck so that an access token is in use in the console's own process.
    token = csrf_of(client, "/cases")
    answer = client.post(
        f"/accounts/{some[0].openid}/recheck",
        data={"zone_id": some[0].zone_id, "csrf_token": token},
    )
    assert answer.status_code == 302
    time.sleep(1.0)
    access_tokens = list(seeded.world.sim._state._tokens)  # what Midas issued
    assert access_tokens, "the recheck fetched an access token"

    day = (settings.calendar.today() - dt.timedelta(days=1)).isoformat()
    paths = [
        "/cases",
        "/cases?status=all",
        "/api/cases?status=all&per_page=500",
        "/runs",
        "/runs?kind=all",
        "/api/runs?kind=all",
        "/health",
        "/api/health",
        f"/statements/{day}",
        f"/api/statements/{day}",
        f"/statements/{day}/download/csv",
        f"/statements/{day}/download/html",
        f"/statements/{day}/download/json",
    ]
    paths += [f"/cases/{i}" for i in case_ids] + [f"/api/cases/{i}" for i in case_ids]
    paths += [f"/runs/{i}" for i in run_ids] + [f"/api/runs/{i}" for i in run_ids]
    for a in some:
        paths += [
            f"/accounts/{a.openid}?zone_id={a.zone_id}",
            f"/api/accounts/{a.openid}?zone_id={a.zone_id}",
        ]
    secrets = [
        *settings.secret_values(),
        SESSION_SECRET,
        PASSWORD,
        *session_keys,
        *ciphertexts,
        *hashes,
        *access_tokens,
    ]
    assert "sim-sandbox-appkey" in secrets and "sim-app-secret" in secrets
    for path in paths:
        page = client.get(path)
        assert page.status_code == 200, path
        body = page.get_data(as_text=True)
        for secret in secrets:
            assert secret not in body, (path, secret[:4])
        assert "session_key_enc" not in body and "password_hash" not in body, path


def test_basic_auth_opens_the_read_only_api_only(app_env: dict[str, str]) -> None:
    import base64

    def basic(name: str, password: str) -> dict[str, str]:
        token = base64.b64encode(f"{name}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    case_id = make_case(app_env["DATABASE_URL"])
    client = make_client(app_env)
    ok = client.get("/api/cases", headers=basic(OPERATOR, PASSWORD))
    assert ok.status_code == 200 and ok.get_json()["total"] == 1
    assert "Set-Cookie" not in ok.headers, "no session for a tool"
    assert "WWW-Authenticate" not in ok.headers
    wrong = client.get("/api/cases", headers=basic(OPERATOR, "not-the-password"))
    unknown = client.get("/api/cases", headers=basic("nobody", "not-the-password"))
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_json() == unknown.get_json() == {"error": "wrong name or password"}
    # Pages and POSTs are not opened by it (a POST still needs the session's CSRF token).
    assert client.get("/cases", headers=basic(OPERATOR, PASSWORD)).status_code == 302
    forged = client.post(
        f"/cases/{case_id}/ack", data={"note": "n"}, headers=basic(OPERATOR, PASSWORD)
    )
    assert forged.status_code == 400 and case_state(app_env["DATABASE_URL"], case_id)[0] == (
        "confirmed"
    )
    for _ in range(4):
        client.get("/api/cases", headers=basic(OPERATOR, "still-wrong-password"))
    throttled = client.get("/api/cases", headers=basic(OPERATOR, PASSWORD))
    assert throttled.status_code == 429, "the login throttle counts these attempts too"


def test_the_throttle_keys_on_the_client_behind_trusted_proxies(app_env: dict[str, str]) -> None:
    env = {**app_env, "RECON_WEB_TRUSTED_PROXIES": "10.0.0.0/8"}
    client = make_client(env)

    def attempt(forwarded: str, peer: str = "10.0.0.1") -> int:
        token = csrf_of(client)
        return int(
            client.post(
                "/login",
                headers={"X-Forwarded-For": forwarded},
                environ_base={"REMOTE_ADDR": peer},
                data={"csrf_token": token, "name": f"n{forwarded}", "password": "wrong-password"},
            ).status_code
        )

    # The client 203.0.113.5 behind two of our proxies; a spoofed first hop does not matter.
    for spoof in ("1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4", "5.5.5.5"):
        assert attempt(f"{spoof}, 203.0.113.5, 10.0.0.9") == 401
    assert attempt("9.9.9.9, 203.0.113.5, 10.0.0.9") == 429, "locked: the same client"
    assert attempt("203.0.113.6, 10.0.0.9") == 401, "another client behind the same proxies"
    # From an untrusted peer the header is ignored: the peer itself is the client.
    assert attempt("203.0.113.7", peer="192.0.2.50") == 401
