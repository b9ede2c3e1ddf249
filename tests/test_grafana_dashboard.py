"""deploy/grafana/midas-recon.json: every panel queries something, every query names metrics
the worker exports (worker.metrics), and promtool parses every query."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import metrics as pm

from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "midas-recon.json"

# PromQL words that are not metric names.
_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "delta", "time",
    "histogram_quantile", "absent", "by", "without", "on", "ignoring", "and", "or", "unless",
    "topk", "bottomk", "clamp_min", "clamp_max", "bool", "offset", "vector", "scalar",
}  # fmt: skip
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series() -> set[str]:
    """The series names worker.metrics exports (a counter's _total, a histogram's _bucket…)."""
    import worker.metrics as m

    names: set[str] = set()
    for value in vars(m).values():
        if isinstance(value, pm.MetricWrapperBase):
            for suffix in _SUFFIXES[value._type]:
                names.add(value._name + suffix)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"[^"]*"', "", expr)  # strings (label values, formats)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", text))
    return {w for w in words if w not in _FUNCTIONS and not re.fullmatch(r"\d+[smhdwy]?", w)}


def panels() -> list[dict]:  # type: ignore[type-arg]
    return json.loads(DASHBOARD.read_text())["panels"]


def test_every_panel_queries_exported_metrics() -> None:
    known = exported_series() | {"up"}
    assert len(panels()) >= 10
    for panel in panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']!r}: {target['expr']!r} reads no metric"
            unknown = names - known
            assert not unknown, f"{panel['title']!r} reads {unknown}: not exported"


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    every = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for metric in (
        "recon_run_items_done_total",  # runs
        "recon_snapshots_total",  # coverage
        "recon_open_cases",  # cases by status
        "midas_rate_limit",  # request rate against the limit
        "midas_fleet_pauses_total",  # pauses
        'errcode!="0"',  # errors
    ):
        assert metric in every, metric


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    from tests.test_prometheus_rules import promtool

    rules = [
        {"record": f"midas_recon:panel_{p['id']}_{t['refId']}", "expr": t["expr"]}
        for p in panels()
        for t in p["targets"]
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_helper() -> None:
    expr = 'sum by (le) (rate(a_bucket{x="y"}[5m])) / max(b) or absent(c{job="j"} == 1)'
    assert metric_names(expr) == {"a_bucket", "b", "c"}
