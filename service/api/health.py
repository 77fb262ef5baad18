"""Liveness and readiness (KServe v2 paths); never behind the bearer token."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.dependencies import CoreDep
from service.api.schemas import HealthResponse, protocol_errors
from service.core.lifecycle import CoreState
from service.errors import DrainingError, NotReadyError

router = APIRouter(tags=["health"])
# async: answered on the event loop itself, without a hop to the thread pool.


@router.get(
    "/v2/health/live",
    response_model=HealthResponse,
    responses=protocol_errors(503),
    operation_id="server_live",
)
async def live(core: CoreDep) -> HealthResponse:
    """200 while the process can serve or is getting there; 503 once startup failed or the
    model worker died (restart the process)."""
    if core.state is CoreState.FAILED:
        raise NotReadyError(f"startup failed: {core.startup_error}")
    if not core.worker_alive:
        raise NotReadyError("the model worker stopped")
    return HealthResponse(status="live")


@router.get(
    "/v2/health/ready",
    response_model=HealthResponse,
    responses=protocol_errors(503),
    operation_id="server_ready",
)
async def ready(core: CoreDep) -> HealthResponse:
    """200 once the model is loaded and warmed; 503 before that and while draining."""
    if core.ready:
        return HealthResponse(status="ready")
    if core.state in (CoreState.DRAINING, CoreState.STOPPED):
        raise DrainingError("the server is shutting down")
    if core.state is CoreState.FAILED:
        raise NotReadyError(f"startup failed: {core.startup_error}")
    raise NotReadyError("the model is loading")
