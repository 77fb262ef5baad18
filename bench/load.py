"""Load benchmark of the REST API: micro-batching on and off, and a media clip end to end.

Starts ``cmamba serve`` processes on free ports and drives them with concurrent HTTP clients:

- ``POST /v1/predict/features`` at concurrency 1, 8 and 32, with micro-batching off
  (``max_batch_size`` 1) and on (``--batch-size``, default 16, ``max_batch_delay_ms`` 5): both
  servers run at once and each cell alternates between them (``--repeats`` runs each);
- ``POST /v1/predict`` with a shared clip (feature extraction included), batching on.

It prints requests per second, p50 / p99 latency and the server's CPU time per request per
cell, the host's load average, the batching ratio at the highest
concurrency (target: at least 3x the requests per second of no batching, with p99 no worse than
2x), and with ``--write-docs`` rewrites the ``load`` section of docs/PERFORMANCE.md
(``load-cuda`` for a run with ``--device cuda``; ``--doc FILE`` writes the section's text to a
file as well, as ``scripts/gpu_check.sh`` does).

Usage::

    python bench/load.py [--checkpoint DIR] [--duration 5] [--repeats 2] [--write-docs]

The clients run on the same machine as the server: on a small CPU host they take cores from it,
so compare the ratios measured side by side in one run rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, ROOT, write_section

DOC = DOCS / "PERFORMANCE.md"
DEFAULT_CLIP = MEDIA / "cremad_1001_DFA_HAP_XX.mp4"


@dataclass
class Cell:
    """One measured configuration."""

    endpoint: str
    batching: str
    concurrency: int
    requests: int
    refused: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: list[int]
    stage_ms: dict[str, float]
    timings: list[dict[str, float]]
    load: float  # the host's 1-minute load average (the higher of before and after the cell)
    server_cpu_s: float | None = None  # CPU seconds the server process used during the cell
    loop_cpu_s: float | None = None  # of which its main thread (uvicorn's event loop)

    @property
    def server_cpu_ms(self) -> float:
        """Server CPU time per answered request (all its threads), ms; nan when unknown."""
        if self.server_cpu_s is None or not self.requests:
            return float("nan")
        return self.server_cpu_s / self.requests * 1000.0

    @property
    def loop_cpu_ms(self) -> float:
        """The event loop's share of :attr:`server_cpu_ms` (HTTP, JSON, routing), ms."""
        if self.loop_cpu_s is None or not self.requests:
            return float("nan")
        return self.loop_cpu_s / self.requests * 1000.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def server_percentile(self, q: float) -> float:
        totals = [t["total"] for t in self.timings if "total" in t]
        return float(np.percentile(totals, q)) if totals else float("nan")

    @property
    def mean_batch(self) -> float:
        return float(np.mean(self.batch_sizes)) if self.batch_sizes else float("nan")


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``cmamba serve`` in a subprocess, stopped with SIGTERM (graceful drain)."""

    def __init__(self, checkpoint: Path, env: dict[str, str], args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "CMAMBA_MODEL_PATH": str(checkpoint), **env}
        # A file, not a pipe: a pipe nobody reads would block the server once full.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", *args],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{err[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    metrics = httpx.get(f"{self.url}/metrics").text
                    return {"metrics": metrics}
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not become ready")

    def cpu_seconds(self) -> tuple[float, float] | None:
        """User + system CPU time so far of the server process (all threads) and of its main
        thread, which runs uvicorn's event loop (Linux /proc), else None. The rest is the
        model worker's (and, with media, the extraction pool's)."""
        pid = self.proc.pid
        try:
            process = _cpu_fields(Path(f"/proc/{pid}/stat"))
            main = _cpu_fields(Path(f"/proc/{pid}/task/{pid}/stat"))
        except OSError:
            return None
        return process, main

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _cpu_fields(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- clients -----------------------------------------------------------------------------------


async def _drive(
    url: str,
    path: str,
    make_request: Any,
    concurrency: int,
    duration: float,
    warmup_requests: int,
) -> tuple[list[float], list[int], int, float, list[dict[str, Any]]]:
    """httpx clients (multipart uploads)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        for _ in range(warmup_requests):
            (await client.post(path, **make_request())).raise_for_status()
        latencies: list[float] = []
        batch_sizes: list[int] = []
        bodies: list[dict[str, Any]] = []
        refused = 0
        stop_at = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal refused
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                response = await client.post(path, **make_request())
                elapsed = (time.perf_counter() - start) * 1000.0
                if response.status_code == 503:
                    refused += 1
                    continue
                response.raise_for_status()
                body = response.json()
                latencies.append(elapsed)
                batch_sizes.append(int(body["batch"]["size"]))
                bodies.append(body["timings_ms"])

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return latencies, batch_sizes, refused, seconds, bodies


