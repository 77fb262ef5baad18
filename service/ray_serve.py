"""The same FastAPI app on Ray Serve: one app per replica, replicas across GPUs and nodes.

Each replica builds its own app with :func:`service.main.create_app` (so each keeps its own
micro-batcher, model worker and metrics registry) behind ``@serve.ingress``. Ray is imported
only when a deployment is built; nothing runs at import.

Every answer carries ``x-cmamba-replica`` (the replica's full Ray id, also its actor name),
and ``GET /metrics`` adds a constant ``replica`` label to every sample of the replica's own
registry: the replica's short Ray id, the value Ray's own ``ray_serve_replica_*`` metrics
carry in their ``replica`` label. A scrape through
Ray's proxy reaches one replica only, so each replica also serves that labelled registry on a
port of its own and lists it for Prometheus's file-based discovery
(:class:`ReplicaMetricsEndpoint`): one scrape job then covers every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from service.settings import ServiceSettings

REPLICA_HEADER = "x-cmamba-replica"
DEFAULT_APP_NAME = "cmamba"
DEFAULT_DEPLOYMENT_NAME = "CmambaService"
# Where replicas list their metrics endpoints for Prometheus (file_sd_configs), beside Ray's
# own discovery file (/tmp/ray/prom_metrics_service_discovery.json).
DEFAULT_METRICS_SD_DIR = "/tmp/ray/cmamba_metrics"
HEALTH_PROBE_TIMEOUT_S = 20.0
"""Longest wait for the device probe of a replica health check (below Ray's own 30 s limit)."""

logger = logging.getLogger(__name__)


class ReplicaLabelled(Collector):
    """Every metric of ``source`` with a constant ``replica`` label added to each sample."""

    def __init__(self, source: CollectorRegistry, replica: str) -> None:
        self.source = source
        self.replica = replica

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {**sample.labels, "replica": self.replica}
                labelled.samples.append(sample._replace(labels=labels))
            yield labelled


def replica_labelled_registry(source: CollectorRegistry, replica: str) -> CollectorRegistry:
    """A registry that exports ``source`` with ``replica="<replica>"`` on every sample."""
    labelled = CollectorRegistry(auto_describe=False)
    labelled.register(ReplicaLabelled(source, replica))
    return labelled


class ReplicaMetricsEndpoint:
    """A replica's labelled registry on its own port, listed for Prometheus file discovery.

    ``start`` serves ``/metrics`` on ``bind_host:port`` (0: a free port) and writes
    ``<sd_dir>/<host>_<pid>_<tag>.json`` (``_`` is never part of a host name), a file_sd
    target group naming ``advertise:port``; ``stop`` removes both. A replica killed without a
    chance to clean up leaves its file behind: every replica that starts removes the files
    of dead processes on its host.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        tag: str,
        *,
        sd_dir: str | Path | None,
        port: int = 0,
        bind_host: str = "0.0.0.0",
        advertise: str | None = None,
    ) -> None:
        self.registry = registry
        self.sd_dir = Path(sd_dir) if sd_dir else None
        self.port = port
        self.bind_host = bind_host
        self.advertise = advertise or socket.gethostname()
        self.hostname = socket.gethostname()
        safe_tag = "".join(c if c.isalnum() else "_" for c in tag)
        self.sd_file = (
            self.sd_dir / f"{self.hostname}_{os.getpid()}_{safe_tag}.json" if self.sd_dir else None
        )
        self._server: Any = None

    @property
    def target(self) -> str:
        return f"{self.advertise}:{self.port}"

    def start(self) -> None:
        server, _ = start_http_server(self.port, addr=self.bind_host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        if self.sd_dir is None or self.sd_file is None:
            return
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self.remove_dead_entries()
        group = [{"targets": [self.target], "labels": {"service": "cmamba"}}]
        partial = self.sd_file.with_suffix(".tmp")  # Prometheus reads *.json only
        partial.write_text(json.dumps(group))
        partial.replace(self.sd_file)  # atomic: Prometheus never reads half a file

    def remove_dead_entries(self) -> None:
        """Delete the discovery files of processes on this host that no longer run."""
        if self.sd_dir is None:
            return
        for path in self.sd_dir.glob(f"{self.hostname}_*.json"):
            pid_text = path.name[len(self.hostname) + 1 :].split("_", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def stop(self) -> None:
        if self.sd_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.sd_file.unlink()
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReplicaMiddleware:
    """Tag each answer with the replica id; serve ``/metrics`` with the ``replica`` label."""

    def __init__(self, app: ASGIApp, replica: str, labelled: CollectorRegistry) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode("latin-1"), replica.encode("latin-1"))
        self.labelled = labelled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics" and scope["method"] == "GET":
            body = generate_latest(self.labelled)
            headers = [(b"content-type", CONTENT_TYPE_LATEST.encode("latin-1")), self.header]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_replica)


def _wait_warm(
    original: Callable[[Any], AbstractAsyncContextManager[Any]],
    endpoint: ReplicaMetricsEndpoint | None,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """Wrap the app's lifespan so startup returns only once the model is loaded and warm.

    Ray Serve counts a replica as started when the ASGI lifespan startup returns, so no
    request is routed to a replica that would answer 503 ``not_ready``. The metrics endpoint
    is listed for Prometheus once the replica is warm and unlisted when it stops.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with original(app):
            await asyncio.to_thread(app.state.core.wait_started)
            if not app.state.core.ready:
                raise RuntimeError(f"replica startup failed: {app.state.core.startup_error}")
            if endpoint is not None:
                endpoint.start()
                logger.info("replica metrics on %s", endpoint.target)
            try:
                yield
            finally:
                if endpoint is not None:
                    endpoint.stop()

    return lifespan


def build_replica_app(
    settings: ServiceSettings,
    replica: str,
    *,
    label: str | None = None,
    metrics_port: int | None = None,
    metrics_sd_dir: str | Path | None = None,
    advertise: str | None = None,
) -> FastAPI:
    """The single-process app, tagged with ``replica`` and started only once warm.

    Answers carry ``replica`` in ``x-cmamba-replica``; metrics carry ``label`` (default:
    ``replica``) in their ``replica`` label. With ``metrics_port`` (0: any free port), the
    replica also serves its labelled registry on that port and lists it in
    ``metrics_sd_dir`` (see :class:`ReplicaMetricsEndpoint`), under the address
    ``advertise`` (default: the host name).
    """
    from service.main import create_app

    app = create_app(settings)
    app.state.core.check()
    labelled = replica_labelled_registry(app.state.metrics.registry, label or replica)
    endpoint = None
    if metrics_port is not None:
        endpoint = ReplicaMetricsEndpoint(
            labelled,
            label or replica,
            sd_dir=metrics_sd_dir,
            port=metrics_port,
            advertise=advertise,
        )
    app.state.replica_metrics = endpoint
    app.router.lifespan_context = _wait_warm(app.router.lifespan_context, endpoint)
    app.add_middleware(ReplicaMiddleware, replica=replica, labelled=labelled)
    return app


def build_deployment(
    settings: Mapping[str, Any] | None = None,
    *,
    num_replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int = -1,
    health_check_period_s: float = 5.0,
    metrics_port: int | None = 0,
    metrics_sd_dir: str | None = DEFAULT_METRICS_SD_DIR,
    name: str = DEFAULT_DEPLOYMENT_NAME,
) -> Application:
    """A bound Ray Serve application of the service, ready for ``serve.run``.

    Args:
        settings: ``ServiceSettings`` fields (as for ``ServiceSettings(**settings)``); each
            replica also reads ``CMAMBA_*`` from its own environment for fields not given.
        num_replicas: fixed replica count (ignored when ``max_replicas`` is set).
        min_replicas: autoscaling lower bound (default 1 when ``max_replicas`` is set).
        max_replicas: autoscaling upper bound; set it to turn autoscaling on.
        target_ongoing_requests: autoscaling target per replica (default: half of
            ``max_ongoing_requests``, so replicas are added before requests queue in Ray).
        num_cpus: CPUs reserved per replica.
        num_gpus: GPUs per replica; fractions (0.5, 0.25) share one GPU between replicas.
        max_ongoing_requests: requests Ray sends to one replica at once (default: the
            replica's ``max_inflight``, so Ray's routing and our admission agree).
        max_queued_requests: requests waiting in Ray for a replica before Ray answers 503
            (-1: no limit).
        health_check_period_s: how often Ray asks each replica whether its model worker lives.
        metrics_port: port on which each replica serves its own ``/metrics`` (0: a free
            port, the usual choice with several replicas per node; None: none, the metrics
            are then only reachable through Ray's proxy, one replica per scrape).
        metrics_sd_dir: folder where each replica lists its metrics endpoint for
            Prometheus's ``file_sd_configs`` (None: not listed). With several nodes it must
            be a folder Prometheus reads for every node (a shared volume).
        name: the deployment name.
    """
    from ray import serve

    from service.errors import ServiceError
    from service.logging_setup import configure_logging
    from service.settings import ServiceSettings

    overrides = dict(settings or {})
    # Validate in the driver, so a bad value fails here and not on every replica.
    resolved = ServiceSettings(**overrides)
    ongoing = max_ongoing_requests if max_ongoing_requests is not None else resolved.max_inflight

    @serve.ingress()
    class CmambaService:
        """One replica: the single-process app built in the replica's own process."""

        def __init__(self, overrides: dict[str, Any], metrics: dict[str, Any]) -> None:
            import ray

            context = serve.get_replica_context()
            self.replica = context.replica_id.to_full_id_str()
            self.label = context.replica_id.unique_id  # Ray's own replica label value
            self.settings = ServiceSettings(**overrides)
            self.metrics = {**metrics, "advertise": ray.util.get_node_ip_address()}
            key = self.settings.api_key
            configure_logging(
                self.settings.log_format,
                self.settings.log_level,
                secrets=[key.get_secret_value()] if key is not None else [],
            )

        def __serve_build_asgi_app__(self) -> FastAPI:
            self.service_app = build_replica_app(
                self.settings, self.replica, label=self.label, **self.metrics
            )
            return self.service_app

        def __del__(self) -> None:
            # The lifespan unlists the metrics endpoint; this covers a replica whose
            # lifespan never ran its shutdown (Ray tears the actor down first).
            app = getattr(self, "service_app", None)
            endpoint = getattr(getattr(app, "state", None), "replica_metrics", None)
            if endpoint is not None:
                endpoint.stop()

        async def check_health(self) -> None:
            """Ray replaces a replica whose startup failed, that hit a fatal failure (a CUDA
            error, a dead model worker or extraction thread), or whose device fails a tiny
            operation on the model worker (``InferenceCore.check_health``)."""
            core = self.service_app.state.core
            try:
                await core.check_health(HEALTH_PROBE_TIMEOUT_S)
            except ServiceError as exc:
                raise RuntimeError(f"replica unhealthy: {exc.message}") from exc

    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "health_check_period_s": health_check_period_s,
        # Replicas drain like the single-process server: Ray stops routing, in-flight finish.
        "graceful_shutdown_timeout_s": resolved.drain_timeout_s,
    }
    if max_replicas is not None:
        low = min_replicas if min_replicas is not None else 1
        target = target_ongoing_requests if target_ongoing_requests else max(1.0, ongoing / 2)
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": low,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target,
        }
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(**options)(CmambaService)
    metrics = {"metrics_port": metrics_port, "metrics_sd_dir": metrics_sd_dir}
    return deployment.bind(overrides, metrics)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run service.ray_serve:app_builder`` and Serve config files.

    ``args`` holds ``settings`` (ServiceSettings fields) and any keyword argument of
    :func:`build_deployment`; deployment options in a config file's ``deployments`` section
    override these.
    """
    options = dict(args)
    settings = options.pop("settings", None)
    return build_deployment(settings, **options)
