"""Schemathesis fuzzes the OpenAPI schema against a real server: no 5xx, answers match it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.main import create_app
from service.settings import ServiceSettings

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# The schema comes from the app factory (building an app loads nothing); the cases are sent to
# the real server process of the `media_server` fixture.
schema = schemathesis.openapi.from_dict(
    create_app(ServiceSettings(model_path=Path("unused"))).openapi()
)


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_never_answers_5xx(case: Any, media_server: Any) -> None:
    case.call_and_validate(base_url=media_server.url, checks=CHECKS, timeout=60)
