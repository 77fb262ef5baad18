"""scripts/system_deps.sh: what `make test` and `.ci/run` install before the suite runs.

The script runs with a PATH holding only fakes (``id``, ``apt-get``, the tools) and with
SYSTEM_DEPS_ROOT pointing its fixed paths into a temporary folder: nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "system_deps.sh"
BASH = shutil.which("bash") or "/bin/bash"
ALL = [
    "prometheus",
    "prometheus-alertmanager",
    "docker-compose",
    "haproxy",
    "chromium",
    "postgresql",
]


def _executable(path: Path, body: str = "exit 0") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


class FakeMachine:
    """A PATH of fakes and a root folder; ``apt-get`` records its arguments."""

    def __init__(self, base: Path, *, uid: int) -> None:
        self.bin = base / "bin"
        self.root = base / "root"
        self.apt_log = base / "apt.log"
        self.root.mkdir(parents=True)
        _executable(self.bin / "id", f'[ "$1" = -u ] && echo {uid}')
        _executable(self.bin / "apt-get", f'echo "$*" >> "{self.apt_log}"')

    def has(self, *packages: str) -> None:
        for package in packages:
            if package == "prometheus":
                _executable(self.bin / "prometheus")
                _executable(self.bin / "promtool")
            elif package == "prometheus-alertmanager":
                _executable(self.root / "usr/bin/prometheus-alertmanager")
                _executable(self.root / "usr/bin/amtool")
            elif package == "docker-compose":
                _executable(self.root / "usr/bin/docker-compose")
            elif package == "haproxy":
                _executable(self.root / "usr/sbin/haproxy")
            elif package == "chromium":
                _executable(self.root / "usr/bin/chromium")
            elif package == "postgresql":
                for tool in ("pg_ctl", "initdb"):
                    _executable(self.root / f"usr/lib/postgresql/15/bin/{tool}")

    def apt_calls(self) -> list[str]:
        return self.apt_log.read_text().splitlines() if self.apt_log.exists() else []

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BASH, str(SCRIPT), *args],
            env={"PATH": str(self.bin), "SYSTEM_DEPS_ROOT": str(self.root), **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


def test_without_root_it_stops_at_once_with_the_apt_get_line(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=1000)
    started = time.monotonic()
    result = machine.run()
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    line = "apt-get install -y --no-install-recommends " + " ".join(ALL)
    assert f"    {line}\n" in result.stderr
    assert machine.apt_calls() == []


def test_as_root_it_installs_only_what_is_missing(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=0)
    machine.has("prometheus", "haproxy")
    result = machine.run()
    assert result.returncode == 0, result.stderr
    assert machine.apt_calls() == [
        "update -qq",
        "install -y -qq --no-install-recommends"
        " prometheus-alertmanager docker-compose chromium postgresql",
    ]


def test_prometheus_counts_as_missing_without_promtool(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=0)
    machine.has(*ALL)
    (machine.bin / "promtool").unlink()
    assert machine.run("--list").stdout.split() == ["prometheus"]


def test_alertmanager_counts_as_missing_without_amtool(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=0)
    machine.has(*ALL)
    (machine.root / "usr/bin/amtool").unlink()
    assert machine.run("--list").stdout.split() == ["prometheus-alertmanager"]


def test_postgresql_is_found_under_any_major_version(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=0)
    machine.has(*(p for p in ALL if p != "postgresql"))
    assert machine.run("--list").stdout.split() == ["postgresql"]
    # The client alone (libpq, psql) is not the server.
    _executable(machine.root / "usr/lib/postgresql/17/bin/psql")
    _executable(machine.root / "usr/lib/postgresql/17/bin/pg_ctl")
    assert machine.run("--list").stdout.split() == ["postgresql"]
    _executable(machine.root / "usr/lib/postgresql/17/bin/initdb")
    assert machine.run("--list").stdout == ""


@pytest.mark.parametrize("uid", [0, 1000])
def test_nothing_missing_is_silent_and_installs_nothing(tmp_path: Path, uid: int) -> None:
    machine = FakeMachine(tmp_path, uid=uid)
    machine.has(*ALL)
    result = machine.run()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert machine.apt_calls() == []


def test_dry_run_prints_the_commands_and_changes_nothing(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=0)
    machine.has("prometheus", "prometheus-alertmanager", "docker-compose")
    result = machine.run("--dry-run")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "apt-get update",
        "apt-get install -y --no-install-recommends haproxy chromium postgresql",
    ]
    assert machine.apt_calls() == []


def test_the_check_can_be_turned_off(tmp_path: Path) -> None:
    machine = FakeMachine(tmp_path, uid=1000)
    result = machine.run(CMAMBA_SYSTEM_DEPS="skip")
    assert result.returncode == 0
    assert machine.apt_calls() == []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_checks_the_system_packages_before_installing_or_testing() -> None:
    # -n prints the recipes without running them (the recursive make also only prints).
    result = subprocess.run(
        ["make", "-n", "test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Run as a top-level make even when the suite itself runs under `make test`.
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("make[")]
    check = next(i for i, line in enumerate(lines) if "scripts/system_deps.sh" in line)
    tests = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert check < tests
    assert check == 0


def test_ci_runs_make_test_and_nothing_of_its_own() -> None:
    commands = [
        line.strip()
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "exec make test"
    assert not any("apt-get" in line for line in commands)


def _make_dry_run(target: str) -> list[str]:
    result = subprocess.run(
        ["make", "-n", "-B", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "pip install" in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_what_serving_needs_and_make_test_the_dev_extra() -> None:
    (run_install,) = [line for line in _make_dry_run("run") if "-e " in line]
    assert run_install.rstrip().endswith("-e .")  # no extras: not Ray, Playwright, schemathesis
    test_installs = [line for line in _make_dry_run("test") if "-e " in line]
    assert test_installs and all("'.[dev]'" in line for line in test_installs)
