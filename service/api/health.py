"""Liveness and readiness (KServe v2 paths); never behind the bearer token."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.dependencies import CoreDep
from service.api.schemas import HealthResponse, protocol_errors

router = APIRouter(tags=["health"])
# async: answered on the event loop itself, without a hop to the thread pool.


@router.get(
    "/v2/health/live",
    response_model=HealthResponse,
    responses=protocol_errors(503),
    operation_id="server_live",
)
async def live(core: CoreDep) -> HealthResponse:
    """200 while the process can serve or is getting there; 503 once startup failed, or after
    a fatal failure (a CUDA error, a dead model worker or extraction thread): restart it."""
    error = core.liveness_error()
    if error is not None:
        raise error
    return HealthResponse(status="live")


@router.get(
    "/v2/health/ready",
    response_model=HealthResponse,
    responses=protocol_errors(503),
    operation_id="server_ready",
)
async def ready(core: CoreDep) -> HealthResponse:
    """200 once the model is loaded and warmed; 503 before that, while draining, after a fatal
    failure, and once the model queue has stayed full ``CMAMBA_READY_SATURATION_S``."""
    error = core.readiness_error()
    if error is not None:
        raise error
    return HealthResponse(status="ready")
