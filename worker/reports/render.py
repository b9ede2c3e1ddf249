"""The statement as an aligned table, CSV, JSON or one self-contained HTML file.

Unknown figures print as "n/a" (table, HTML), an empty cell (CSV) or null (JSON), never as 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json

from worker.reports.statement import (
    FIGURE_FIELDS,
    RunInfo,
    Statement,
    Trend,
    ZoneFigures,
    as_dict,
)
from worker.text import spreadsheet_cell
from worker.vocabulary import RunStatus

FORMATS = ("table", "csv", "json", "html")

# Line items in the order a reader meets them: (section title, [(field, label)]).
SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Coverage of the run",
        (
            ("accounts", "accounts in the run"),
            ("ok", "observed (ok)"),
            ("unobservable", "unobservable (no live session)"),
            ("error", "error (no answer)"),
        ),
    ),
    (
        "Midas totals over the observed accounts",
        (
            ("balance", "balance"),
            ("save_sum", "save_sum (historical top-ups)"),
            ("cost_sum", "cost_sum (historical spends)"),
            ("present_sum", "present_sum (historical gifts)"),
        ),
    ),
    (
        "Coin statement: accounts observed in both runs",
        (
            ("compared", "accounts compared"),
            ("opening_balance", "opening balance (previous run)"),
            ("top_ups", "+ top-ups (ledger save)"),
            ("gifts", "+ gifts (ledger present)"),
            ("spends", "- spends (ledger cost)"),
            ("cancels", "+ cancels (ledger cancel)"),
            ("expected_closing", "= expected closing"),
            ("closing_balance", "closing balance (this run)"),
            ("residual", "residual (closing - expected)"),
        ),
    ),
    (
        "Midas counters against the ledger: same accounts, same window",
        (
            ("midas_save_sum_change", "change in save_sum"),
            ("unexplained_save_sum", "unexplained (change - top-ups)"),
            ("midas_cost_sum_change", "change in cost_sum"),
            ("unexplained_cost_sum", "unexplained (change - spends + cancels)"),
            ("midas_present_sum_change", "change in present_sum"),
            ("unexplained_present_sum", "unexplained (change - gifts)"),
        ),
    ),
    (
        "Ledger of the business day: all accounts",
        (
            ("day_save", "save (top-ups)"),
            ("day_present", "present (gifts)"),
            ("day_cost", "cost (spends)"),
            ("day_cancel", "cancel (reversed spends)"),
            ("day_net", "net (save + present - cost + cancel)"),
        ),
    ),
    (
        "Mismatch cases during the business day",
        (
            ("cases_opened", "opened"),
            ("cases_confirmed", "confirmed"),
            ("cases_cleared", "cleared (settled)"),
            ("cases_resolved", "resolved"),
            ("cases_acknowledged", "acknowledged"),
            ("cases_open_at_end", "open at the end of the day"),
        ),
    ),
)

CSV_PREFIX = (
    "business_date",
    "timezone",
    "generated_at",
    "partial",
    "run_id",
    "run_status",
    "previous_run_id",
    "scope",
)


def render(statement: Statement, fmt: str, trend: Trend | None = None) -> str:
    """The statement in `fmt` (one of FORMATS); HTML needs the trend for its charts."""
    if fmt == "table":
        return render_table(statement)
    if fmt == "csv":
        return render_csv(statement)
    if fmt == "json":
        return json.dumps(as_dict(statement), indent=2, ensure_ascii=False) + "\n"
    if fmt == "html":
        if trend is None:
            raise ValueError("the HTML statement needs a trend")
        return render_html(statement, trend)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def coins(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def columns(statement: Statement) -> list[tuple[str, ZoneFigures]]:
    """Zone columns, then the total when there is more than one zone."""
    cols = [(f"zone {z.zone_id}", z) for z in statement.zones]
    if len(cols) != 1:
        cols.append(("total", statement.total))
    return cols


def run_line(run: RunInfo) -> str:
    span = ""
    if run.started_at and run.finished_at:
        span = f", {_stamp(run.started_at)} to {_stamp(run.finished_at)}"
    return (
        f"nightly run #{run.id} of {run.business_date} ({run.status}, trigger {run.trigger}, "
        f"API {run.api_version}{span})"
    )


def header_lines(statement: Statement) -> list[str]:
    s = statement
    lines = [
        f"Daily coin statement, business date {s.business_date} "
        f"({s.timezone}, {_stamp(s.day_start)} to {_stamp(s.day_end)})",
        f"From {run_line(s.run)}",
    ]
    if s.previous_run is None:
        lines.append(
            f"Opening side: no nightly run for {s.business_date - dt.timedelta(days=1)}, "
            "so the movement is not known"
        )
    else:
        lines.append(f"Opening side: {run_line(s.previous_run)}")
    if s.zone_filter is not None:
        lines.append(f"Zone {s.zone_filter} only")
    if s.run.status != RunStatus.COMPLETE:
        lines.append(
            f"The run is {s.run.status}: {s.run.error} accounts got no answer (error) and are "
            "left out of the totals"
            + (f", {s.run.deferred} active accounts were deferred" if s.run.deferred else "")
        )
    lines.extend(coverage_lines(s.run))
    lines.append(generated_line(s))
    lines.append("All figures are integer coins; n/a means not known (never a zero).")
    return lines


def coverage_lines(run: RunInfo) -> list[str]:
    """The night's coverage, each figure with the window it covers; none for older runs."""
    c = run.coverage or {}
    if "active" not in c:
        return []
    share = c["observed_share"]
    ages = c["oldest_age_s"]
    moved = c["moved"]
    deferred = ", ".join(f"{reason} {n}" for reason, n in sorted(c.get("deferred", {}).items()))
    lines = [
        "Coverage when the run closed"
        + (f" ({_stamp(run.finished_at)})" if run.finished_at else "")
        + f": {run.coverage_verdict}; of {c['active']} "
        "active accounts, observed ok in the last 1 / 7 / 30 days: "
        + " / ".join(_share(share[k]) for k in ("1d", "7d", "30d"))
        + f"; {c['never_observed']} never observed ok",
        "Age of the last ok observation over active accounts, p50 / p99 / max: "
        + " / ".join(_age(ages[k]) for k in ("p50", "p99", "max")),
        f"Accounts with ledger movement: {moved['observed']} observed ok tonight, "
        f"{moved['not_observed']} not; night capacity {run.capacity}, deferred "
        f"{run.deferred}" + (f" ({deferred})" if deferred else ""),
    ]
    if c.get("note"):
        lines.append(f"Coverage: {c['note']}")
    return lines


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds / 3600:.1f} h"


