"""FastAPI dependencies: the app's settings, metrics and core, and the optional bearer check.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ServiceParts:
    """Settings, metrics and core in one dependency, for the prediction endpoints.

    Each dependency costs FastAPI a resolution step per request (about 0.1 ms here); the
    features endpoint runs hundreds of times a second, so it takes its three parts at once.
    """

    settings: ServiceSettings
    metrics: ServiceMetrics
    core: InferenceCore


async def get_parts(request: Request) -> ServiceParts:
    """The app's settings, metrics and core."""
    app_state = request.app.state
    return ServiceParts(app_state.settings, app_state.metrics, app_state.core)


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
CoreDep = Annotated[InferenceCore, Depends(get_core)]
PartsDep = Annotated[ServiceParts, Depends(get_parts)]

_bearer = HTTPBearer(auto_error=False, description="the server's CMAMBA_API_KEY, when it has one")


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured bearer token (no-op when unset)."""
    settings: ServiceSettings = request.app.state.settings
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise UnauthorizedError("a valid bearer token is required (Authorization: Bearer ...)")


ApiKeyDep = Depends(require_api_key)
