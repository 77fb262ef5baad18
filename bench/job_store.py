"""The job store's cost per call, SQLite file vs PostgreSQL, and its share of an hour of media.

    .venv/bin/python bench/job_store.py [--jobs 100] [--parts 60] [--postgres-url URL] [--no-write]

One process, one thread, a fresh database per backend: ``--jobs`` jobs go through create,
claim, the per-part writes of a runner (renew, add_segment, progress, for ``--parts`` parts of
24 scored windows each, as a runner stores 60 s parts of 2.5 s windows) and finish; reads
(get, segments, a page of list) are timed between. Without ``--postgres-url`` a throw-away
PostgreSQL server is started with Debian's ``postgresql`` (tests/pg.py; fsync off there, as
in the tests, so its figures are the store's own cost, not the disk's). The table goes to
docs/PERFORMANCE.md between the ``job-store`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, ROOT, write_section
from service.jobs.store import JobState, JobStore, open_store

DOC = DOCS / "PERFORMANCE.md"
PART_S, WINDOW_S = 60.0, 2.5
OWNER = "bench-runner"
EMOTIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised")


def part(index: int) -> dict[str, Any]:
    """A stored part as a runner writes it: 24 windows with scores and probabilities."""
    start = index * PART_S
    windows = []
    for w in range(int(PART_S / WINDOW_S)):
        t = start + w * WINDOW_S
        windows.append(
            {
                "start_s": t,
                "end_s": t + WINDOW_S,
                "score": round(0.37 * ((w % 7) - 3), 4),
                "label": "neutral",
                "probabilities": {"negative": 0.21, "neutral": 0.58, "positive": 0.21},
                "emotions": {name: round(1 / len(EMOTIONS), 4) for name in EMOTIONS},
                "modalities": {"text": True, "audio": True, "visual": w % 5 != 0},
                "transcript": "and then we looked at the figures for the third quarter",
            }
        )
    return {"index": index, "start_s": start, "end_s": start + PART_S, "segments": windows}


def timed(samples: dict[str, list[float]], name: str, call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = call()
    samples.setdefault(name, []).append((time.perf_counter() - started) * 1000.0)
    return result


def run(store: JobStore, jobs: int, parts: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    store.migrate()
    payloads = [part(i) for i in range(parts)]
    ids = []
    for n in range(jobs):
        job = timed(
            samples,
            "create",
            partial(
                store.create,
                media_path=f"/data/jobs/uploads/{n}.mp4",
                owns_media=True,
                options={"window_s": WINDOW_S, "attribution": False, "filename": f"{n}.mp4"},
                media_seconds=None,
            ),
        )
        ids.append(job.id)
    for _ in range(jobs):
        job = timed(samples, "claim", partial(store.claim, OWNER, 30.0))
        assert job is not None
        for index, payload in enumerate(payloads):
            assert timed(samples, "renew", partial(store.renew, job.id, OWNER, 30.0))
            assert timed(
                samples,
                "add_segment (one part)",
                partial(store.add_segment, job.id, OWNER, index, payload),
            )
            assert timed(
                samples,
                "progress",
                partial(
                    store.progress, job.id, OWNER, done_seconds=(index + 1) * PART_S, stage="part"
                ),
            )
            timed(samples, "get", partial(store.get, job.id))
        assert timed(samples, "finish", partial(store.finish, job.id, OWNER, JobState.SUCCEEDED))
        stored = timed(samples, f"segments ({parts} parts)", partial(store.segments, job.id))
        assert len(stored) == parts
        timed(samples, "list (page of 50)", partial(store.list, limit=50, cursor=None))
    return samples


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--parts", type=int, default=60, help="parts per job (60 = one hour)")
    parser.add_argument("--postgres-url", help="an empty PostgreSQL database to use")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(f"sqlite:///{Path(folder) / 'jobs.db'}")
        try:
            results["SQLite"] = run(store, args.jobs, args.parts)
        finally:
            store.close()

    server = None
    url = args.postgres_url
    if url is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from pg import PostgresServer

        server = PostgresServer.start()
        url = server.create_database("bench")
    try:
        store = open_store(url)
        try:
            results["PostgreSQL"] = run(store, args.jobs, args.parts)
        finally:
            store.close()
    finally:
        if server is not None:
            server.stop()

    part_bytes = len(json.dumps(part(0)))
    backends = list(results)
    lines = [
        "## Job store: cost per call (`bench/job_store.py`)",
        "",
        f"One process, one thread; {args.jobs} jobs, each through create, claim, {args.parts} "
        f"parts (renew + add_segment of one {part_bytes / 1024:.1f} KiB part of 24 scored "
        "windows + progress, a get between), finish, then its segments and a page of the "
        f"list read back. {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f} (shared machine). SQLite: a WAL file in a temporary "
        "folder on local disk, "
        "synchronous=FULL (the default); PostgreSQL 15 on the same host over TCP, fsync off "
        "(the test server's settings). Milliseconds.",
        "",
        "| call | calls | " + " | ".join(f"{b} p50 | {b} p99" for b in backends) + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in backends) + " |",
    ]
    for name, values in results[backends[0]].items():
        cells = []
        for backend in backends:
            series = results[backend][name]
            cells.append(f"{statistics.median(series):.2f} | {p(series, 0.99):.2f}")
        lines.append(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
    per_job = {
        backend: sum(
            statistics.median(results[backend][name]) * args.parts
            for name in ("renew", "add_segment (one part)", "progress")
        )
        + statistics.median(results[backend]["claim"])
        + statistics.median(results[backend]["finish"])
        for backend in backends
    }
    lines.append("")
    hours = args.parts * PART_S / 3600.0
    shares = ", ".join(
        f"{b} {ms:.0f} ms ({ms / (hours * 3.6e6):.1e} of real time)" for b, ms in per_job.items()
    )
    lines.append(
        f"Store time a runner spends on {hours:g} h of media ({args.parts} parts: claim, "
        f"{args.parts} x renew + add_segment + progress, finish; medians): {shares}; "
        f"PostgreSQL / SQLite {per_job['PostgreSQL'] / per_job['SQLite']:.2f}x."
    )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(DOC, "job-store", text, append=True)


if __name__ == "__main__":
    main()
