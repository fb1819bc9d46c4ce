"""The chart's Grafana dashboard and PrometheusRule as rendered: off by
default, the rule only where the Prometheus Operator's API is served, the
dashboard exactly the file in dashboards/ and labelled for the sidecar, and
the values' thresholds in the alerts. What the queries and alerts return is
tested against a real Prometheus in tests/observability."""

from __future__ import annotations

import json
import re

from helm_chart import CHART, MONITORING, find, one, render, requires_helm

pytestmark = requires_helm

DASHBOARD = CHART / "dashboards" / "elasticfleet.json"
ALERTS = {
    "ElasticFleetBudgetNearlyExhausted",
    "ElasticFleetPlanChurn",
    "ElasticFleetQualityFloorBlocksPlans",
    "ElasticFleetWorkerUnreachable",
    "ElasticFleetQueueGrowing",
    "ElasticFleetTimeToFirstTokenHigh",
}


def test_the_dashboard_is_off_by_default_and_labelled_for_the_sidecar() -> None:
    assert not find(render(), "ConfigMap", "ef-elasticfleet-dashboard")
    documents = render(
        "metrics.grafanaDashboard.enabled=true",
        "metrics.grafanaDashboard.namespace=monitoring",
        "metrics.grafanaDashboard.annotations.grafana_folder=LLM",
    )
    config_map = one(documents, "ConfigMap", "ef-elasticfleet-dashboard")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(config_map["data"]["elasticfleet.json"]) == json.loads(DASHBOARD.read_text())


def test_every_dashboard_query_uses_only_variables_it_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= defined, (panel["title"], used - defined)


def test_the_rule_renders_only_where_its_api_is_with_the_values_thresholds() -> None:
    assert not find(render("metrics.prometheusRule.enabled=true"), "PrometheusRule")
    assert not find(render(api_versions=[MONITORING]), "PrometheusRule")
    documents = render(
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.labels.release=prometheus",
        "metrics.prometheusRule.ttftP99Seconds=3",
        "metrics.prometheusRule.planChangesPerHour=30",
        api_versions=[MONITORING],
    )
    rule = one(documents, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == ALERTS
    assert alerts["ElasticFleetTimeToFirstTokenHigh"]["expr"].endswith("> 3")
    assert alerts["ElasticFleetPlanChurn"]["expr"].endswith("> 30")
    for alert in alerts.values():
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert "docs/operations.md" in alert["annotations"]["description"]
