"""The optional bearer token (``CMAMBA_API_KEY``), checked first on every route that needs it.

Routers whose routes need the token are built with ``route_class=BearerRoute``; health, metrics
and the web page's files are not. A bearer route checks the ``Authorization`` header before
FastAPI resolves anything else of the request (path and query parameters, dependencies, the
body), so a request without the token gets 401 whatever else is wrong with it, and the check
costs no dependency resolution (event-loop CPU that batching cannot share; docs/PERFORMANCE.md,
"Notes from the code").

Each bearer route declares the scheme in its OpenAPI operation (``security``), and
:func:`declare_scheme` adds the scheme to the app's schema components.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param

from service.errors import UnauthorizedError
from service.settings import ServiceSettings

SCHEME_NAME = "HTTPBearer"
SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "the server's CMAMBA_API_KEY, when it has one",
}


def check_bearer(request: Request) -> None:
    """Refuse the request unless it carries the configured bearer token (no-op when unset).

    The header is read as FastAPI's ``HTTPBearer`` reads it: ``Bearer <token>``, the scheme in
    any case; another scheme or an empty token counts as none.

    Raises:
        UnauthorizedError: a token is configured and the request lacks it.
    """
    settings: ServiceSettings = request.app.state.settings
    if settings.api_key is None:
        return
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    given = token if scheme.lower() == "bearer" else ""
    check_token(settings, given, "a valid bearer token is required (Authorization: Bearer ...)")


def check_token(settings: ServiceSettings, given: str | None, refusal: str) -> None:
    """Refuse ``given`` unless it is the configured token (no-op when none is configured).

    Raises:
        UnauthorizedError: a token is configured and ``given`` is not it (``refusal`` says how
            to give it).
    """
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest((given or "").encode(), expected):
        raise UnauthorizedError(refusal)


class BearerRoute(APIRoute):
    """An API route that checks the bearer token before anything else of the request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.openapi_extra = {"security": [{SCHEME_NAME: []}], **(self.openapi_extra or {})}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            check_bearer(request)
            return await handler(request)

        return checked


def declare_scheme(app: FastAPI) -> None:
    """Add the bearer scheme to the components of ``app``'s OpenAPI schema (which its bearer
    routes' operations refer to)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # built once, then cached by FastAPI on the app
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME_NAME] = SCHEME
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
