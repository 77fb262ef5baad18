"""HAProxy in front of Ray Serve: what it costs, and what it does when a replica dies.

Starts a local Ray instance with 2 features-only replicas of the checkpoint, Ray's proxy on a
loopback port and HAProxy (``deploy/ray/haproxy.cfg``, via ``service.ray_front``) in front.

1. Overhead: closed-loop clients on ``POST /v1/predict/features``, straight to Ray's proxy and
   through HAProxy, alternating, at a few concurrencies.
2. Failover: a replica is killed (``ray.kill``) while it holds requests, under closed-loop
   load, a few times straight to Ray's proxy and a few times through HAProxy; each round
   counts the answers by status and HAProxy's replays. Serve starts a replacement between
   rounds.

Usage::

    python bench/ray_front.py [--checkpoint DIR] [--duration 6] [--rounds 3] [--write-docs]

With ``--write-docs`` it rewrites the bench section of docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, ROOT, write_section

DOC = DOCS / "SCALE.md"
SECTION = "ray-front-bench"
APP_NAME = "cmamba-bench"
REPLICA_HEADER = "x-cmamba-replica"


# HAProxy's log line for a request: ... <actconn>/<feconn>/<beconn>/<srv_conn>/<retries> ...
RETRIES = re.compile(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ \"")


def replayed_requests(log: Path) -> int:
    """Requests HAProxy's log shows with at least one retry. (HAProxy's own
    haproxy_backend_retry_warnings_total counts two per replayed request in 2.6 and 2.8.)"""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for m in RETRIES.finditer(text) if int(m.group(1)) > 0)


def haproxy_version(binary: str) -> str:
    """``HAProxy 2.6.12-1+deb12u4 (/usr/sbin/haproxy)``."""
    import subprocess

    first = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    words = first.stdout.split()
    return f"HAProxy {words[2] if len(words) > 2 else '?'} ({binary})"


def replicas_ready(url: str, body: bytes, want: int, timeout: float = 120.0) -> set[str]:
    """Send bursts of 8 concurrent requests until ``want`` replicas have answered."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    headers = {"content-type": "application/json"}

    def post(client: httpx.Client) -> str | None:
        try:
            answer = client.post(f"{url}/v1/predict/features", content=body, headers=headers)
        except httpx.HTTPError:
            return None
        return answer.headers.get(REPLICA_HEADER) if answer.status_code == 200 else None

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        while len(seen) < want and time.monotonic() < deadline:
            seen |= {r for r in pool.map(lambda _: post(client), range(8)) if r}
    if len(seen) < want:
        raise TimeoutError(f"only {len(seen)} replicas answered")
    return seen


