"""One version string (package, API, CLI) and a LICENSE that matches pyproject."""

from __future__ import annotations

import tomllib
from pathlib import Path

import service
from service.main import create_app
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_takes_its_version_from_the_package() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert read_configuration(REPO / "pyproject.toml")["project"]["version"] == service.__version__


def test_the_api_reports_the_package_version(tmp_path: Path) -> None:
    app = create_app(ServiceSettings(model_path=tmp_path, enable_media=False))
    assert app.openapi()["info"]["version"] == service.__version__


def test_license_file_matches_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text
