"""Long recordings as jobs: real-time factor, peak memory, and what a job costs online requests.

    .venv/bin/python bench/jobs.py [--minutes 60] [--requests 30] [--no-write]

Makes a ``--minutes`` long talking-head recording (a 60 s clip looped from the shared clips,
H.264 + AAC, then copied ``--minutes`` times into one Matroska file: nothing is re-encoded, so
the file costs seconds), starts ``cmamba serve`` on the embedded default checkpoint (text, voice
and face; 1 torch thread; the recording in its import folder) and measures:

1. ``/v1/predict`` of a 10 s talking clip, ``--requests`` times one after another, with no job;
2. the same while a job analyses the recording (requests stop when the job ends);
3. the job's real-time factor (media seconds / run seconds) and the server's peak resident
   memory (VmHWM) before and after the job.

The table goes to docs/PERFORMANCE.md between the ``jobs`` markers. On the shared 2-core
machine a 60-minute run takes tens of minutes: use ``--minutes 10`` there and say so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, write_section
from bench.load import Server
from bench.preprocess import make_talking_clip

DOC = DOCS / "PERFORMANCE.md"


def loop_recording(source: Path, out: Path, times: int) -> float:
    """Copy ``source``'s packets ``times`` times back to back into a Matroska file; its
    duration in seconds."""
    import av

    with av.open(str(source)) as probe:
        period = float(probe.duration) / 1_000_000
    with av.open(str(out), "w", format="matroska") as sink:
        targets: dict[int, Any] = {}
        for k in range(times):
            with av.open(str(source)) as src:
                streams = [s for s in (*src.streams.video, *src.streams.audio)]
                for s in streams:
                    if s.index not in targets:
                        targets[s.index] = sink.add_stream_from_template(s)
                for packet in src.demux(*streams):
                    if packet.pts is None or packet.dts is None:
                        continue
                    shift = round(k * period / packet.time_base)
                    packet.pts += shift
                    packet.dts += shift
                    packet.stream = targets[packet.stream.index]
                    sink.mux(packet)
    return period * times


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def predict_latencies(
    url: str, clip: bytes, count: int, until: threading.Event | None
) -> list[float]:
    """Wall seconds of ``/v1/predict`` requests, one at a time (stops early once ``until``)."""
    seconds = []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(count):
            if until is not None and until.is_set():
                break
            started = time.perf_counter()
            answer = client.post("/v1/predict", files={"file": ("talk.mp4", clip, "video/mp4")})
            answer.raise_for_status()
            seconds.append(time.perf_counter() - started)
    return seconds


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--part-s", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from model.checkpoints import default_checkpoint_path

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cmamba-jobs-bench-") as tmp_name:
        tmp = Path(tmp_name)
        inbox = tmp / "inbox"
        inbox.mkdir()
        started = time.perf_counter()
        minute = make_talking_clip(tmp / "minute.mp4", 60.0)
        media_s = loop_recording(minute, inbox / "recording.mkv", args.minutes)
        make_s = time.perf_counter() - started
        clip = make_talking_clip(tmp / "talk10.mp4", 10.0).read_bytes()
        print(f"recording: {media_s:.0f} s ({(inbox / 'recording.mkv').stat().st_size / 1e6:.0f} "
              f"MB) made in {make_s:.1f} s")  # fmt: skip

        server = Server(
            default_checkpoint_path(),
            {
                "CMAMBA_TORCH_THREADS": "1",
                "CMAMBA_JOBS_DIR": str(tmp / "jobs"),
                "CMAMBA_JOBS_IMPORT_DIR": str(inbox),
                "CMAMBA_JOBS_PART_S": str(args.part_s),
                "CMAMBA_JOBS_MAX_MEDIA_HOURS": "24",
            },
            [],
        )
        try:
            server.wait_ready()
            pid = server.proc.pid
            predict_latencies(server.url, clip, 2, None)  # warm-up
            alone = predict_latencies(server.url, clip, args.requests, None)
            rss_before = vm_kib(pid, "VmHWM:")
            answer = httpx.post(f"{server.url}/v1/jobs", json={"path": "recording.mkv"})
            answer.raise_for_status()
            location = server.url + answer.headers["location"]
            while httpx.get(location).json()["state"] == "queued":
                time.sleep(0.2)
            done = threading.Event()
            status: dict[str, Any] = {}

            def watch() -> None:
                while True:
                    status.update(httpx.get(location, timeout=30).json())
                    if status["state"] not in ("queued", "running"):
                        done.set()
                        return
                    time.sleep(1.0)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            during = predict_latencies(server.url, clip, args.requests, done)
            watcher.join()
            rss_after = vm_kib(pid, "VmHWM:")
        finally:
            server.stop()
    if status.get("state") != "succeeded":
        print("the job did not succeed:", status)
        return 1
    run_s = float(status["timings"]["run_s"])
    rtf = run_s / media_s
    rows = {
        "no job": alone,
        "a job running": during,
    }
    lines = [
        "### Long recordings as jobs (`bench/jobs.py`)",
        "",
        f"A {args.minutes}-minute talking-head recording (a 60 s clip of the shared clips looped "
        f"by packet copy, H.264 + AAC in Matroska; made in {make_s:.0f} s) analysed as one job "
        f"(`POST /v1/jobs` with an import-folder `path`, parts of {args.part_s:g} s) by a real "
        "`cmamba serve` on the embedded default checkpoint (text, voice and face; 1 torch "
        f"thread; one job worker), 2 CPU cores shared with other work (load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after). Meanwhile `/v1/predict` of "
        "a 10 s talking clip, one request at a time.",
        "",
        "| job | media | run time | real-time factor (run / media) | peak RSS before the job | "
        "peak RSS after |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.minutes} min | {media_s:.0f} s | {run_s:.0f} s | **{rtf:.3f}** | "
        f"{rss_before / 1024:.0f} MiB | {rss_after / 1024:.0f} MiB |",
        "",
        "| `/v1/predict` (10 s clip) | requests | p50 | p99 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, values in rows.items():
        lines.append(
            f"| {label} | {len(values)} | {quantile(values, 0.5) * 1000:.0f} ms | "
            f"**{quantile(values, 0.99) * 1000:.0f} ms** |"
        )
    ratio = quantile(during, 0.99) / quantile(alone, 0.99)
    lines += [
        "",
        f"p99 with a job running / without: **{ratio:.2f}x**. The job's clips wait in the "
        "micro-batcher's background queue while online clips are queued, and its parts are "
        "extracted on a pool of their own at a raised nice value, so online requests never "
        "queue behind it; what is left is the two cores shared between the job's extraction "
        "(speech recognition's own threads are not niced) and the requests'. Memory "
        "stays that of one part: the peak grows by "
        f"{(rss_after - rss_before) / 1024:.0f} MiB over the warmed-up server for the whole "
        "recording.",
    ]
    if args.minutes < 60:
        lines += [
            "",
            f"Run with `--minutes {args.minutes}` on the shared 2-core machine; the 60-minute "
            "run is `.venv/bin/python bench/jobs.py --minutes 60` (at this real-time factor, "
            f"about {rtf * 60:.0f} minutes of job time).",
        ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(DOC, "jobs", text, append=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
