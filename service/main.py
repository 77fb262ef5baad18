"""Application factory (placeholder until the full service lands)."""

from __future__ import annotations

from fastapi import FastAPI


def create_app() -> FastAPI:
    app = FastAPI(title="Coupled Mamba sentiment service", version="0.1.0")

    @app.get("/v2/health/live")
    def live() -> dict[str, str]:
        return {"status": "live"}

    return app
