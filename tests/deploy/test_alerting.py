"""Alerts that reach someone: the runbook behind every alert, the shipped Alertmanager
configuration, and a live chain (service, Prometheus, Alertmanager, webhook) that pages when
the service dies.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "docs/RUNBOOK.md"
RULES = REPO / "docker/prometheus/rules/cmamba-alerts.yml"
ALERTMANAGER_CONFIG = REPO / "docker/alertmanager/alertmanager.yml"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces
    to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}


def test_github_anchor() -> None:
    assert github_anchor("CmambaDown") == "cmambadown"
    assert github_anchor("Runbook: what to do when an alert fires") == (
        "runbook-what-to-do-when-an-alert-fires"
    )


def test_every_alert_links_to_an_existing_runbook_section(
    alert_rules: list[dict[str, Any]],
) -> None:
    anchors = runbook_anchors()
    alerts = [rule for rule in alert_rules if "alert" in rule]
    assert len(alerts) >= 10
    for rule in alerts:
        url = rule["annotations"].get("runbook_url")
        assert url, f"{rule['alert']} has no runbook_url"
        path, _, anchor = url.partition("#")
        assert path == "docs/RUNBOOK.md", url
        assert (REPO / path).is_file()
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/RUNBOOK.md"
        assert anchor == rule["alert"].lower(), f"{rule['alert']} links to another alert's section"


def test_every_runbook_alert_section_says_what_it_means_and_what_to_do(
    alert_rules: list[dict[str, Any]],
) -> None:
    text = RUNBOOK.read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.S))
    alerts = {rule["alert"] for rule in alert_rules if "alert" in rule}
    assert set(sections) == alerts, "one runbook section per alert, no more"
    for name, body in sections.items():
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in body, f"RUNBOOK.md {name}: no {part}"


def test_required_new_alerts(alert_rules: list[dict[str, Any]]) -> None:
    rules = {rule["alert"]: rule for rule in alert_rules if "alert" in rule}
    assert rules["CmambaTargetMissing"]["expr"].strip() == 'absent(up{job="cmamba"})'
    assert "DCGM_FI_DEV_XID_ERRORS" in rules["GpuXidError"]["expr"]
    assert "cmamba_fatal_errors_total" in rules["CmambaFatalError"]["expr"]
    # The queue alert is relative to the configured size, not a constant depth.
    assert "cmamba_queue_capacity" in rules["CmambaQueueSaturated"]["expr"]


def amtool_check(tool: Callable[[str], str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("amtool"), "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_shipped_alertmanager_config_is_valid(tool: Callable[[str], str]) -> None:
    result = amtool_check(tool, ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == config["route"]["receiver"]]
    assert receiver["webhook_configs"][0]["url"].startswith("http")


def test_amtool_rejects_a_broken_config(tool: Callable[[str], str], tmp_path: Path) -> None:
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(ALERTMANAGER_CONFIG.read_text().replace("receiver: oncall", "receiver: x"))
    result = amtool_check(tool, broken)
    assert result.returncode != 0


# --- the live chain -----------------------------------------------------------------------------

SCRAPE_S = 1.0
EVALUATION_S = 1.0
DOWN_FOR_S = 3.0
GROUP_WAIT_S = 0.0
# Process start-up, the notifier's send and the webhook's POST, on a busy 2-core machine.
SCHEDULING_SLACK_S = 3.0


class WebhookReceiver:
    """An HTTP server on loopback that keeps every JSON document POSTed to it."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                received.put({"path": self.path, "at": time.monotonic(), **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, accept: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first document ``accept`` takes, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no matching notification within {timeout:g} s")
            try:
                document = self.received.get(timeout=left)
            except queue.Empty:
                continue
            if accept(document):
                return document


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


def alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """The shipped configuration, its receiver's URL set to ``webhook_url`` and its grouping
    waits shortened (test speed only)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    route = config["route"]
    route.update(group_wait=f"{GROUP_WAIT_S:g}s", group_interval="1s", repeat_interval="1m")
    (receiver,) = [r for r in config["receivers"] if r["name"] == route["receiver"]]
    receiver["webhook_configs"][0]["url"] = webhook_url
    return config


def rules_with_short_down_for(work: Path) -> tuple[Path, float]:
    """The shipped rules with CmambaDown's ``for:`` shortened; returns the file and the
    shipped ``for:`` in seconds."""
    rules = yaml.safe_load(RULES.read_text())
    (down,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "CmambaDown"]
    shipped = down["for"]
    down["for"] = f"{DOWN_FOR_S:g}s"
    path = work / "rules" / RULES.name
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    unit = {"s": 1, "m": 60, "h": 3600}
    return path, float(shipped[:-1]) * unit[shipped[-1]]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_dead_service_pages_through_alertmanager(
    tiny_checkpoint: Path,
    tmp_path: Path,
    webhook: WebhookReceiver,
    launchers: Any,
) -> None:
    rules_path, shipped_for = rules_with_short_down_for(tmp_path)
    assert shipped_for == 60  # what the shipped rule waits; the test waits DOWN_FOR_S
    (tmp_path / "am").mkdir()
    (tmp_path / "prom").mkdir()
    service = launchers.service(tiny_checkpoint, tmp_path / "serve.log")
    alertmanager = prometheus = None
    try:
        alertmanager = launchers.alertmanager(tmp_path / "am", alertmanager_config(webhook.url))
        am_address = urllib.parse.urlsplit(alertmanager.url).netloc

        def config_for(listen: str) -> dict[str, Any]:
            config = launchers.prometheus_config(
                service.url, [], listen, alertmanagers=(am_address,)
            )
            config["global"].update(
                scrape_interval=f"{SCRAPE_S:g}s", evaluation_interval=f"{EVALUATION_S:g}s"
            )
            config["rule_files"] = [str(rules_path)]
            return config

        prometheus, _ = launchers.prometheus(tmp_path / "prom", config_for)
        server = launchers.prometheus_server(prometheus, "")
        live = urllib.parse.urlsplit(service.url).netloc
        server.wait_for(f'up{{job="cmamba", instance="{live}"}} == 1', bool, "a first scrape")
        # Prometheus knows its Alertmanager before the service dies.
        server.poll(
            lambda: server.api("/api/v1/alertmanagers")["activeAlertmanagers"],
            "Prometheus to discover Alertmanager",
        )
        assert webhook.received.empty()  # nothing pages while the service is up

        service.popen.kill()
        service.popen.wait(10)
        killed_at = time.monotonic()
        budget = DOWN_FOR_S + SCRAPE_S + EVALUATION_S + GROUP_WAIT_S + SCHEDULING_SLACK_S

        def down_firing(document: dict[str, Any]) -> bool:
            return document["status"] == "firing" and any(
                a["labels"]["alertname"] == "CmambaDown" for a in document["alerts"]
            )

        document = webhook.wait_for(down_firing, timeout=budget + 30)
        elapsed = document["at"] - killed_at
        print(f"CmambaDown reached the webhook {elapsed:.2f} s after the kill (budget {budget:g})")
        assert elapsed <= budget, f"{elapsed:.2f} s > for {DOWN_FOR_S:g} s + intervals"
        assert elapsed >= DOWN_FOR_S  # not before the rule's for: has passed

        assert document["path"] == "/alerts"
        assert document["version"] == "4" and document["receiver"] == "oncall"
        (alert,) = [a for a in document["alerts"] if a["labels"]["alertname"] == "CmambaDown"]
        assert alert["status"] == "firing"
        assert alert["labels"]["instance"] == live
        assert alert["labels"]["job"] == "cmamba"
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"] == f"cmamba service {live} is down"
        runbook = alert["annotations"]["runbook_url"]
        assert runbook == "docs/RUNBOOK.md#cmambadown"
        assert runbook.partition("#")[2] in runbook_anchors()
    finally:
        for process in (prometheus, alertmanager, service):
            if process is not None:
                process.stop()