def generated_line(statement: Statement) -> str:
    stamp = _stamp(statement.generated_at)
    if statement.partial:
        return (
            f"PARTIAL: generated {stamp}, before the business day is over; the day's ledger "
            "and case figures cover it up to then"
        )
    return f"Generated {stamp}, after the business day ended"


def render_table(statement: Statement) -> str:
    cols = columns(statement)
    label_width = max(len(label) for _, items in SECTIONS for _, label in items) + 2
    widths = [
        max(len(title), *(len(coins(getattr(z, f))) for f in FIGURE_FIELDS)) for title, z in cols
    ]
    out = [*header_lines(statement), ""]
    out.append(
        " " * label_width + "  ".join(t.rjust(w) for (t, _), w in zip(cols, widths, strict=True))
    )
    for title, items in SECTIONS:
        out.append(title)
        for name, label in items:
            cells = [
                coins(getattr(z, name)).rjust(w) for (_, z), w in zip(cols, widths, strict=True)
            ]
            out.append(("  " + label).ljust(label_width) + "  ".join(cells))
    return "\n".join(out) + "\n"


def render_csv(statement: Statement) -> str:
    """One row per zone and one total row; empty cell = not known."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180, what spreadsheets expect
    writer.writerow([*CSV_PREFIX, "zone_id", *FIGURE_FIELDS])
    s = statement
    prefix = [
        s.business_date.isoformat(),
        s.timezone,
        s.generated_at.isoformat(timespec="seconds"),
        "true" if s.partial else "false",
        s.run.id,
        s.run.status,
        "" if s.previous_run is None else s.previous_run.id,
    ]
    for scope, z in [*(("zone", z) for z in s.zones), ("total", s.total)]:
        values = ["" if (v := getattr(z, f)) is None else v for f in FIGURE_FIELDS]
        writer.writerow([*prefix, scope, spreadsheet_cell(z.zone_id or ""), *values])
    return buf.getvalue()


def render_html(statement: Statement, trend: Trend) -> str:
    """One file, no external assets: inline CSS, charts as base64 SVG data URIs."""
    from worker.reports.charts import open_cases_svg_b64, totals_svg_b64

    e = html.escape
    s = statement
    cols = columns(s)
    head = "".join(f'<th scope="col">{e(t)}</th>' for t, _ in cols)
    body: list[str] = []
    for title, items in SECTIONS:
        body.append(f'<tr class="section"><th colspan="{len(cols) + 1}">{e(title)}</th></tr>')
        for name, label in items:
            values = [getattr(z, name) for _, z in cols]
            cells = "".join(f'<td class="{_css_class(name, v)}">{e(coins(v))}</td>' for v in values)
            body.append(f'<tr><th scope="row">{e(label)}</th>{cells}</tr>')
    shown = [line for line in header_lines(s)[1:] if not (s.partial and line == generated_line(s))]
    header = "".join(f"<p>{e(line)}</p>" for line in shown)  # partial: the banner says it
    title = f"Daily coin statement {s.business_date}"
    if s.partial:
        title += " (partial)"
    partial = f'<p class="partial">{e(generated_line(s))}</p>' if s.partial else ""
    first, last = trend.dates[0], trend.dates[-1]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
td {{ text-align: right; font-variant-numeric: tabular-nums; }}
th[scope=row] {{ text-align: left; font-weight: normal; }}
tr.section th {{ text-align: left; background: #f3f3f3; padding-top: 0.6em; }}
td.unknown {{ color: #888; }}
td.attention {{ color: #b00020; font-weight: bold; }}
p.partial {{ background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 1em; }}
figure {{ margin: 1em 0; }}
figcaption, .note {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
{partial}
<p>{e(s.timezone)}, {e(_stamp(s.day_start))} to {e(_stamp(s.day_end))}.</p>
{header}
<table>
<thead><tr><th></th>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<h2>Last {len(trend.dates)} days</h2>
<figure id="trend-totals">
<img alt="Midas totals of each complete nightly run, {e(str(first))} to {e(str(last))}"
 src="data:image/svg+xml;base64,{totals_svg_b64(trend)}">
<figcaption>Sums over the accounts observed in each date's complete nightly run; gaps are dates
without one.</figcaption>
</figure>
<figure id="trend-open-cases">
<img alt="Mismatch cases open at the end of each day, {e(str(first))} to {e(str(last))}"
 src="data:image/svg+xml;base64,{open_cases_svg_b64(trend)}">
<figcaption>Cases open (suspected, confirmed or acknowledged) at local midnight.</figcaption>
</figure>
<p class="note">Generated {e(_stamp(s.generated_at))} by midas-recon. The columns are explained
in docs/finance.md.</p>
</body>
</html>
"""


def _stamp(value: dt.datetime) -> str:
    return value.isoformat(sep=" ", timespec="seconds")


def _css_class(name: str, value: int | None) -> str:
    if value is None:
        return "unknown"
    if name.startswith(("residual", "unexplained")) and value != 0:
        return "attention"
    return "figure"
