"""The console's routes: HTML pages and, under /api/, the same data as JSON.

Views parse the request, call the service functions the command line uses, and render; no
SQL here. Every route except /login needs an operator (worker/web/app.py's guard).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy.orm import Session

from worker import business_calendar as clock
from worker.business_calendar import FutureDate
from worker.db import console as queries
from worker.db.models import Run
from worker.db.runs import get_run, recent_runs
from worker.recon import cases as lifecycle
from worker.recon.console import (
    MAX_PAGE_SIZE,
    STATUS_CHOICES,
    account_history,
    find_cases,
    opened_between,
    statuses_of,
)
from worker.recon.rules import checks_from_settings
from worker.recon.runs import read_progress
from worker.reports import render as statement_render
from worker.reports.statement import StatementUnavailable, build_statement, build_trend
from worker.vocabulary import OPEN_CASE_STATUSES, RUN_KINDS, RunKind, RunStatus
from worker.web import charts, present
from worker.web.actions import ActionRefused
from worker.web.context import client_address, console, csrf_token
from worker.web.filters import local_time
from worker.web.operators import authenticate

auth = Blueprint("auth", __name__)
pages = Blueprint("pages", __name__)
api = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_PER_PAGE = 50
FLASH_IDS = 10  # case ids or refusals named in one bulk action's message
RUN_KINDS_SHOWN = (*RUN_KINDS, "all")
LOGIN_REFUSED = "Wrong name or password."
LOGIN_THROTTLED = "Too many login attempts; wait a few minutes and try again."


class BadRequest(Exception):
    """A filter or form value that cannot be used; the message says which."""


@pages.errorhandler(BadRequest)
@api.errorhandler(BadRequest)
def _bad_request(exc: BadRequest) -> tuple[Any, int]:
    if request.path.startswith("/api/"):
        return jsonify(error=str(exc)), 400
    return render_template("error.html", message=str(exc)), 400


# -- login --------------------------------------------------------------------------------------


@auth.route("/login", methods=["GET", "POST"])
def login() -> Any:
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if g.operator is not None:
            return redirect(next_url)
        return render_template("login.html", next=next_url, message=None)
    c = console()
    name = request.form.get("name", "").strip()[:100]
    password = request.form.get("password", "")
    keys = (f"ip:{client_address()}", f"name:{name.lower()}")
    if c.throttle.blocked(*keys):
        return render_template("login.html", next=next_url, message=LOGIN_THROTTLED), 429
    with c.db() as db:
        who = authenticate(db, name, password, now=clock.utcnow())
    if who is None:
        c.throttle.failed(*keys)
        return render_template("login.html", next=next_url, message=LOGIN_REFUSED), 401
    session.clear()  # a new session on login: nothing from before it (fixation) survives
    session.permanent = True
    session["operator"] = who
    csrf_token()
    return redirect(next_url)


@auth.route("/logout", methods=["POST"])
def logout() -> Any:
    session.clear()
    return redirect(url_for("auth.login"))


def _safe_next(value: str | None) -> str:
    # Only a path on this site: "//host" or "https://…" would send the operator elsewhere.
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return url_for("pages.cases")


# -- cases --------------------------------------------------------------------------------------


@pages.route("/")
def index() -> Any:
    return redirect(url_for("pages.cases"))


@pages.route("/cases")
def cases() -> Any:
    query, page, per_page, form = _case_filters()
    with console().db() as db:
        result = find_cases(db, query, page=page, per_page=per_page)
    return render_template(
        "cases.html",
        result=result,
        form=form,
        statuses=STATUS_CHOICES,
        checks=[c.name for c in checks_from_settings(console().settings)],
        page_url=lambda p: url_for("pages.cases", **{**form, "page": p}),
    )


@api.route("/cases")
def api_cases() -> Any:
    query, page, per_page, _ = _case_filters()
    with console().db() as db:
        result = find_cases(db, query, page=page, per_page=per_page)
        return jsonify(present.case_page(result))


@pages.route("/cases/ack", methods=["POST"])
def bulk_ack() -> Any:
    ids = _ids(request.form.getlist("case_id"))
    note = request.form.get("note", "")
    if not ids:
        flash("Select at least one case.", "error")
    else:
        done, refused = _act_each(lifecycle.acknowledge, ids, note)
        # Flashes travel in the session cookie (4 KB at most): a page of 500 cases is summed up.
        if done:
            listed = f": {', '.join(map(str, done))}" if len(done) <= FLASH_IDS else ""
            flash(f"Acknowledged {len(done)} case(s){listed}.", "ok")
        for message in refused[:FLASH_IDS]:
            flash(message, "error")
        if len(refused) > FLASH_IDS:
            flash(f"… and {len(refused) - FLASH_IDS} more refused.", "error")
    return redirect(_safe_next(request.form.get("next")))


@pages.route("/cases/<int:case_id>")
def case(case_id: int) -> Any:
    with console().db() as db:
        c = queries.get_case(db, case_id)
        if c is None:
            abort(404)
        events = queries.events_of_cases(db, [case_id])[case_id]
    return render_template("case.html", case=c, events=events, open_statuses=OPEN_CASE_STATUSES)


@api.route("/cases/<int:case_id>")
def api_case(case_id: int) -> Any:
    with console().db() as db:
        c = queries.get_case(db, case_id)
        if c is None:
            return jsonify(error=f"no mismatch case {case_id}"), 404
        return jsonify(present.case(c, queries.events_of_cases(db, [case_id])[case_id]))


@pages.route("/cases/<int:case_id>/<any(ack, resolve):action>", methods=["POST"])
def case_action(case_id: int, action: str) -> Any:
    act = lifecycle.acknowledge if action == "ack" else lifecycle.resolve
    done, refused = _act_each(act, [case_id], request.form.get("note", ""))
    if done:
        verb = "acknowledged" if action == "ack" else "resolved"
        flash(f"Case {case_id} {verb}.", "ok")
    for message in refused:
        flash(message, "error")
    return redirect(url_for("pages.case", case_id=case_id))


def _act_each(act: Any, ids: list[int], note: str) -> tuple[list[int], list[str]]:
    """The action on each case in its own transaction, recorded as this operator's event."""
    done: list[int] = []
    refused: list[str] = []
    for case_id in ids:
        try:
            with console().db() as db:
                act(db, case_id, note, g.operator)
            done.append(case_id)
        except lifecycle.CaseError as exc:
            refused.append(str(exc))
    return done, refused


