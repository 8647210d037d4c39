"""``etc/prometheus/edgeauth-alerts.yml``: valid rules, unit-tested expressions, real metric names.

``promtool check rules`` validates the file and ``promtool test rules`` runs the unit tests in
``edgeauth-alerts.test.yml`` (each alert fires on its failure; a healthy fleet fires none). Both are
skipped only when promtool is missing (``.ci/run`` installs Debian's ``prometheus``, which ships
it). Every ``edgeauth_*`` metric the rules use must be one that the master or edge exports.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeauth.edge.metrics import EdgeMetrics
from edgeauth.master.metrics import MasterMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "prometheus" / "edgeauth-alerts.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "edgeauth-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    run = promtool("check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 10 rules found" in run.stdout


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    run = promtool("test", "rules", str(RULE_TESTS))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_rules_cover_the_failures_of_issue_7() -> None:
    """Stopped applying, lagging, absent from /fleet, master log not writable."""
    text = RULES.read_text()
    alerts = set(re.findall(r"- alert: (\w+)", text))
    assert {
        "EdgeauthEdgeNotReady",
        "EdgeauthEdgeStoppedApplying",
        "EdgeauthEdgeLagging",
        "EdgeauthEdgeDisconnected",
        "EdgeauthEdgeMissingFromFleet",
        "EdgeauthEdgeDown",
        "EdgeauthMasterLogNotWritable",
    } <= alerts
    assert 'edgeauth_edge_lag_seconds{job="edgeauth-edge"} > 30' in text
    assert 'edgeauth_edge_ready{job="edgeauth-edge"} == 0' in text


def test_rules_use_only_exported_metrics() -> None:
    exported = MasterMetrics().render().decode() + EdgeMetrics().render().decode()
    names = set(re.findall(r"^# TYPE (\S+) ", exported, re.MULTILINE))
    used = set(re.findall(r"\b(edgeauth_[a-z0-9_]+)", RULES.read_text()))
    assert used, "the rules use edgeauth metrics"
    assert used <= names, used - names
