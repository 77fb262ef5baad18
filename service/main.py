"""The application factory: ``create_app(settings)`` builds a fresh app with its own state.

Nothing is created at import: settings are read once per app, metrics live on the app's own
registry, and the model is loaded in the lifespan (in the background, so liveness answers
while it loads and readiness says 503 until it is warm).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from service import __version__
from service.api import (
    docs,
    health,
    inference_protocol,
    jobs,
    metrics,
    openapi,
    predict,
    stream,
    timeline,
    webui,
)
from service.api.auth import declare_scheme
from service.api.errors import install_handlers
from service.core.engine import InferenceCore
from service.core.extraction import FeatureExtractor
from service.errors import StartupError
from service.jobs.service import open_jobs, unavailable_reason
from service.metrics import ServiceMetrics
from service.middleware import (
    RequestContextMiddleware,
    RequestMetricsMiddleware,
    SecurityHeadersMiddleware,
)
from service.settings import ServiceSettings
from service.tracing import tracing_from_environment

if TYPE_CHECKING:
    from model import CoupledMambaForSentiment
    from service.core.runner import ForwardHook
    from service.core.streaming import LiveSourceFactory

logger = logging.getLogger(__name__)

UPLOAD_DIR_PREFIX = "cmamba-uploads-"
"""A server's own upload folder is ``<tmp>/cmamba-uploads-<pid>-<random>``."""


def remove_stale_upload_dirs(base: Path) -> list[Path]:
    """Remove the upload folders in ``base`` left by server processes that no longer run (a
    killed process never removes its own); the folders removed."""
    removed = []
    for folder in base.glob(f"{UPLOAD_DIR_PREFIX}*-*"):
        pid_text = folder.name[len(UPLOAD_DIR_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or not folder.is_dir() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d upload folders of stopped processes", len(removed))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServiceSettings = app.state.settings
    core: InferenceCore = app.state.core
    core.check()  # a missing checkpoint stops the server here, with a clear message
    job_service = None  # long recordings (/v1/jobs): the store opens before the model loads
    app.state.jobs_unavailable = unavailable_reason(settings)
    if app.state.jobs_unavailable is None:
        try:
            job_service = await asyncio.to_thread(open_jobs, settings, core, app.state.metrics)
        except StartupError as exc:  # an unreachable database: the server does not start
            logger.error("startup failed: %s", exc)
            raise
    app.state.jobs = job_service
    own_dir = settings.upload_dir is None
    if own_dir:
        remove_stale_upload_dirs(Path(tempfile.gettempdir()))
    upload_dir = (
        Path(tempfile.mkdtemp(prefix=f"{UPLOAD_DIR_PREFIX}{os.getpid()}-"))
        if own_dir
        else settings.upload_dir
    )
    app.state.upload_dir = upload_dir
    starting = asyncio.create_task(asyncio.to_thread(core.start), name="cmamba-startup")
    starting.add_done_callback(lambda task: task.cancelled() or task.exception())
    if job_service is not None:
        job_service.start()  # its workers claim nothing before the core is ready
    try:
        yield
    finally:
        core.begin_drain()
        if job_service is not None:
            job_service.runner.begin_drain()
        await core.wait_idle(settings.drain_timeout_s)
        if job_service is not None:
            await job_service.stop(settings.drain_timeout_s)
        await asyncio.to_thread(core.wait_started)
        await asyncio.to_thread(core.stop)
        if app.state.tracing is not None:
            await asyncio.to_thread(app.state.tracing.shutdown)  # export the last spans
        app.state.body_executor.shutdown(wait=False, cancel_futures=True)
        if own_dir and upload_dir is not None:
            shutil.rmtree(upload_dir, ignore_errors=True)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    model: CoupledMambaForSentiment | None = None,
    extractor: FeatureExtractor | None = None,
    before_forward: ForwardHook | None = None,
    live_source_factory: LiveSourceFactory | None = None,
) -> FastAPI:
    """Build the service.

    Args:
        settings: the settings; read from the environment (``CMAMBA_*``) when None.
        model: a ``CoupledMambaForSentiment`` to serve instead of loading
            ``settings.model_path``.
        extractor: a thread-safe feature extractor to use instead of
            ``preprocessing.Extractor``.
        before_forward: hook called with each padded batch before the model call (fault
            injection in tests).
        live_source_factory: builds each live stream's feature source instead of
            ``preprocessing.live.LiveExtractor``.
    """
    settings = settings if settings is not None else ServiceSettings()
    service_metrics = ServiceMetrics()
    tracing = tracing_from_environment()  # None (nothing imported) unless OTEL_* asks
    core = InferenceCore(
        settings,
        service_metrics,
        model=model,
        extractor=extractor,
        before_forward=before_forward,
        tracer=tracing,
        live_source_factory=live_source_factory,
    )
    app = FastAPI(
        title="Coupled Mamba sentiment service",
        version=__version__,
        description="Multimodal sentiment analysis (text, audio, visual) with a Coupled Mamba "
        "fusion model.",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.core = core
    app.state.upload_dir = settings.upload_dir
    # Large request bodies are parsed here, one at a time, off the event loop.
    app.state.body_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmamba-body")
    install_handlers(app, settings.retry_after_s)
    app.include_router(predict.router)  # first: the hot path is matched before the others
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(timeline.router)
    app.include_router(jobs.router)
    app.include_router(stream.router)
    inference_protocol.install(app)  # /v2 models and inference; /v2 errors in its shape
    app.include_router(webui.router)
    app.include_router(docs.build_router(public=settings.public_docs))
    declare_scheme(app)
    openapi.document_headers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=service_metrics)
    app.add_middleware(RequestContextMiddleware)
    app.state.tracing = tracing
    if tracing is not None:  # the request's span and trace ids around everything but headers
        from service.otel import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracing=tracing)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: every answer gets the headers
    return app