class RawJsonPoster:
    """A lean HTTP/1.1 keep-alive client for one JSON POST, on asyncio streams.

    The features cells run hundreds of requests per second from a client process that shares
    the server's two cores; httpx spent 2.5-4.3 ms of CPU per request there (measured with
    /proc CPU times), more than the server's HTTP and JSON work, so the client's own cost
    decided the numbers. This client sends the same bytes (request line, Host, Content-Type,
    Content-Length, the JSON body) and reads the status, headers and Content-Length body.
    """

    def __init__(self, url: str, path: str, body: bytes) -> None:
        netloc = url.split("://", 1)[1]
        host, _, port = netloc.partition(":")
        self.host, self.port = host, int(port or 80)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.request = head.encode("latin-1") + body

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, limit=2**20)

    async def post(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, bytes]:
        writer.write(self.request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(None, 2)[1])
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise RuntimeError("chunked answers are not expected here")
        return status, await reader.readexactly(length)


async def _drive_raw(
    url: str, path: str, body: bytes, concurrency: int, duration: float, warmup_requests: int
) -> tuple[list[float], list[int], int, float, list[dict[str, Any]]]:
    """``concurrency`` keep-alive connections of :class:`RawJsonPoster`, closed loop."""
    poster = RawJsonPoster(url, path, body)
    connections = [await poster.connect() for _ in range(concurrency)]
    try:
        for _ in range(warmup_requests):
            status, data = await poster.post(*connections[0])
            if status != 200:
                raise RuntimeError(f"warm-up answered {status}: {data[:300]!r}")
        latencies: list[float] = []
        batch_sizes: list[int] = []
        bodies: list[dict[str, Any]] = []
        refused = 0
        stop_at = time.perf_counter() + duration

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal refused
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                status, data = await poster.post(reader, writer)
                elapsed = (time.perf_counter() - start) * 1000.0
                if status == 503:
                    refused += 1
                    continue
                if status != 200:
                    raise RuntimeError(f"answered {status}: {data[:300]!r}")
                answer = json.loads(data)
                latencies.append(elapsed)
                batch_sizes.append(int(answer["batch"]["size"]))
                bodies.append(answer["timings_ms"])

        began = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in connections))
        seconds = time.perf_counter() - began
    finally:
        for _, writer in connections:
            writer.close()
    return latencies, batch_sizes, refused, seconds, bodies


def measure(
    server: Server,
    path: str,
    make_request: Any,
    *,
    batching: str,
    concurrency: int,
    duration: float,
) -> Cell:
    load_before = os.getloadavg()[0]
    cpu_before = server.cpu_seconds()
    if isinstance(make_request, bytes):  # a JSON body: the lean client
        run = _drive_raw(server.url, path, make_request, concurrency, duration, warmup_requests=2)
    else:
        run = _drive(server.url, path, make_request, concurrency, duration, warmup_requests=2)
    latencies, batches, refused, seconds, timings = asyncio.run(run)
    cpu_after = server.cpu_seconds()
    load = max(load_before, os.getloadavg()[0])
    stage_ms: dict[str, float] = {}
    if timings:
        for key in timings[0]:
            stage_ms[key] = float(np.mean([t.get(key, 0.0) for t in timings]))
    cell = Cell(
        path,
        batching,
        concurrency,
        len(latencies),
        refused,
        seconds,
        latencies,
        batches,
        stage_ms,
        timings,
        load,
    )
    if cpu_before is not None and cpu_after is not None:
        cell.server_cpu_s = cpu_after[0] - cpu_before[0]
        cell.loop_cpu_s = cpu_after[1] - cpu_before[1]
    print(
        f"  {path:22s} batching {batching:3s} c={concurrency:<3d} {cell.rps:8.1f} req/s  "
        f"p50 {cell.percentile(50):8.1f} ms  p99 {cell.percentile(99):8.1f} ms  "
        f"server p50 {cell.server_percentile(50):7.1f} p99 {cell.server_percentile(99):7.1f}  "
        f"mean batch {cell.mean_batch:5.1f}  refused {refused}  server CPU/req "
        f"{cell.server_cpu_ms:5.2f} ms (event loop {cell.loop_cpu_ms:4.2f})  load {load:.2f}",
        flush=True,
    )
    return cell


