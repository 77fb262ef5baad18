"""``/docs`` and ``/openapi.json``, behind the bearer token unless ``public_docs`` is set."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute

from service.api.auth import BearerRoute


def build_router(public: bool) -> APIRouter:
    """The docs routes; with ``public`` they skip the bearer check."""
    router = APIRouter(include_in_schema=False, route_class=APIRoute if public else BearerRoute)

    @router.get("/openapi.json")
    def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=request.app.title)

    return router
