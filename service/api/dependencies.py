"""FastAPI dependencies: the app's settings, metrics and core, and the optional bearer check.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.engine import InferenceCore
from service.errors import UnauthorizedError
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings


async def get_settings(request: Request) -> ServiceSettings:
    """The settings the app was built with."""
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> ServiceMetrics:
    """The app's metrics (its own registry)."""
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_core(request: Request) -> InferenceCore:
    """The app's inference core."""
    core: InferenceCore = request.app.state.core
    return core


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
CoreDep = Annotated[InferenceCore, Depends(get_core)]

_bearer = HTTPBearer(auto_error=False, description="the server's CMAMBA_API_KEY, when it has one")


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured bearer token (no-op when unset)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise UnauthorizedError("a valid bearer token is required (Authorization: Bearer ...)")


ApiKeyDep = Depends(require_api_key)
