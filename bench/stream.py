"""Live streams (``WS /v1/stream``): concurrency at real time, memory over a long stream, and
the cost of an update against rescoring the growing window.

    .venv/bin/python bench/stream.py [--seconds 20] [--max-streams 4] [--long-minutes 10]
                                     [--interval 1.0] [--no-write]

1. Concurrency: ``cmamba serve`` on the embedded default checkpoint (text, voice, face; live
   features by ``preprocessing.live``); N clients (``service.stream_client``) each play a
   speech clip looped to ``--seconds`` at real-time pace, audio only and audio + video (JPEG
   frames of a talking-head clip). N = 1, 2, ... while every stream keeps up with real time.
   Reports lag p50 / p99 (of the answer with its provisional rows, and of the committed
   answer alone, from the same updates) and update latency p50 / p99 over the updates after
   the first ``WARMUP_S`` seconds of audio.
2. Memory: one audio-only stream of ``--long-minutes`` sent as fast as the server takes it;
   the server's RSS sampled at each update, the slope (least squares, MiB per minute of
   stream) over the second half.
3. Rescoring: in this process, the default checkpoint's streaming step on 1 s of new rows
   (10) from the carried state, against ``forward`` on the whole window at 1, 5 and 10
   minutes (what ``/v1/predict/features`` on the growing window runs every second, before
   its JSON body: 4.7 MB at 1 minute), median of ``--repeats``.

The tables go to docs/PERFORMANCE.md between the ``stream`` markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, write_section
from bench.load import Server

DOC = DOCS / "PERFORMANCE.md"
SPEECH = "jfk.flac"
TALKING = "cremad_1001_DFA_HAP_XX.mp4"
WARMUP_S = 3.0
LAG_LIMIT_S = 1.0


def looped(media_audio: np.ndarray, frames: list[tuple[np.ndarray, float]], clip_s: float,
           seconds: float) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:  # fmt: skip
    """Audio and frames of a clip repeated to ``seconds``."""
    repeats = int(np.ceil(seconds / clip_s))
    audio = np.tile(media_audio, repeats)[: int(seconds * 16_000)]
    out = [
        (f, t + k * clip_s) for k in range(repeats) for f, t in frames if t + k * clip_s < seconds
    ]
    return audio, out


def decode(name: str, video: bool) -> tuple[np.ndarray, list[tuple[np.ndarray, float]], float]:
    from preprocessing import ExtractorSettings
    from preprocessing.media import decode_media

    frames: list[tuple[np.ndarray, float]] = []
    media = decode_media(MEDIA / name, ExtractorSettings(), audio=True, video=video,
                         on_frame=lambda rgb, t: frames.append((rgb, t)))  # fmt: skip
    assert media.audio is not None
    return media.audio, frames, media.audio_seconds


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_streams(url: str, n: int, audio: np.ndarray, frames: list[Any], fast: bool = False,
                interval: float = 1.0, on_update: Any = None) -> list[dict[str, Any]]:  # fmt: skip
    """N clients at once; every update of every stream (with its stream index)."""
    from service.stream_client import StreamClient, play_media

    updates: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        def seen(message: dict[str, Any]) -> None:
            if message.get("type") == "update":
                with lock:
                    updates.append({**message, "stream": index})
                if on_update is not None:
                    on_update(message)

        try:
            with StreamClient(url, video=bool(frames), update_interval_s=interval,
                              on_message=seen) as client:  # fmt: skip
                play_media(client, audio, frames, fast=fast)
                client.stop(timeout=600)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return updates


def concurrency(url: str, seconds: float, max_streams: int,
                interval: float = 1.0) -> list[dict[str, Any]]:  # fmt: skip
    speech, _, speech_s = decode(SPEECH, video=False)
    talking, frames, talking_s = decode(TALKING, video=True)
    modes = {
        "audio": looped(speech, [], speech_s, seconds),
        "audio + video": looped(talking, frames, talking_s, seconds),
    }
    rows = []
    for mode, (audio, mode_frames) in modes.items():
        for n in range(1, max_streams + 1):
            updates = run_streams(url, n, audio, mode_frames, interval=interval)
            late = [u for u in updates if u["received_s"] >= WARMUP_S]
            lags = [u["lag_s"] for u in late]
            # The committed answer alone (the final rows): what every update was before
            # provisional rows, from the same updates.
            committed = [u.get("committed_lag_s", u["lag_s"]) for u in late]
            tail = [u.get("provisional_s", 0.0) for u in late]
            latency = [u["latency_ms"] for u in late]
            row = {"mode": mode, "streams": n, "updates": len(late),
                   "lag_p50": pct(lags, 50), "lag_p99": pct(lags, 99),
                   "committed_p50": pct(committed, 50), "committed_p99": pct(committed, 99),
                   "provisional_p50": pct(tail, 50),
                   "lat_p50": pct(latency, 50), "lat_p99": pct(latency, 99),
                   "dropped": sum(u["dropped_frames"] for u in updates)}  # fmt: skip
            row["under_1s"] = bool(lags) and row["lag_p99"] < LAG_LIMIT_S
            row["committed_under_1s"] = bool(lags) and row["committed_p99"] < LAG_LIMIT_S
            row["ok"] = keeps_up(late, n)
            rows.append(row)
            print(row, flush=True)
            if not row["ok"]:
                break
    return rows


def keeps_up(updates: list[dict[str, Any]], n: int) -> bool:
    """Every stream's lag stays bounded: the median lag of its last third of updates is at
    most 0.5 s above that of its first third (a server behind real time falls further behind
    with every update)."""
    for index in range(n):
        lags = [u["lag_s"] for u in updates if u["stream"] == index]
        if len(lags) < 3:
            return False
        third = len(lags) // 3
        if statistics.median(lags[-third:]) > statistics.median(lags[:third]) + 0.5:
            return False
    return True


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def long_stream(url: str, pid: int, minutes: float, chunk_s: float = 5.0) -> dict[str, Any]:
    """One audio stream of ``minutes``, sent as fast as the server takes it: a chunk of
    ``chunk_s`` seconds, then wait for the update that has received it (at most 20 s)."""
    from service.stream_client import StreamClient

    speech, _, speech_s = decode(SPEECH, video=False)
    audio, _ = looped(speech, [], speech_s, minutes * 60)
    samples: list[tuple[float, float]] = []
    received = threading.Condition()
    last_received = [0.0]

    def seen(message: dict[str, Any]) -> None:
        if message.get("type") == "update":
            samples.append((message["stream_time_s"], rss_mib(pid)))
            with received:
                last_received[0] = message["received_s"]
                received.notify_all()

    started = time.perf_counter()
    step = int(chunk_s * 16_000)
    with StreamClient(url, update_interval_s=chunk_s, on_message=seen) as client:
        for first in range(0, len(audio), step):
            for piece in range(first, min(first + step, len(audio)), 8000):
                client.send_audio(audio[piece : min(piece + 8000, first + step)])
            sent_s = min(first + step, len(audio)) / 16_000
            with received:
                received.wait_for(lambda s=sent_s: last_received[0] >= s - 1e-6, timeout=20)
        client.stop(timeout=600)
    wall = time.perf_counter() - started
    half = [(t, r) for t, r in samples if t >= samples[-1][0] / 2]
    slope = float(np.polyfit([t / 60 for t, _ in half], [r for _, r in half], 1)[0])
    return {"minutes": minutes, "wall_s": wall, "updates": len(samples),
            "rss_first": samples[0][1], "rss_half": half[0][1], "rss_last": samples[-1][1],
            "slope": slope}  # fmt: skip


def rescoring(repeats: int) -> list[dict[str, Any]]:
    import torch

    from model import load_checkpoint
    from model.checkpoints import default_checkpoint_path

    torch.set_num_threads(1)
    model = load_checkpoint(default_checkpoint_path(), device="cpu")
    dims = model.config.feature_dims
    rng = torch.Generator().manual_seed(0)

    def inputs(length: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        features = {m: torch.randn(1, length, d, generator=rng) for m, d in dims.items()}
        return features, {m: torch.ones(1, length, dtype=torch.bool) for m in dims}

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    step_f, step_m = inputs(10)
    rows = []
    with torch.inference_mode():
        state = model.init_stream_state(1)
        for _ in range(3):  # a state that has seen some stream
            _, state = model.step(step_f, step_m, state)
        step_ms = timed(lambda: model.step(step_f, step_m, state))
        for minutes in (1, 5, 10):
            features, masks = inputs(minutes * 600)
            window_ms = timed(lambda f=features, m=masks: model(f, m))
            rows.append({"minutes": minutes, "rows": minutes * 600, "step_ms": step_ms,
                         "window_ms": window_ms, "ratio": window_ms / step_ms,
                         "state_kb": state.nbytes() / 1024})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def render(conc: list[dict[str, Any]], long: dict[str, Any], rescore: list[dict[str, Any]],
           seconds: float, load: tuple[float, float], interval: float = 1.0) -> str:  # fmt: skip
    lines = [
        "### Live streams (`bench/stream.py`)",
        "",
        f"`cmamba serve` on the default checkpoint (text, voice, face; live features by "
        f"`preprocessing.live`, 1 torch thread, 2 live-feature threads), clients of "
        f"`service.stream_client` in the same machine; 2 CPU cores shared with other work "
        f"(load average {load[0]:.1f} before, {load[1]:.1f} after: compare rows of one run). "
        f"Each stream plays {seconds:.0f} s at real-time pace with an update every "
        f"{interval:g} s: audio only ({SPEECH} looped) or audio + video ({TALKING} looped, JPEG "
        f"frames at the extractor's 5 frames/s). Lag = the update's `lag_s`: audio received "
        f"when the update is made minus the stream time its answer covers, provisional rows "
        f"included (docs/STREAMING.md); committed lag = the same for the final rows alone "
        f"(`committed_lag_s`: what every update was before provisional rows), read from the "
        f"same updates; provisional = seconds of the answer from provisional rows; latency = "
        f"an update's own compute (live features + committed and provisional model steps). "
        f"Statistics over updates after the first {WARMUP_S:.0f} s of audio.",
        "",
        "| mode | streams | updates | lag p50 (s) | lag p99 (s) | committed lag p50 (s) | "
        "committed lag p99 (s) | provisional p50 (s) | latency p50 (ms) | latency p99 (ms) | "
        "frames dropped | lag p99 < 1 s | committed lag p99 < 1 s | keeps up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- "
        "| --- |",
    ]
    yes = {True: "yes", False: "no"}
    for r in conc:
        lines.append(
            f"| {r['mode']} | {r['streams']} | {r['updates']} | {r['lag_p50']:.2f} | "
            f"{r['lag_p99']:.2f} | {r['committed_p50']:.2f} | {r['committed_p99']:.2f} | "
            f"{r['provisional_p50']:.2f} | {r['lat_p50']:.0f} | {r['lat_p99']:.0f} | "
            f"{r['dropped']} | {yes[r['under_1s']]} | {yes[r['committed_under_1s']]} | "
            f"{yes[r['ok']]} |"
        )
    lines.append("")
    for mode in ("audio", "audio + video"):
        ok = [r["streams"] for r in conc if r["mode"] == mode and r["ok"]]
        under = [r["streams"] for r in conc if r["mode"] == mode and r["under_1s"]]
        before = [r["streams"] for r in conc if r["mode"] == mode and r["committed_under_1s"]]
        tried = max(r["streams"] for r in conc if r["mode"] == mode)
        most = " (the most this run tried)" if ok and max(ok) == tried else ""
        lines.append(f"- {mode}: kept up with real time (lag not growing) at "
                     f"**{max(ok) if ok else 0}** concurrent stream(s){most}; lag p99 under 1 s "
                     f"at **{max(under) if under else 0}** (committed answer alone: "
                     f"{max(before) if before else 0}).")  # fmt: skip
    lines += [
        "",
        "`keeps up`: every stream's median lag over its last third of updates is at most "
        "0.5 s above its first third's. Committed lag counts every row not yet final, so it "
        "includes the live features' own delay (a text row waits until its words are "
        "recognised and committed at a pause, docs/STREAMING.md); lag counts only the rows "
        "not in the answer at all: audio that arrived while the update was computed, the "
        "part of the last 0.1 s step not yet complete, and the server's backlog.",
    ]
    lines += [
        "",
        f"Memory over one long stream: {long['minutes']:.0f} minutes of speech sent as fast "
        f"as the server takes it (5 s chunks, each sent once the previous one was scored; "
        f"took {long['wall_s']:.0f} s, {long['updates']} updates); server RSS "
        f"{long['rss_first']:.0f} MiB at the first update, "
        f"{long['rss_half']:.0f} MiB at half, {long['rss_last']:.0f} MiB at the end; slope "
        f"over the second half **{long['slope']:+.2f} MiB per minute of stream**. The model "
        f"state of a stream is a fixed {rescore[0]['state_kb']:.0f} KiB (`StreamState.nbytes`), "
        "whatever its length.",
        "",
        "Cost of an update against rescoring the growing window every second (the default "
        "checkpoint in one process, 1 torch thread, median of the repeats): the streaming "
        "step runs the model on the 10 new rows from the carried state; the alternative runs "
        "`forward` on the whole window, as `/v1/predict/features` would (before its JSON "
        "body, which also grows: 4.7 MB at 1 minute, and beyond the default "
        "`CMAMBA_MAX_SEQUENCE_LENGTH` of 2048 rows from 3.4 minutes on).",
        "",
        "| stream length | window rows | streaming step (ms) | rescore window (ms) | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rescore:
        lines.append(f"| {r['minutes']} min | {r['rows']} | {r['step_ms']:.1f} | "
                     f"{r['window_ms']:.1f} | **{r['ratio']:.0f}x** |")  # fmt: skip
    lines += ["", f"Run: `{' '.join(['bench/stream.py', *sys.argv[1:]])}`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-streams", type=int, default=4)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0,
                        help="update interval of the concurrency streams (s)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rescore = rescoring(args.repeats)
    from model.checkpoints import default_checkpoint_path

    server = Server(default_checkpoint_path(),
                    {"CMAMBA_TORCH_THREADS": "1", "CMAMBA_STREAM_MAX_STREAMS": "16",
                     "CMAMBA_STREAM_IDLE_TIMEOUT_S": "120"}, [])  # fmt: skip
    try:
        server.wait_ready()
        url = server.url.replace("http://", "ws://") + "/v1/stream"
        conc = concurrency(url, args.seconds, args.max_streams, args.interval)
        long = long_stream(url, server.proc.pid, args.long_minutes)
        print(long, flush=True)
    finally:
        server.proc.terminate()
        server.proc.wait(60)
    text = render(conc, long, rescore, args.seconds, (load_before, os.getloadavg()[0]),
                  args.interval)  # fmt: skip
    print(text)
    if not args.no_write:
        write_section(DOC, "stream", text, append=True)


if __name__ == "__main__":
    main()