async def kill_round(url: str, body: bytes, concurrency: int, log: Path | None) -> dict:
    """Closed-loop load; kill the replica that answers first once it holds requests."""
    import ray

    headers = {"content-type": "application/json"}
    statuses: Counter[str] = Counter()
    before = replayed_requests(log) if log else 0
    victim: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        stop_at = time.perf_counter() + 6.0

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                try:
                    response = await client.post(
                        "/v1/predict/features", content=body, headers=headers
                    )
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[str(response.status_code)] += 1
                if not victim and response.status_code == 200:
                    victim.append(response.headers[REPLICA_HEADER])
                    await asyncio.sleep(0.05)  # let it take more requests
                    ray.kill(ray.get_actor(victim[0], namespace="serve"), no_restart=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = replayed_requests(log) if log else 0
    return {"statuses": statuses, "replays": after - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="default: the embedded default")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per overhead cell")
    parser.add_argument("--length", type=int, default=50, help="steps per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=2, help="overhead cells per path")
    parser.add_argument("--rounds", type=int, default=3, help="kill rounds per path")
    parser.add_argument("--write-docs", action="store_true", help="rewrite docs/SCALE.md")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from bench.load import features_body, resolve_checkpoint
    from bench.ray_replicas import drive, free_port, wait_ready
    from service.ray_front import HAProxyFront, find_haproxy
    from service.ray_serve import build_deployment

    overhead: list[tuple[str, int, float, float, float]] = []
    failover: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as work:
        checkpoint, checkpoint_text = resolve_checkpoint(args.checkpoint, Path(work))
        body = features_body(checkpoint, args.length)
        proxy_port, front_port, metrics_port = free_port(), free_port(), free_port()
        direct = f"http://127.0.0.1:{proxy_port}"
        fronted = f"http://127.0.0.1:{front_port}"
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
        )
        log_path = Path(work) / "haproxy.log"
        log = log_path.open("wb")
        front = HAProxyFront(
            bind=f"127.0.0.1:{front_port}",
            ray_proxy=f"127.0.0.1:{proxy_port}",
            metrics_bind=f"127.0.0.1:{metrics_port}",
            output=log,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": proxy_port})
            settings = {
                "model_path": str(checkpoint.resolve()),
                "enable_media": False,
                "torch_threads": 1,
            }
            app = build_deployment(
                settings, num_replicas=2, num_cpus=1.0, metrics_port=None, health_check_period_s=1
            )
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            wait_ready(direct, 2)
            front.start()
            for concurrency in args.concurrency:
                paths = (("Ray's proxy", direct), ("HAProxy, then Ray's proxy", fronted))
                for path, url in paths * args.repeats:
                    cell = asyncio.run(drive(url, body, concurrency, args.duration))
                    overhead.append(
                        (path, concurrency, cell.rps, cell.percentile(50), cell.percentile(99))
                    )
                    print(overhead[-1], flush=True)
            for _ in range(args.rounds):
                for path, url, metrics in (
                    ("Ray's proxy", direct, None),
                    ("HAProxy, then Ray's proxy", fronted, log_path),
                ):
                    replicas_ready(direct, body, 2)
                    result = asyncio.run(kill_round(url, body, 8, metrics))
                    failover.append((path, result))
                    print(path, result, flush=True)
        finally:
            front.stop()
            serve.shutdown()
            ray.shutdown()
            log.close()

    machine = (
        f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs, "
        f"Python {platform.python_version()}, ray {ray.__version__}, "
        f"{haproxy_version(find_haproxy())}"
    )
    lines = [
        "### HAProxy in front: cost and failover here (`bench/ray_front.py`)",
        "",
        f"Machine: {machine}. Checkpoint: {checkpoint_text}; 2 features-only replicas "
        f"(1 CPU each), body {args.length} steps; HAProxy, Ray's proxy, the replicas and the "
        f"clients share the machine. Overhead cells run {args.duration} s of closed-loop "
        f"clients, alternating the two paths, {args.repeats} times each.",
        "",
        "| path | concurrency | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {p} | {c} | {r:.1f} | {p50:.1f} | {p99:.1f} |" for p, c, r, p50, p99 in overhead]
    ratios = []
    for concurrency in args.concurrency:
        mean = {
            path: sum(r for p, c, r, _, _ in overhead if p == path and c == concurrency)
            / args.repeats
            for path in ("Ray's proxy", "HAProxy, then Ray's proxy")
        }
        ratio = mean["HAProxy, then Ray's proxy"] / mean["Ray's proxy"]
        ratios.append(f"concurrency {concurrency}: {ratio:.2f}x")
    lines += [
        "",
        "Through HAProxy against straight to Ray's proxy (mean req/s): " + ", ".join(ratios) + ".",
    ]
    lines += [
        "",
        f"Failover: {args.rounds} rounds per path; in each, 8 closed-loop clients for 6 s and one "
        "replica killed (`ray.kill`) 50 ms after it first answered; answers by status over "
        "the round, and the requests HAProxy replayed (from its log).",
        "",
        "| path | round | 200 | 500 | 503 | other | replayed by HAProxy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rounds: Counter[str] = Counter()
    for path, result in failover:
        rounds[path] += 1
        s = result["statuses"]
        other = sum(n for k, n in s.items() if k not in {"200", "500", "503"})
        replays = result["replays"] if path.startswith("HAProxy") else "-"
        lines.append(
            f"| {path} | {rounds[path]} | {s['200']} | {s['500']} | {s['503']} | {other} | "
            f"{replays} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_section(DOC, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
