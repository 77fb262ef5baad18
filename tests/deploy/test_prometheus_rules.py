"""Prometheus configuration and alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "docker/prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))

# What the deployment promises to alert on, by alert name.
REQUIRED_ALERTS = {
    "CmambaDown": "service down",
    "CmambaHighErrorRatio": "error ratio",
    "CmambaHighP99Latency": "p99 latency",
    "CmambaQueueSaturated": "queue saturation",
    "GpuMemoryNearFull": "GPU memory near full",
    "CmambaTargetMissing": "no cmamba target at all",
    "CmambaFatalError": "fatal errors (the instance restarts)",
    "GpuXidError": "GPU XID errors",
}


def promtool(tool: Callable[[str], str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_is_valid_and_loads_every_rule_file(tool: Callable[[str], str]) -> None:
    result = promtool(tool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output
    assert RULE_FILES


def test_rules_are_valid(tool: Callable[[str], str], alert_rules: list[dict[str, Any]]) -> None:
    result = promtool(tool, "check", "rules", *map(str, RULE_FILES))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    counted = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", output))
    assert counted == len(alert_rules)


def test_rule_unit_tests_pass(tool: Callable[[str], str]) -> None:
    assert RULE_TESTS
    result = promtool(tool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_rule_unit_tests_can_fail(tool: Callable[[str], str], tmp_path: Path) -> None:
    # A rule file whose error-ratio threshold is off makes the same unit tests fail.
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for rules in RULE_FILES:
        text = rules.read_text().replace("> 0.05", "> 0.5")
        (tmp_path / "rules" / rules.name).write_text(text)
    for test in RULE_TESTS:
        (tmp_path / "tests" / test.name).write_text(test.read_text())
    result = promtool(tool, "test", "rules", *map(str, (tmp_path / "tests").glob("*.yml")))
    assert result.returncode != 0 and "CmambaHighErrorRatio" in result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_summary(
    alert_rules: list[dict[str, Any]],
) -> None:
    alerts = {rule["alert"]: rule for rule in alert_rules if "alert" in rule}
    missing = set(REQUIRED_ALERTS) - set(alerts)
    assert not missing, f"no alert for {[REQUIRED_ALERTS[m] for m in missing]}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["runbook_url"].startswith("docs/RUNBOOK.md#"), name


def test_every_alert_is_unit_tested_firing(alert_rules: list[dict[str, Any]]) -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules if "alert" in rule}
    assert alerts <= fired, f"alerts never shown firing: {sorted(alerts - fired)}"
