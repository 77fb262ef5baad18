"""docs/DEPLOY.md documents every knob that the deployment has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs/DEPLOY.md").read_text()


def test_every_service_setting_is_documented() -> None:
    from service.settings import ServiceSettings

    missing = [
        f"CMAMBA_{name.upper()}"
        for name in ServiceSettings.model_fields
        if f"`CMAMBA_{name.upper()}`" not in DOC
    ]
    assert not missing, f"add these settings to the table in docs/DEPLOY.md: {missing}"


def test_every_compose_variable_is_documented() -> None:
    text = (REPO / "docker-compose.yml").read_text() + (REPO / "docker/compose.cpu.yml").read_text()
    variables = set(re.findall(r"\$\{(\w+)", text))
    assert variables
    missing = sorted(v for v in variables if f"`{v}`" not in DOC)
    assert not missing, f"compose variables missing from docs/DEPLOY.md: {missing}"


def test_every_build_argument_is_documented() -> None:
    arguments = set(re.findall(r"^ARG (\w+)", (REPO / "Dockerfile").read_text(), re.MULTILINE))
    assert {"TORCH_VERSION", "CUDA_FLAVOR", "MAMBA_SSM_VERSION"} <= arguments
    missing = sorted(a for a in arguments if f"`{a}`" not in DOC)
    assert not missing, f"build arguments missing from docs/DEPLOY.md: {missing}"


def test_every_alert_is_documented(alert_rules: list[dict[str, Any]]) -> None:
    missing = [rule["alert"] for rule in alert_rules if f"`{rule['alert']}`" not in DOC]
    assert not missing, f"alerts missing from docs/DEPLOY.md: {missing}"


def test_documented_base_images_are_the_dockerfiles() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.MULTILINE))
    base = f"{defaults['BASE_REPO']}:{defaults['TORCH_VERSION']}-{defaults['CUDA_FLAVOR']}"
    assert f"`{base}-devel`" in DOC and f"`{base}-runtime`" in DOC
