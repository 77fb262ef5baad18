"""End to end: ``POST /v1/predict`` of talking clips on a real server, default vs text-only.

    .venv/bin/python bench/predict_e2e.py [--repeats 3] [--no-write]

Starts ``cmamba serve`` on the embedded default checkpoint (text, voice and face) and, side by
side in the same run, on the text-only checkpoint; sends a 10 s and a 60 s talking-head clip
(looped from the shared clips, H.264 + AAC) ``--repeats`` times each, one at a time, after one
warm-up request; reports the median wall time seen by the client, the server's stage timings
and the checkpoint folder sizes. Targets: 10 s clip <= 1.0 s end to end on 2 CPU cores (all
three modalities), preprocessing of a 60 s clip <= 0.15 x real time. The table goes to
docs/PERFORMANCE.md between the ``predict-e2e`` markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, write_section
from bench.load import Server
from bench.preprocess import make_talking_clip

DOC = DOCS / "PERFORMANCE.md"
STAGES = ("decode", "asr", "text", "audio", "visual", "queue", "model", "total")
TARGET_10S, TARGET_RTF = 1.0, 0.15


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def run(checkpoint: Path, clips: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    server = Server(checkpoint, {"CMAMBA_TORCH_THREADS": "1"}, [])
    try:
        server.wait_ready()
        out = {}
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for label, path in clips.items():
                data = path.read_bytes()
                rows = []
                for i in range(repeats + 1):
                    start = time.perf_counter()
                    response = client.post(
                        "/v1/predict", files={"file": (path.name, data, "video/mp4")}
                    )
                    wall = (time.perf_counter() - start) * 1000.0
                    response.raise_for_status()
                    if i:  # the first request warms caches
                        rows.append({**response.json()["timings_ms"], "wall": wall})
                    used = response.json()["modalities"]["used"]
                out[label] = {k: statistics.median(r.get(k, 0.0) for r in rows)
                              for k in (*STAGES, "wall")}  # fmt: skip
                out[label]["used"] = len(used)
                print(checkpoint.name, label, {k: round(v) for k, v in out[label].items()})
        return out
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from model.checkpoints import default_checkpoint_path, text_only_checkpoint_path

    checkpoints = {"default": default_checkpoint_path(), "text-only": text_only_checkpoint_path()}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cmamba-e2e-") as tmp:
        clips = {
            "10 s": make_talking_clip(Path(tmp) / "talk10.mp4", 10.0),
            "60 s": make_talking_clip(Path(tmp) / "talk60.mp4", 60.0),
        }
        results = {name: run(path, clips, args.repeats) for name, path in checkpoints.items()}
    seconds = {"10 s": 10.0, "60 s": 60.0}
    lines = [
        "### End to end (`bench/predict_e2e.py`)",
        "",
        f"`POST /v1/predict` on a real `cmamba serve` (1 torch thread), one request at a time, "
        f"median of {args.repeats} after a warm-up request; {os.cpu_count()} CPU cores, load "
        f"average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after (shared machine: "
        "compare the rows of one run, not absolute times across runs). Milliseconds; ASR "
        "runs beside the audio and visual stages, so the stages add up to more than the total; "
        "`preprocess RTF` = (server total - queue - model) / clip seconds.",
        "",
        "| checkpoint | clip | modalities | decode | asr | text | audio | visual | model "
        "| server total | client wall | preprocess RTF |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in results.items():
        for label, r in rows.items():
            rtf = (r["total"] - r["queue"] - r["model"]) / 1000.0 / seconds[label]
            lines.append(
                f"| {name} | {label} | {int(r['used'])} | "
                + " | ".join(f"{r[s]:.0f}" for s in ("decode", "asr", "text", "audio", "visual"))
                + f" | {r['model']:.0f} | {r['total']:.0f} | **{r['wall']:.0f}** | {rtf:.3f} |"
            )
    ten = results["default"]["10 s"]["wall"] / 1000.0
    sixty = results["default"]["60 s"]
    rtf60 = (sixty["total"] - sixty["queue"] - sixty["model"]) / 1000.0 / 60.0
    ratio = results["default"]["10 s"]["wall"] / results["text-only"]["10 s"]["wall"]
    lines += [
        "",
        f"Default (three modalities), 10 s clip: {ten:.2f} s end to end, "
        f"{'meets' if ten <= TARGET_10S else 'misses'} the {TARGET_10S:.1f} s target; "
        f"{ratio:.2f}x the text-only checkpoint's time on the same clip. 60 s clip: "
        f"preprocessing {rtf60:.3f} x real time, {'meets' if rtf60 <= TARGET_RTF else 'misses'} "
        f"the {TARGET_RTF} target. Checkpoint folders: default "
        f"{folder_mb(checkpoints['default']):.1f} MB (target <= 25 MB), text-only "
        f"{folder_mb(checkpoints['text-only']):.1f} MB.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(DOC, "predict-e2e", table, append=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