def merge(runs: list[Cell]) -> Cell:
    """One cell from repeated runs of the same configuration (totals and pooled samples)."""
    first = runs[0]
    timings = [t for c in runs for t in c.timings]
    stage_ms = {key: float(np.mean([t.get(key, 0.0) for t in timings])) for key in first.stage_ms}

    def total(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    return Cell(
        first.endpoint,
        first.batching,
        first.concurrency,
        sum(c.requests for c in runs),
        sum(c.refused for c in runs),
        sum(c.seconds for c in runs),
        [x for c in runs for x in c.latencies_ms],
        [x for c in runs for x in c.batch_sizes],
        stage_ms,
        timings,
        max(c.load for c in runs),
        total([c.server_cpu_s for c in runs]),
        total([c.loop_cpu_s for c in runs]),
    )


# -- setup -------------------------------------------------------------------------------------


def resolve_checkpoint(given: Path | None, workdir: Path) -> tuple[Path, str]:
    """The checkpoint to serve: the one given, the embedded default, or random weights."""
    if given is not None:
        return given, f"`{given}`"
    import model

    finder = getattr(model, "default_checkpoint_path", None)
    default = Path(finder()) if finder else ROOT / "model" / "checkpoints" / "default"
    if (default / "config.json").is_file():
        return default, f"the embedded default (`{default.relative_to(ROOT)}`)"
    import torch

    from model import CoupledMambaConfig, CoupledMambaForSentiment, save_checkpoint
    from preprocessing import PROFILES

    # The default checkpoint's shape (text only, d_model 64, d_state 16, 2 layers), random weights.
    torch.manual_seed(0)
    config = CoupledMambaConfig(
        modalities=("text",),
        feature_dims=dict(PROFILES["default-v1"].dims),
        d_model=64,
        d_state=16,
        n_layers=2,
    )
    folder = save_checkpoint(CoupledMambaForSentiment(config), workdir / "random", name="random")
    return (
        folder,
        "random weights in the default checkpoint's shape (text, d_model 64, d_state 16, 2 layers)",
    )


def features_body(checkpoint: Path, length: int) -> bytes:
    from model import read_checkpoint_config

    config, _ = read_checkpoint_config(checkpoint)
    rng = np.random.default_rng(0)
    features = {
        m: rng.standard_normal((length, config.feature_dims[m])).round(4).tolist()
        for m in config.modalities
    }
    return json.dumps({"profile": config.feature_profile, "features": features}).encode()


def model_scaling(
    checkpoint: Path,
    length: int,
    device: str,
    threads: int,
    sizes: tuple[int, ...] = (1, 8, 32),
    repeats: int = 15,
) -> dict[int, float]:
    """Milliseconds of one forward pass per batch size, in this process (no HTTP, no queue):
    the best of ``repeats`` interleaved runs, the estimate least moved by load from elsewhere
    on a shared host (a median there moved batch 1 from 4.5 to 10 ms between two runs)."""
    import torch

    from model import load_checkpoint
    from service.core.runner import resolve_device

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint, device=resolve_device(device))
    inputs = {size: model.dummy_inputs(size, length) for size in sizes}
    cuda = next(model.parameters()).is_cuda
    runs: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.inference_mode():
        for features, masks in inputs.values():
            model(features, masks)  # warm
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits every size
            for size, (features, masks) in inputs.items():
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(features, masks)
                if cuda:
                    torch.cuda.synchronize()
                runs[size].append((time.perf_counter() - start) * 1000.0)
    return {size: float(np.min(times)) for size, times in runs.items()}


def scan_backend(url: str) -> str:
    body = httpx.get(f"{url}/metrics").text
    for line in body.splitlines():
        if line.startswith("cmamba_model_info{"):
            return line.split('scan_backend="')[1].split('"')[0]
    return "?"


# -- report ------------------------------------------------------------------------------------


