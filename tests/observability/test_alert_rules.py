"""The chart's alert rules under promtool: `promtool check rules` accepts
them, and `promtool test rules` (alerts_test.yaml) shows each alert firing
on the series that should trigger it and staying silent on the ones that
should not, with the chart's default thresholds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from chart_rules import write_rules
from helm_chart import requires_helm
from prometheus_server import PROMTOOL, requires_promtool

pytestmark = [requires_helm, requires_promtool]

UNIT_TESTS = Path(__file__).with_name("alerts_test.yaml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    alerts = write_rules(rules)
    done = promtool("check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in done.stdout


def test_every_alert_fires_and_stays_silent_where_it_should(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    alerts = write_rules(rules)
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    # Every alert has a case where it fires and one where it stays silent.
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alerts)
    # promtool compares the alerts firing at each eval_time with exp_alerts
    # exactly, so a series left out of them must stay silent.
    tests["rule_files"] = [str(rules)]
    unit_tests = tmp_path / "alerts_test.yaml"
    unit_tests.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", str(unit_tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
