"""docker-compose.yml and the CPU override, validated by Docker Compose itself (v2 and v1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
CPU = "docker/compose.cpu.yml"

# Variables a user's shell might carry that would change the rendered file.
_COMPOSE_VARS = ("COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME")


# The stack refuses to render without a Grafana admin password; the tests pass this one
# unless they test that refusal.
PASSWORD = "test-grafana-password"
# Every service, whatever its profile.
PROFILES = ("dcgm", "alerts")


def compose(
    binary: str, *args: str, env: dict[str, str] | None = None, password: str | None = PASSWORD
):
    clean = {k: v for k, v in os.environ.items() if k not in _COMPOSE_VARS}
    clean = {k: v for k, v in clean.items() if not k.startswith(("CMAMBA_", "GRAFANA_"))}
    clean = {k: v for k, v in clean.items() if not k.endswith("_MEM_LIMIT")}
    clean = {k: v for k, v in clean.items() if not k.startswith("LOG_MAX_")}
    if password is not None:
        clean["GRAFANA_ADMIN_PASSWORD"] = password
    return subprocess.run(
        [binary, *args],
        cwd=REPO,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def v2(tool: Callable[[str], str]) -> str:
    binary = tool("compose-v2")
    version = compose(binary, "version", "--short").stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 2, version
    return binary


def rendered(v2: str, *files: str, profiles: tuple[str, ...] = (), env=None) -> dict[str, Any]:
    args = [arg for f in files for arg in ("-f", f)]
    args += [arg for p in profiles for arg in ("--profile", p)]
    result = compose(v2, *args, "config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_base_file_renders_with_gpu_reservation(v2: str) -> None:
    config = rendered(v2, BASE)
    assert set(config["services"]) == {"cmamba", "prometheus", "grafana"}
    service = config["services"]["cmamba"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["build"]["context"] == str(REPO)
    assert [(p["target"], p["published"]) for p in service["ports"]] == [(8000, "8000")]
    # The drain (CMAMBA_DRAIN_TIMEOUT_S) fits in the stop grace period.
    grace = service["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > float(
        service["environment"]["CMAMBA_DRAIN_TIMEOUT_S"]
    )


def test_dcgm_exporter_only_with_its_profile(v2: str) -> None:
    config = rendered(v2, BASE, profiles=("dcgm",))
    exporter = config["services"]["dcgm-exporter"]
    assert exporter["profiles"] == ["dcgm"]
    assert exporter["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    collectors = exporter["environment"]["DCGM_EXPORTER_COLLECTORS"]
    mounts = {m["target"]: Path(m["source"]) for m in exporter["volumes"]}
    assert mounts[collectors].is_file()


def test_alertmanager_only_with_its_profile_and_prometheus_finds_it(v2: str) -> None:
    assert "alertmanager" not in rendered(v2, BASE)["services"]
    config = rendered(v2, BASE, profiles=("alerts",))
    alertmanager = config["services"]["alertmanager"]
    assert alertmanager["profiles"] == ["alerts"]
    mounts = {
        m["target"]: Path(m["source"]) for m in alertmanager["volumes"] if m["type"] == "bind"
    }
    config_flag = next(c for c in alertmanager["command"] if c.startswith("--config.file="))
    config_file = Path(config_flag.partition("=")[2])
    assert (mounts[str(config_file.parent)] / config_file.name).is_file()
    assert [p["target"] for p in alertmanager["ports"]] == [9093]
    assert alertmanager["ports"][0]["host_ip"] == "127.0.0.1"
    # Prometheus sends its alerts to that service name and port.
    shipped = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    ((sd,),) = [am["dns_sd_configs"] for am in shipped["alerting"]["alertmanagers"]]
    assert sd["names"] == ["alertmanager"] and sd["port"] == 9093


def test_cpu_override_removes_the_gpu_and_selects_the_cpu(v2: str) -> None:
    service = rendered(v2, BASE, CPU)["services"]["cmamba"]
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert "devices" not in reservations
    assert service["environment"]["CMAMBA_DEVICE"] == "cpu"
    # The rest of the service is the base file's.
    assert service["image"] == "cmamba-service:latest" and service["ports"]


def test_settings_come_from_the_environment(v2: str) -> None:
    env = {"CMAMBA_HOST_PORT": "18080", "CMAMBA_MAX_BATCH_SIZE": "32", "CMAMBA_API_KEY": "k"}
    service = rendered(v2, BASE, env=env)["services"]["cmamba"]
    assert service["ports"][0]["published"] == "18080"
    assert service["environment"]["CMAMBA_MAX_BATCH_SIZE"] == "32"
    assert service["environment"]["CMAMBA_API_KEY"] == "k"


def test_the_service_logs_json_lines(v2: str) -> None:
    environment = rendered(v2, BASE)["services"]["cmamba"]["environment"]
    assert environment["CMAMBA_LOG_FORMAT"] == "json"
    assert environment["CMAMBA_LOG_LEVEL"] == "info"


def test_every_service_setting_passed_by_compose_exists() -> None:
    from service.settings import ServiceSettings

    declared = yaml.safe_load((REPO / BASE).read_text())["services"]["cmamba"]["environment"]
    known = {f"CMAMBA_{name.upper()}" for name in ServiceSettings.model_fields}
    assert set(declared) <= known, set(declared) - known


def test_monitoring_mounts_exist_and_match_the_configs(v2: str) -> None:
    config = rendered(v2, BASE)
    for name in ("prometheus", "grafana"):
        for mount in config["services"][name]["volumes"]:
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), mount
                assert Path(mount["source"]).is_relative_to(REPO / "docker")
    prometheus = config["services"]["prometheus"]
    mounts = {m["target"]: Path(m["source"]) for m in prometheus["volumes"] if m["type"] == "bind"}
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    config_file = Path(config_flag.partition("=")[2])
    assert (mounts[str(config_file.parent)] / config_file.name).is_file()

    grafana = config["services"]["grafana"]
    mounts = {m["target"]: Path(m["source"]) for m in grafana["volumes"] if m["type"] == "bind"}
    provider = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "dashboards/cmamba.yml").read_text()
    )["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert list(dashboards.glob("*.json"))
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    datasource = yaml.safe_load(
        (mounts["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text()
    )["datasources"][0]
    # Grafana reaches Prometheus by its compose service name and container port.
    assert datasource["url"] == "http://prometheus:9090"
    assert any(p["target"] == 9090 for p in prometheus["ports"])


def test_compose_v1_accepts_the_base_file(tool: Callable[[str], str]) -> None:
    v1 = tool("compose-v1")
    assert compose(v1, "version", "--short").stdout.startswith("1.")
    for profile in ((), ("--profile", "dcgm"), ("--profile", "alerts")):
        result = compose(v1, "-f", BASE, *profile, "config", "--quiet")
        assert result.returncode == 0, result.stderr
    services = compose(v1, "-f", BASE, "--profile", "dcgm", "config", "--services").stdout.split()
    # Compose v1 lists the services of every profile.
    expected = ["alertmanager", "cmamba", "dcgm-exporter", "grafana", "prometheus"]
    assert sorted(services) == expected


def test_compose_rejects_a_broken_file(v2: str, tmp_path: Path) -> None:
    # The validation above is real: a GPU reservation with a misspelt key is refused.
    broken = (REPO / BASE).read_text().replace("capabilities: [gpu]", "capability: [gpu]", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = compose(v2, "-f", str(tmp_path / "docker-compose.yml"), "config", "--quiet")
    assert result.returncode != 0 and "capability" in result.stderr


# --- hardening ---------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [None, ""])
def test_compose_refuses_to_start_grafana_without_an_admin_password(
    v2: str, tool: Callable[[str], str], password: str | None
) -> None:
    env = {} if password is None else {"GRAFANA_ADMIN_PASSWORD": password}
    for binary in (v2, tool("compose-v1")):
        for command in (("config", "--quiet"), ("up", "--no-start", "grafana")):
            result = compose(binary, "-f", BASE, *command, env=env, password=None)
            assert result.returncode != 0, (binary, command)
            assert "GRAFANA_ADMIN_PASSWORD" in result.stderr, result.stderr


def test_the_grafana_admin_password_is_the_one_given(v2: str) -> None:
    config = rendered(v2, BASE, env={"GRAFANA_ADMIN_PASSWORD": "s3cret!"})
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret!"


@pytest.mark.parametrize("files", [(BASE,), (BASE, CPU)], ids=["gpu", "cpu"])
def test_every_service_rotates_its_logs_and_has_a_memory_limit(
    v2: str, files: tuple[str, ...]
) -> None:
    services = rendered(v2, *files, profiles=PROFILES)["services"]
    assert set(services) == {"cmamba", "prometheus", "grafana", "dcgm-exporter", "alertmanager"}
    for name, service in services.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", name
        options = logging["options"]
        assert int(options["max-file"]) >= 2, name
        assert re.fullmatch(r"\d+[kmg]", options["max-size"]), (name, options)
        limit = int(service.get("mem_limit", 0))
        assert 128 * 2**20 <= limit <= 64 * 2**30, (name, limit)
    assert int(services["cmamba"]["mem_limit"]) == 8 * 2**30


def test_limits_and_rotation_come_from_the_environment(v2: str) -> None:
    env = {"CMAMBA_MEM_LIMIT": "12g", "PROMETHEUS_MEM_LIMIT": "3g", "LOG_MAX_SIZE": "20m"}
    services = rendered(v2, BASE, CPU, env=env)["services"]
    assert int(services["cmamba"]["mem_limit"]) == 12 * 2**30
    assert int(services["prometheus"]["mem_limit"]) == 3 * 2**30
    assert services["grafana"]["logging"]["options"]["max-size"] == "20m"


def test_compose_v1_renders_the_same_limits_and_rotation(tool: Callable[[str], str]) -> None:
    v1 = tool("compose-v1")
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    result = compose(v1, "-f", BASE, *profiles, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert len(services) == 5
    for name, service in services.items():
        assert service["logging"]["driver"] == "json-file", name
        assert {"max-size", "max-file"} <= set(service["logging"]["options"]), name
        assert service["mem_limit"], name