def _case_filters() -> tuple[queries.CaseQuery, int, int, dict[str, str]]:
    """The filters of /cases and /api/cases from the query string, and the form's values."""
    args = request.args
    form = {
        k: args.get(k, "").strip()
        for k in ("status", "check", "zone_id", "openid", "opened_from", "opened_to", "min_delta")
    }
    form["status"] = form["status"] or "open"
    form["sort"] = args.get("sort", "delta")
    form["per_page"] = args.get("per_page", str(DEFAULT_PER_PAGE))
    status = form["status"]
    if status not in STATUS_CHOICES:
        raise BadRequest(f"status must be one of {', '.join(STATUS_CHOICES)}")
    if form["sort"] not in queries.CASE_SORTS:
        raise BadRequest(f"sort must be one of {', '.join(queries.CASE_SORTS)}")
    start, end = opened_between(
        _date(form["opened_from"], "opened_from"),
        _date(form["opened_to"], "opened_to"),
        console().settings.calendar,
    )
    min_delta = _int(form["min_delta"], "min_delta", 0, 2**62) if form["min_delta"] else None
    query = queries.CaseQuery(
        statuses=statuses_of(status),
        check=form["check"] or None,
        zone_id=form["zone_id"] or None,
        openid=form["openid"] or None,
        opened_from=start,
        opened_before=end,
        min_abs_delta=min_delta,
        sort=form["sort"],
    )
    page = _int(args.get("page", "1"), "page", 1, 10**9)
    per_page = _int(form["per_page"], "per_page", 1, MAX_PAGE_SIZE)
    return query, page, per_page, {k: v for k, v in form.items() if v}


