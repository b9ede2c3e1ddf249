"""deploy/prometheus/rules.yml: valid (`promtool check rules`) and behaving as its unit tests
say (`promtool test rules`: nightly missing, run failed, workers absent, 45011 storm...).

promtool comes with Debian's `prometheus` package (.ci/run installs it when missing); without
it these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.conftest import ROOT

RULES_DIR = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed: apt-get install prometheus (see .ci/run)"
    return path


def run(*args: str, cwd: Path = RULES_DIR) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rules_are_valid() -> None:
    out = run("check", "rules", "rules.yml")
    assert "SUCCESS" in out


def test_rules_unit_tests_pass() -> None:
    out = run("test", "rules", "rules_test.yml")
    assert "SUCCESS" in out


def test_the_unit_tests_cover_the_alerts_the_issue_names() -> None:
    tests = yaml.safe_load((RULES_DIR / "rules_test.yml").read_text())
    fired = {
        case["alertname"]
        for group in tests["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    wanted = {
        "MidasReconNightlyMissing",
        "MidasReconRunFailed",
        "MidasReconWorkersAbsent",
        "MidasQuotaPauseStorm",
    }
    assert wanted <= fired


def test_every_rule_reads_exported_metrics_and_names_a_runbook() -> None:
    from tests.test_grafana_dashboard import exported_series, metric_names

    rules = yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"][0]["rules"]
    known = exported_series() | {"up"}
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", operations, flags=re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)"></a>', operations))
    for rule in rules:
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule['alert']} reads {unknown}, which the worker does not export"
        runbook = rule["annotations"]["runbook"]
        assert runbook.split("#")[1] in anchors, f"{rule['alert']}: no section {runbook}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")
