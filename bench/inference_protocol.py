"""The Open Inference Protocol's tensor encodings on a long clip: JSON vs binary.

    .venv/bin/python bench/inference_protocol.py [--steps 2000] [--requests 20] [--no-write]

Starts ``cmamba serve`` on the embedded default checkpoint (1 torch thread) and sends the same
random ``--steps``-step clip (every modality of the checkpoint) ``--requests`` times, one at a
time after one warm-up request, as ``/v1/predict/features`` JSON, as ``/v2`` JSON tensors and as
``/v2`` binary tensors (``Inference-Header-Content-Length``, binary outputs). Reports the bytes
sent and received, the server's CPU per request (whole process, and its event-loop thread), the
server's own total, and requests per second seen by the client. The table goes to
docs/PERFORMANCE.md between the ``inference-protocol`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, write_section
from bench.load import Server

DOC = DOCS / "PERFORMANCE.md"
HEADER_LENGTH = "Inference-Header-Content-Length"

Request = tuple[str, bytes, dict[str, str]]
"""Path, body and headers of one request."""


def clip(metadata: dict[str, Any], steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random clip of ``steps`` steps with every FP32 input of the model."""
    rng = np.random.default_rng(seed)
    return {
        i["name"]: rng.standard_normal((steps, i["shape"][-1])).astype(np.float32)
        for i in metadata["inputs"]
        if i["datatype"] == "FP32"
    }


def v1_request(profile: str, features: dict[str, np.ndarray]) -> Request:
    body = {"profile": profile, "features": {m: a.tolist() for m, a in features.items()}}
    return "/v1/predict/features", json.dumps(body).encode(), {"Content-Type": "application/json"}


def v2_json_request(name: str, features: dict[str, np.ndarray]) -> Request:
    inputs = [
        {"name": m, "datatype": "FP32", "shape": [1, *a.shape], "data": a.ravel().tolist()}
        for m, a in features.items()
    ]
    body = {"inputs": inputs, "outputs": [{"name": "score"}, {"name": "probabilities"}]}
    headers = {"Content-Type": "application/json"}
    return f"/v2/models/{name}/infer", json.dumps(body).encode(), headers


def v2_binary_request(name: str, features: dict[str, np.ndarray]) -> Request:
    inputs = [
        {
            "name": m,
            "datatype": "FP32",
            "shape": [1, *a.shape],
            "parameters": {"binary_data_size": a.nbytes},
        }
        for m, a in features.items()
    ]
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    data = b"".join(a.astype("<f4").tobytes() for a in features.values())
    headers = {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    return f"/v2/models/{name}/infer", head + data, headers


def server_total_ms(response: httpx.Response) -> float:
    """The server's own ``total`` stage (its ``Server-Timing`` header)."""
    for part in response.headers["server-timing"].split(","):
        stage, _, duration = part.strip().partition(";dur=")
        if stage == "total":
            return float(duration)
    return float("nan")


def measure(server: Server, request: Request, requests: int) -> dict[str, float]:
    path, body, headers = request
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post(path, content=body, headers=headers).raise_for_status()  # warm-up
        before = server.cpu_seconds()
        totals, received = [], 0
        start = time.perf_counter()
        for _ in range(requests):
            response = client.post(path, content=body, headers=headers)
            response.raise_for_status()
            totals.append(server_total_ms(response))
            received = len(response.content)
        wall = time.perf_counter() - start
        after = server.cpu_seconds()
    row = {
        "sent": float(len(body)),
        "received": float(received),
        "server_ms": statistics.median(totals),
        "rps": requests / wall,
    }
    if before is not None and after is not None:
        row["cpu_ms"] = (after[0] - before[0]) / requests * 1000.0
        row["loop_ms"] = (after[1] - before[1]) / requests * 1000.0
    return row


def table(rows: dict[str, dict[str, float]], steps: int, requests: int, load: float) -> str:
    def mb(n: float) -> str:
        return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n:,.0f} B"

    lines = [
        "### Open Inference Protocol: JSON vs binary tensors (`bench/inference_protocol.py`)",
        "",
        f"One {steps:,}-step clip of random features (every modality of the embedded default "
        f"checkpoint) sent {requests} times, one at a time after a warm-up request, to a real "
        f"`cmamba serve` (1 torch thread) on {os.cpu_count()} CPU cores (load average "
        f"{load:.1f} before; shared machine). `server CPU` is the server process's CPU time per "
        "request (all threads), `event loop` its main thread's; `server total` the median of the "
        "answers' `total` stage; `req/s` as the client saw it.",
        "",
        "| encoding | request body | answer body | server CPU / request | event loop / request "
        "| server total | req/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    nan = float("nan")
    for label, row in rows.items():
        lines.append(
            f"| {label} | {mb(row['sent'])} | {mb(row['received'])} | "
            f"{row.get('cpu_ms', nan):,.1f} ms | {row.get('loop_ms', nan):,.1f} ms "
            f"| {row['server_ms']:,.1f} ms | **{row['rps']:.2f}** |"
        )
    json_row, binary_row = rows["`/v2` JSON tensors"], rows["`/v2` binary tensors"]
    lines += [
        "",
        f"Binary tensors: {json_row['sent'] / binary_row['sent']:.1f}x fewer bytes than JSON "
        f"tensors, {json_row.get('cpu_ms', 0) / max(binary_row.get('cpu_ms', 1), 1e-9):.1f}x "
        f"less server CPU per request, {binary_row['rps'] / json_row['rps']:.2f}x the requests "
        "per second.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the embedded one")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from model.checkpoints import default_checkpoint_path

    checkpoint = args.checkpoint or default_checkpoint_path()
    load = os.getloadavg()[0]
    server = Server(checkpoint, {"CMAMBA_TORCH_THREADS": "1"}, [])
    try:
        server.wait_ready()
        name = _model_name(httpx.get(f"{server.url}/metrics").text)
        metadata = httpx.get(f"{server.url}/v2/models/{name}", timeout=30).json()
        features = clip(metadata, args.steps)
        builders: dict[str, Callable[[], Request]] = {
            "`/v1/predict/features` JSON": lambda: v1_request(
                metadata["feature_profile"], features
            ),
            "`/v2` JSON tensors": lambda: v2_json_request(name, features),
            "`/v2` binary tensors": lambda: v2_binary_request(name, features),
        }
        rows = {}
        for label, build in builders.items():
            rows[label] = measure(server, build(), args.requests)
            print(label, {k: round(v, 2) for k, v in rows[label].items()})
    finally:
        server.stop()
    text = table(rows, args.steps, args.requests, load)
    print(text)
    if not args.no_write:
        write_section(DOC, "inference-protocol", text)
    return 0


def _model_name(metrics: str) -> str:
    """The served model's name, from the ``cmamba_model_info`` sample."""
    for line in metrics.splitlines():
        if line.startswith("cmamba_model_info{"):
            return line.split('name="', 1)[1].split('"', 1)[0]
    raise RuntimeError("the server reports no model_info")


if __name__ == "__main__":
    raise SystemExit(main())