# -- accounts -----------------------------------------------------------------------------------


@pages.route("/accounts/<path:openid>")
def account(openid: str) -> Any:
    zone_id = request.args.get("zone_id", "1")
    recheck_id = request.args.get("recheck", type=int)
    c = console()
    checks = checks_from_settings(c.settings)
    with c.db() as db:
        history = account_history(db, openid, zone_id, checks)
        recheck = _recheck_state(db, recheck_id) if recheck_id else None
    shown = request.args.get("fetches", 20, type=int)
    return render_template(
        "account.html",
        h=history,
        charts=charts.check_charts(history.fetches, history.check_names),
        timeline=list(reversed(history.fetches))[: max(1, shown)],
        recheck=recheck,
        shown=shown,
    )


@api.route("/accounts/<path:openid>")
def api_account(openid: str) -> Any:
    zone_id = request.args.get("zone_id", "1")
    c = console()
    with c.db() as db:
        history = account_history(db, openid, zone_id, checks_from_settings(c.settings))
        return jsonify(present.history(history))


@pages.route("/accounts/<path:openid>/recheck", methods=["POST"])
def recheck(openid: str) -> Any:
    zone_id = request.form.get("zone_id", "1")
    try:
        run_id = console().actions.recheck(openid, zone_id)
    except ActionRefused as exc:
        flash(str(exc), "error")
        return redirect(url_for("pages.account", openid=openid, zone_id=zone_id))
    return redirect(url_for("pages.account", openid=openid, zone_id=zone_id, recheck=run_id))


def _recheck_state(db: Session, run_id: int) -> dict[str, Any] | None:
    run = get_run(db, run_id)
    if run is None or run.kind != RunKind.RECHECK:
        return None
    snap = queries.snapshot_of_run(db, run_id)
    return {"run": run, "snapshot": snap}


# -- runs ---------------------------------------------------------------------------------------


@pages.route("/runs")
def runs() -> Any:
    kind, rows = _recent_runs()
    return render_template("runs.html", runs=rows, kind=kind, kinds=RUN_KINDS_SHOWN)


@api.route("/runs")
def api_runs() -> Any:
    return jsonify([present.run(r) for r in _recent_runs()[1]])


def _recent_runs() -> tuple[str, list[Run]]:
    """?kind= (nightly by default, or all) and ?limit=, newest first."""
    kind = request.args.get("kind", RunKind.NIGHTLY.value)
    if kind not in RUN_KINDS_SHOWN:
        raise BadRequest(f"kind must be one of {', '.join(RUN_KINDS_SHOWN)}")
    limit = _int(request.args.get("limit", "50"), "limit", 1, 1000)
    with console().db() as db:
        return kind, recent_runs(db, limit=limit, kind=None if kind == "all" else kind)


@pages.route("/runs/<int:run_id>")
def run(run_id: int) -> Any:
    with console().db() as db:
        r, progress = _run_and_progress(db, run_id)
        opened = queries.cases_opened_by(db, run_id, limit=200)
    return render_template("run.html", run=r, progress=progress, opened=opened)


@api.route("/runs/<int:run_id>")
def api_run(run_id: int) -> Any:
    with console().db() as db:
        r, progress = _run_and_progress(db, run_id)
        out = present.run(r, progress)
        if r.kind == RunKind.RECHECK:
            snap = queries.snapshot_of_run(db, run_id)
            out["answer"] = None if snap is None else present.snapshot(snap)
        return jsonify(out)


def _run_and_progress(db: Session, run_id: int) -> tuple[Run, present.Progress]:
    r = get_run(db, run_id)
    if r is None:
        abort(404)
    return r, present.Progress.of(r, read_progress(db, run_id), clock.utcnow())


# -- statements ---------------------------------------------------------------------------------


