"""scripts/gpu_wheels.py: what the GPU check host must be sent to serve the app."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_wheels() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_wheels"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(gpu_wheels: ModuleType) -> set[str]:
    return set(gpu_wheels.served_distributions())


def test_a_served_app_imports_its_http_stack_and_model(served: set[str]) -> None:
    # Read from a real features-only server that became ready: the HTTP stack, the body
    # reader and the model's packages are there; media extraction's are not (not loaded).
    assert {"fastapi", "starlette", "uvicorn", "pydantic", "pysimdjson", "torch"} <= served
    assert {"numpy", "safetensors", "prometheus-client"} <= served
    assert not {"av", "librosa", "opencv-python-headless", "faster-whisper"} & served


def test_the_wheels_to_send_are_the_pinned_ones_the_image_lacks(
    gpu_wheels: ModuleType, served: set[str]
) -> None:
    pins = gpu_wheels.pins()
    wanted, unpinned = gpu_wheels.needed(served, pins)
    names = {requirement.split("==")[0] for requirement in wanted}
    assert {"fastapi", "uvicorn", "pydantic", "pydantic-core", "pysimdjson"} <= names
    # The image's own torch and numpy are used, never shadowed.
    assert not {"torch", "numpy", "triton", "coupled-mamba-service"} & names
    for requirement in wanted:
        name, version = requirement.split("==")
        assert pins[name] == version
    # Whatever is left out is something the project does not install (an optional import).
    assert all(name not in pins for name in unpinned)


def test_needed_keeps_what_the_image_has_except_the_always_carried(
    gpu_wheels: ModuleType,
) -> None:
    pins = {"fastapi": "1.0", "numpy": "2.0", "typing-extensions": "4.16.0"}
    wanted, unpinned = gpu_wheels.needed(
        {"fastapi", "numpy", "typing-extensions", "orjson", "coupled-mamba-service"}, pins
    )
    assert wanted == ["fastapi==1.0", "typing-extensions==4.16.0"]
    assert unpinned == ["orjson"]


def test_pins_read_constraints(gpu_wheels: ModuleType, tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "# a comment\nTyping_Extensions==4.16.0\nuvicorn[standard]==0.54.0  # why\n"
        "tomli==2.0; python_version < '3.11'\nloose>=1\n",
        encoding="utf-8",
    )
    assert gpu_wheels.pins(constraints) == {"typing-extensions": "4.16.0", "uvicorn": "0.54.0"}
