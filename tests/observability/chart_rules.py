"""The chart's alert rules and dashboard as Prometheus and the tests read
them: the PrometheusRule rendered by the real helm (tests/chart/helm_chart),
its spec written as a Prometheus rule file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from helm_chart import CHART, MONITORING, one, render

DASHBOARD = CHART / "dashboards" / "elasticfleet.json"


def write_rules(path: Path, *settings: str) -> dict[str, str]:
    """Render the chart's PrometheusRule with `settings` (helm --set), write
    its groups to `path` as a rule file; each alert's expression by name."""
    documents = render("metrics.prometheusRule.enabled=true", *settings, api_versions=[MONITORING])
    spec = one(documents, "PrometheusRule")["spec"]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {rule["alert"]: rule["expr"] for group in spec["groups"] for rule in group["rules"]}


def dashboard_queries() -> dict[str, str]:
    """Every panel's queries, by panel title and legend."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} / {target['legendFormat']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