@pages.route("/statements")
def statements() -> Any:
    with console().db() as db:
        last = queries.last_finished_nightly(db)
    if last is None:
        return render_template("error.html", message="No complete nightly run yet."), 404
    return redirect(url_for("pages.statement", day=last.business_date.isoformat()))


@pages.route("/statements/<day>")
def statement(day: str) -> Any:
    try:
        s = _statement(day)
    except (StatementUnavailable, FutureDate) as exc:
        return render_template("error.html", message=str(exc)), 404
    # The header lines (report daily's own) say the date, zone and runs; anything else the
    # statement carries (when it was generated, whether the day is partial…) is listed as is.
    in_header = {"zones", "total", "run", "previous_run", "business_date", "timezone"}
    in_header |= {"day_start", "day_end", "zone_filter"}
    tz = console().settings.tz
    extra = {
        f.name: local_time(v, tz) if isinstance(v, dt.datetime) else v
        for f in dataclasses.fields(s)
        if f.name not in in_header and not isinstance(v := getattr(s, f.name), list | dict)
    }
    return render_template(
        "statement.html",
        s=s,
        header=statement_render.header_lines(s),
        extra=extra,
        sections=statement_render.SECTIONS,
        cols=statement_render.columns(s),
        day=day,
    )


@pages.route("/statements/<day>/download/<any(csv, html, json):fmt>")
def statement_download(day: str, fmt: str) -> Any:
    c = console()
    try:
        with c.db() as db:
            s = build_statement(db, _date_required(day), calendar=c.settings.calendar)
            trend = (
                build_trend(db, s.business_date, calendar=c.settings.calendar)
                if fmt == "html"
                else None
            )
    except (StatementUnavailable, FutureDate) as exc:
        return render_template("error.html", message=str(exc)), 404
    body = statement_render.render(s, fmt, trend)
    kinds = {"csv": "text/csv", "html": "text/html", "json": "application/json"}
    return Response(
        body,
        mimetype=kinds[fmt],
        headers={"Content-Disposition": f'attachment; filename="statement-{day}.{fmt}"'},
    )


@api.route("/statements/<day>")
def api_statement(day: str) -> Any:
    from worker.reports.statement import as_dict

    try:
        s = _statement(day)
    except (StatementUnavailable, FutureDate) as exc:
        return jsonify(error=str(exc)), 404
    return jsonify(present.jsonable(as_dict(s)))


def _statement(day: str) -> Any:
    c = console()
    with c.db() as db:
        return build_statement(db, _date_required(day), calendar=c.settings.calendar)


# -- health -------------------------------------------------------------------------------------


@pages.route("/health")
def health() -> Any:
    data = _health()
    return render_template("health.html", h=data)


@api.route("/health")
def api_health() -> Any:
    return jsonify(present.jsonable(_health()))


def _health() -> dict[str, Any]:
    c = console()
    out = c.actions.probe()
    try:
        with c.db() as db:
            last = queries.last_finished_nightly(db)
            running = recent_runs(db, limit=5, kind=None)
            out["last_complete_nightly"] = None if last is None else present.run(last)
            out["running_runs"] = [present.run(r) for r in running if r.status == RunStatus.RUNNING]
    except Exception as exc:  # noqa: BLE001  (the database probe above already says why)
        out["last_complete_nightly"] = None
        out["running_runs"] = []
        out["runs_error"] = type(exc).__name__
    paused = out.get("limiter_paused_until")
    out["limiter_paused"] = paused is not None
    if paused is not None:
        out["limiter_paused_until"] = dt.datetime.fromtimestamp(paused, dt.UTC)
    return out


# -- parsing ------------------------------------------------------------------------------------


def _int(value: str, name: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None
    if not lo <= number <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return number


def _date(value: str, name: str) -> dt.date | None:
    if not value:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD)") from None


def _date_required(value: str) -> dt.date:
    day = _date(value, "the date")
    assert day is not None
    return day


def _ids(values: list[str]) -> list[int]:
    return list(dict.fromkeys(_int(v, "case_id", 1, 2**63 - 1) for v in values))
