"""FastAPI dependencies: the app's settings, metrics and core, and the optional bearer check.

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read.

The prediction endpoints take none: they call :func:`authorized_parts` themselves. Resolving
the bearer dependency and the parts cost FastAPI about 0.2 ms of event-loop CPU per request
(measured at concurrency 32 on the features endpoint), work that batching cannot share.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

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
    """Settings, metrics and core, for the prediction endpoints (see :func:`authorized_parts`)."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    core: InferenceCore


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
CoreDep = Annotated[InferenceCore, Depends(get_core)]

_bearer = HTTPBearer(auto_error=False, description="the server's CMAMBA_API_KEY, when it has one")


BEARER_SECURITY: list[dict[str, list[str]]] = [{_bearer.scheme_name: []}]
"""The OpenAPI ``security`` of an operation that calls :func:`authorized_parts` itself."""


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured bearer token (no-op when unset)."""
    _check_token(request.app.state.settings, credentials.credentials if credentials else None)


def authorized_parts(request: Request) -> ServiceParts:
    """The app's settings, metrics and core, once the request has passed the bearer check
    (the same check as :func:`require_api_key`, without FastAPI's dependency resolution)."""
    app_state = request.app.state
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    _check_token(app_state.settings, token if scheme.lower() == "bearer" else None)
    return ServiceParts(app_state.settings, app_state.metrics, app_state.core)


def _check_token(settings: ServiceSettings, given: str | None) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest((given or "").encode(), expected):
        raise UnauthorizedError("a valid bearer token is required (Authorization: Bearer ...)")


ApiKeyDep = Depends(require_api_key)