def render(
    cells: list[Cell], context: dict[str, str], scaling: dict[int, float], verdict: list[str]
) -> str:
    on_gpu = context["device"].startswith("cuda")
    lines = [
        "### Load on a GPU (`bench/load.py --device cuda`)"
        if on_gpu
        else "### Load (`bench/load.py`)",
        "",
        f"Machine: {context['machine']}. Checkpoint: {context['checkpoint']}; device "
        f"{context['device']}, scan backend `{context['scan_backend']}`, torch threads "
        f"{context['torch_threads']}, batching on = max_batch_size {context['batch_size']} and "
        f"max_batch_delay_ms 5. Features body: {context['length']} steps "
        f"({context['body_kb']} kB of JSON). Both features servers run at once and their cells "
        f"alternate (off, on, off, on: {context['repeats']} runs of {context['duration']} s per "
        "cell, pooled), so that load from elsewhere on the host falls on both modes alike; the "
        "closed-loop clients run on the same machine and share its cores (features: a lean "
        "keep-alive HTTP/1.1 client sending the same JSON, `RawJsonPoster`; media: httpx). "
        "p50 / p99 are measured by the client; server p50 / p99 are the answers' "
        "`timings_ms.total` (from when the app gets the request to its answer), so their gap is "
        "time spent queued in the client, the socket and the event loop. Server CPU is the "
        "server process's CPU time (all threads, from /proc) per answered request, and event "
        "loop its main thread's share (uvicorn, the app, the JSON; the rest is mostly the model "
        "worker thread); load is the "
        f"host's 1-minute load average during the cell ({context['load']} when the run began).",
        "",
        "| endpoint | batching | concurrency | req/s | p50 ms | p99 ms | server p50 ms | "
        "server p99 ms | mean batch | server CPU ms/req | event loop CPU ms/req | load | 503s |",
        "| --- | --- |" + " ---: |" * 11,
    ]
    for c in cells:
        lines.append(
            f"| `{c.endpoint}` | {c.batching} | {c.concurrency} | {c.rps:.1f} | "
            f"{c.percentile(50):.1f} | {c.percentile(99):.1f} | {c.server_percentile(50):.1f} | "
            f"{c.server_percentile(99):.1f} | {c.mean_batch:.1f} | {c.server_cpu_ms:.2f} | "
            f"{c.loop_cpu_ms:.2f} | "
            f"{c.load:.2f} | {c.refused} |"
        )
    if scaling:
        first = min(scaling)
        parts = ", ".join(
            f"batch {b}: {ms:.1f} ms ({b * scaling[first] / ms:.2f}x the clips/s of batch {first})"
            for b, ms in scaling.items()
        )
        lines += [
            "",
            f"One forward pass of the model alone at the padded length {context['padded']} "
            f"(best of 15, sizes interleaved, same threads): {parts}. This bounds what "
            "batching can gain on this device.",
        ]
    media = [c for c in cells if c.endpoint == "/v1/predict"]
    if media and media[0].stage_ms:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in media[0].stage_ms.items())
        lines += ["", f"`/v1/predict` mean stage times at concurrency 1 (ms): {stages}."]
    lines += ["", " ".join(verdict), ""]
    return "\n".join(lines)


