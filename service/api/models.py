"""Model metadata and model card (KServe v2 path)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.auth import BearerRoute
from service.api.dependencies import CoreDep
from service.api.schemas import ModelMetadata, error_responses
from service.errors import ModelNotFoundError, echo

router = APIRouter(tags=["models"], route_class=BearerRoute)


@router.get(
    "/v2/models/{name}", response_model=ModelMetadata, responses=error_responses(401, 404, 503)
)
def model_metadata(name: str, core: CoreDep) -> dict[str, Any]:
    """The served model's inputs, outputs, architecture, checkpoint facts and model card."""
    metadata = core.metadata()
    if name != metadata["name"]:
        raise ModelNotFoundError(
            f"no model {echo(name)} here; this server serves {metadata['name']!r}"
        )
    return metadata
