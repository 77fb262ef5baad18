"""Ray Serve: requests per second with 1 and with 2 replicas on this machine.

Starts a local Ray instance, serves the checkpoint (features only) through
``service.ray_serve.build_deployment`` with 1 then 2 replicas, and drives
``POST /v1/predict/features`` with closed-loop HTTP clients at a few concurrencies. It prints
requests per second, p50 / p99 latency and how the answers spread over the replicas (the
``x-cmamba-replica`` header), and with ``--write-docs`` rewrites the bench section of
docs/SCALE.md.

Usage::

    python bench/ray_replicas.py [--checkpoint DIR] [--duration 6] [--cpus 2] [--write-docs]

Ray's proxy, the replicas and the clients all share this machine's cores: on a small host the
numbers show the overhead of the Ray path and how replicas share the cores, not the scaling
of replicas that each own a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, ROOT, write_section

DOC = DOCS / "SCALE.md"
SECTION = "ray-bench"
APP_NAME = "cmamba-bench"


@dataclass
class Cell:
    """One measured configuration."""

    replicas: int
    concurrency: int
    seconds: float
    latencies_ms: list[float]
    refused: int
    spread: Counter[str] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def shares(self) -> str:
        total = sum(self.spread.values()) or 1
        return " / ".join(f"{100 * n / total:.0f}%" for _, n in self.spread.most_common())


async def drive(url: str, body: bytes, concurrency: int, duration: float) -> Cell:
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for _ in range(4):
            (
                await client.post("/v1/predict/features", content=body, headers=headers)
            ).raise_for_status()
        cell = Cell(0, concurrency, 0.0, [], 0)
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                response = await client.post("/v1/predict/features", content=body, headers=headers)
                if response.status_code == 503:
                    cell.refused += 1
                    continue
                response.raise_for_status()
                cell.latencies_ms.append((time.perf_counter() - start) * 1000.0)
                cell.spread[response.headers.get("x-cmamba-replica", "?")] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cell.seconds = time.perf_counter() - began
    return cell


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, replicas: int, timeout: float = 180.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "RUNNING":
            deployment = next(iter(app.deployments.values()))
            running = deployment.replica_states.get("RUNNING", 0)
            if running >= replicas and httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError("the Ray Serve app did not become ready")


def render(cells: list[Cell], context: dict[str, str]) -> str:
    lines = [
        "### 1 vs 2 replicas here (`bench/ray_replicas.py`)",
        "",
        f"Machine: {context['machine']}. Checkpoint: {context['checkpoint']}; features-only "
        f"replicas, device cpu, torch threads 1, batching on (max_batch_size 16, 5 ms). Local "
        f"Ray with {context['cpus']} CPUs, {context['cpus_per_replica']} CPU per replica; Ray's "
        f"proxy, the replicas and the clients share the machine. Body: {context['length']} "
        f"steps. Each cell runs {context['duration']} s of closed-loop clients.",
        "",
        "| replicas | concurrency | req/s | p50 ms | p99 ms | 503s | share per replica |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c.replicas} | {c.concurrency} | {c.rps:.1f} | {c.percentile(50):.1f} | "
            f"{c.percentile(99):.1f} | {c.refused} | {c.shares} |"
        )
    by = {(c.replicas, c.concurrency): c for c in cells}
    ratios = [
        f"concurrency {k}: {by[(2, k)].rps / by[(1, k)].rps:.2f}x"
        for k in sorted({c.concurrency for c in cells})
        if (1, k) in by and (2, k) in by and by[(1, k)].rps
    ]
    lines += ["", "2 replicas against 1 (req/s): " + ", ".join(ratios) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the embedded default")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per cell")
    parser.add_argument("--length", type=int, default=50, help="steps per request")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--write-docs", action="store_true", help="rewrite docs/SCALE.md")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.load import features_body, resolve_checkpoint
    from service.ray_serve import build_deployment

    cpus_per_replica = args.cpus / 2
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as work:
        checkpoint, checkpoint_text = resolve_checkpoint(args.checkpoint, Path(work))
        body = features_body(checkpoint, args.length)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = {
                "model_path": str(checkpoint.resolve()),
                "enable_media": False,
                "torch_threads": 1,
            }
            for replicas in (1, 2):
                app = build_deployment(settings, num_replicas=replicas, num_cpus=cpus_per_replica)
                serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
                wait_ready(url, replicas)
                for concurrency in args.concurrency:
                    cell = asyncio.run(drive(url, body, concurrency, args.duration))
                    cell.replicas = replicas
                    cells.append(cell)
                    print(
                        f"replicas {replicas} c={concurrency:<3d} {cell.rps:7.1f} req/s  "
                        f"p50 {cell.percentile(50):7.1f} ms  p99 {cell.percentile(99):7.1f} ms  "
                        f"503s {cell.refused}  spread {cell.shares}",
                        flush=True,
                    )
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()

    import torch

    context = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}",
        "checkpoint": checkpoint_text,
        "cpus": str(args.cpus),
        "cpus_per_replica": f"{cpus_per_replica:g}",
        "length": str(args.length),
        "duration": f"{args.duration:g}",
    }
    text = render(cells, context)
    print()
    print(text)
    if args.write_docs:
        write_section(DOC, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