def section_name(device: str) -> str:
    """The section of docs/PERFORMANCE.md a run on ``device`` rewrites: CPU and CUDA runs keep
    their own."""
    return "load-cuda" if device.startswith("cuda") else "load"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the embedded default")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run of a cell")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per features cell, alternating off and on"
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--length", type=int, default=50, help="steps per features request")
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP, help="clip for /v1/predict")
    parser.add_argument("--media-concurrency", default="1,4")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size when on")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite this device's load section of docs/PERFORMANCE.md (load or load-cuda)",
    )
    parser.add_argument("--doc", type=Path, help="also write the section's text to this file")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    media_levels = [int(c) for c in args.media_concurrency.split(",") if c]

    load_at_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="cmamba-load-") as work:
        checkpoint, checkpoint_text = resolve_checkpoint(args.checkpoint, Path(work))
        body = features_body(checkpoint, args.length)
        common = {
            "CMAMBA_TORCH_THREADS": str(args.torch_threads),
            "CMAMBA_DEVICE": args.device,
            "CMAMBA_MAX_QUEUE_SIZE": "512",
            "CMAMBA_MAX_INFLIGHT": "512",
        }
        cells: list[Cell] = []
        pair_ratios: list[float] = []  # on / off req/s of each back-to-back pair at the top level
        # Both servers run at once and the cells alternate off, on, off, on...: load from
        # elsewhere on the host then falls on both modes alike instead of on whichever ran
        # while it lasted.
        servers: dict[str, Server] = {}
        try:
            for batching, size in (("off", 1), ("on", args.batch_size)):
                env = {
                    **common,
                    "CMAMBA_MAX_BATCH_SIZE": str(size),
                    "CMAMBA_MAX_BATCH_DELAY_MS": "5",
                }
                servers[batching] = Server(checkpoint, env, ["--features-only"])
            for server in servers.values():
                server.wait_ready()
            backend = scan_backend(servers["on"].url)
            for level in levels:
                runs: dict[str, list[Cell]] = {"off": [], "on": []}
                for _ in range(args.repeats):
                    for batching, server in servers.items():
                        runs[batching].append(
                            measure(
                                server,
                                "/v1/predict/features",
                                body,
                                batching=batching,
                                concurrency=level,
                                duration=args.duration,
                            )
                        )
                    if level == max(levels) and runs["off"][-1].rps:
                        pair_ratios.append(runs["on"][-1].rps / runs["off"][-1].rps)
                cells += [merge(runs["off"]), merge(runs["on"])]
        finally:
            for server in servers.values():
                server.stop()
        cells.sort(key=lambda c: (c.batching != "off", c.concurrency))

        if media_levels and args.clip.is_file():
            clip_bytes = args.clip.read_bytes()
            clip_type = mimetypes.guess_type(args.clip.name)[0] or "application/octet-stream"

            def media_request() -> dict[str, Any]:
                return {"files": {"file": (args.clip.name, clip_bytes, clip_type)}}

            env = {
                **common,
                "CMAMBA_MAX_BATCH_SIZE": str(args.batch_size),
                "CMAMBA_MAX_BATCH_DELAY_MS": "5",
            }
            server = Server(checkpoint, env, ["--extract-workers", str(max(media_levels))])
            try:
                server.wait_ready()
                for level in media_levels:
                    cells.append(
                        measure(
                            server,
                            "/v1/predict",
                            media_request,
                            batching="on",
                            concurrency=level,
                            duration=args.duration,
                        )
                    )
            finally:
                server.stop()

        from service.settings import ServiceSettings

        buckets = ServiceSettings.model_fields["length_buckets"].default
        padded = next((b for b in buckets if b >= args.length), args.length)
        sizes = tuple(sorted({1, 8, args.batch_size, 32}))
        scaling = model_scaling(checkpoint, padded, args.device, args.torch_threads, sizes)

    top = max(levels)
    off = next(c for c in cells if c.batching == "off" and c.concurrency == top)
    on = next(
        c
        for c in cells
        if c.batching == "on" and c.concurrency == top and c.endpoint == off.endpoint
    )
    ratio = on.rps / off.rps if off.rps else float("nan")
    p99_ratio = on.percentile(99) / off.percentile(99)
    met = ratio >= 3.0 and p99_ratio <= 2.0
    spread = (
        f"; back-to-back pairs {min(pair_ratios):.2f}x to {max(pair_ratios):.2f}x"
        if len(pair_ratios) > 1
        else ""
    )
    verdict = [
        f"Batching at concurrency {top}: **{ratio:.2f}x** the requests per second of no batching "
        f"(target >= 3x{spread}), p99 {p99_ratio:.2f}x of no batching's (target <= 2x): "
        f"{'target met' if met else 'target NOT met'}."
    ]
    verdict.append(
        f"Server CPU per request at concurrency {top}: {off.server_cpu_ms:.2f} ms off, "
        f"{on.server_cpu_ms:.2f} ms on ({off.server_cpu_ms / on.server_cpu_ms:.2f}x less with "
        f"batching), of which the event loop's {off.loop_cpu_ms:.2f} ms off and "
        f"{on.loop_cpu_ms:.2f} ms on."
    )
    if scaling:
        first = min(scaling)
        best_size, best_gain = max(
            ((b, b * scaling[first] / ms) for b, ms in scaling.items()), key=lambda item: item[1]
        )
        verdict.append(
            f"The model alone gains at most {best_gain:.2f}x clips/s from batching here (batch "
            f"{best_size})."
        )
    print("\n" + verdict[0])
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
    if device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(0)}"
    context = {
        "machine": machine,
        "checkpoint": checkpoint_text,
        "device": device,
        "scan_backend": backend,
        "torch_threads": str(args.torch_threads),
        "length": str(args.length),
        "body_kb": f"{len(body) / 1024:.0f}",
        "duration": f"{args.duration:g}",
        "padded": str(padded),
        "batch_size": str(args.batch_size),
        "repeats": str(args.repeats),
        "load": load_at_start,
    }
    text = render(cells, context, scaling, verdict)
    print("\n" + text)
    if args.write_docs:
        write_section(DOC, section_name(device), text)
    if args.doc is not None:
        args.doc.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
