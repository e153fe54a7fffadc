"""The monitoring files in deploy/: the Prometheus alerting rules pass their promtool
tests, the Grafana dashboard's queries parse, and every hoop metric they name is one
the gateway exports (so a renamed metric cannot leave an alert silently dead)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hoop_addon.control.metrics import REGISTRY

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
ALERTS = DEPLOY / "prometheus" / "hoop-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "hoop-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) is not installed")
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def exported() -> set[str]:
    """The sample names the gateway's registry exposes (`hoop_requests_total`, ...)."""
    return {family.name + suffix for family in REGISTRY.collect() for suffix in _SUFFIXES[family.type]}


def dashboard_queries() -> list[str]:
    """Every panel's PromQL, with the dashboard's variables filled in."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"].replace("$job", "hoop").replace("$instance", ".*") for p in panels for t in p["targets"]]


def alert_queries() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@needs_promtool
def test_alerting_rules_pass_their_promtool_tests() -> None:
    for args in (["check", "rules", ALERTS.name], ["test", "rules", "hoop-alerts.test.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, as a recording rule, must pass `promtool check rules` (PromQL syntax)."""
    rules = [{"record": f"hoop_dashboard:panel_{i}", "expr": q} for i, q in enumerate(dashboard_queries())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", "queries.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_named_is_exported(source: str) -> None:
    queries = alert_queries() if source == "alerts" else dashboard_queries()
    named = {name for q in queries for name in re.findall(r"\bhoop_[a-z_]+\b", q)} - {"hoop_dashboard"}
    assert named, "no hoop metric named"
    assert named <= exported(), f"not exported: {sorted(named - exported())}"
