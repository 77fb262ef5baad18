"""FastAPI dependencies: the app's settings, metrics and core (the bearer check is a route
class, :mod:`service.api.auth`).

All are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read. The prediction endpoints take none:
they read :func:`app_parts` themselves: resolving dependencies costs event-loop CPU per
request that batching cannot share (docs/PERFORMANCE.md, "Notes from the code").
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.engine import InferenceCore
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


def app_parts(request: Request) -> tuple[InferenceCore, ServiceSettings]:
    """The app's core and settings, read without dependency resolution."""
    app_state = request.app.state
    return app_state.core, app_state.settings
