"""Preprocessing speed: per-stage real-time factor on the shared clips and a 60 s talking clip.

    .venv/bin/python bench/preprocess.py [--repeats 2] [--seconds 60] [--checkpoint default]
                                         [--no-write]

The extractor is the one the service builds for ``--checkpoint`` (the embedded default:
text, Whisper encoder states and the face encoder, profile multimodal-v1). After its warm-up
each clip is extracted ``--repeats`` times; the table shows the median milliseconds of each
stage divided by the clip's duration (real-time factor, RTF: 0.15 means a 60 s clip takes
9 s). The 60 s clip is made by looping the shared talking-head clips
(CREMA-D and GRID, scaled to 480x360, H.264 + AAC in MP4) and removed afterwards. A second
table times the audio stage's pitch tracker, yin against pyin, on the same 60 s of audio.
The tables go to docs/PERFORMANCE.md between the ``preprocess`` markers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, write_section

SHARED = [
    "jfk.flac",
    "grid_bbaf2n.mp4",
    "cremad_1001_DFA_HAP_XX.mp4",
    "cremad_1001_DFA_ANG_XX.flv",
]
LOOP_SOURCES = [
    "cremad_1001_DFA_HAP_XX.mp4",
    "grid_bbaf2n.mp4",
    "cremad_1001_DFA_ANG_XX.mp4",
]
STAGES = ["decode", "asr", "text", "audio", "visual"]
TARGET_RTF = 0.15
DOC = DOCS / "PERFORMANCE.md"


def _decode_audio(path: Path, rate: int) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    with av.open(str(path)) as inp:
        for frame in inp.decode(audio=0):
            chunks.extend(c.to_ndarray().reshape(-1) for c in resampler.resample(frame))
    chunks.extend(c.to_ndarray().reshape(-1) for c in resampler.resample(None))
    return np.concatenate(chunks)


def make_talking_clip(path: Path, seconds: float) -> Path:
    """Loop the shared talking-head clips into one ``seconds`` long MP4 (H.264 + AAC)."""
    import av

    width, height, fps, rate = 480, 360, 25, 44_100
    n_frames = int(seconds * fps)
    audio_parts: list[np.ndarray] = []
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "veryfast", "crf": "23"}
        audio = out.add_stream("aac", rate=rate, layout="mono")
        frame_index = 0
        source = 0
        while frame_index < n_frames:
            name = LOOP_SOURCES[source % len(LOOP_SOURCES)]
            source += 1
            start_frame = frame_index
            with av.open(str(MEDIA / name)) as inp:
                for frame in inp.decode(video=0):
                    # Place the source's frames on a fixed 25 fps timeline.
                    t = float(frame.time or 0.0)
                    while start_frame + t * fps >= frame_index and frame_index < n_frames:
                        out_frame = frame.reformat(width=width, height=height, format="yuv420p")
                        out_frame.pts = frame_index
                        out_frame.time_base = Fraction(1, fps)
                        out.mux(video.encode(out_frame))
                        frame_index += 1
            # The source's audio, cut or padded to the frames it contributed.
            need = round((frame_index - start_frame) / fps * rate)
            part = _decode_audio(MEDIA / name, rate)[:need]
            audio_parts.append(np.pad(part, (0, need - len(part))))
        out.mux(video.encode(None))
        samples = np.concatenate(audio_parts).astype(np.float32)
        block = 1024
        for offset in range(0, len(samples), block):
            piece = samples[offset : offset + block][None, :]
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(piece), format="flt", layout="mono"
            )
            chunk.sample_rate = rate
            chunk.pts = offset
            chunk.time_base = Fraction(1, rate)
            out.mux(audio.encode(chunk))
        out.mux(audio.encode(None))
    return path


def time_clip(extractor, path: Path, repeats: int) -> tuple[float, dict[str, float], object]:  # type: ignore[no-untyped-def]
    runs = []
    bundle = None
    for _ in range(repeats):
        start = time.perf_counter()
        bundle = extractor.extract(path)
        total = (time.perf_counter() - start) * 1000.0
        runs.append({**bundle.timings_ms, "total": total})
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in [*STAGES, "total"]}
    assert bundle is not None
    return bundle.summary.duration_s, med, bundle


def pitch_table(path: Path) -> list[tuple[str, float, float]]:
    from preprocessing import ExtractorSettings
    from preprocessing.audio import acoustic_frames
    from preprocessing.media import decode_media

    audio = decode_media(path, ExtractorSettings(), audio=True, video=False).audio
    assert audio is not None
    seconds = len(audio) / 16_000
    rows = []
    for method in ("yin", "pyin"):
        acoustic_frames(audio[:32_000], method)  # compile
        start = time.perf_counter()
        acoustic_frames(audio, method)
        ms = (time.perf_counter() - start) * 1000.0
        rows.append((method, ms, ms / 1000.0 / seconds))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--checkpoint",
        default="default",
        help='whose extractor to time: "default" (the served one), "text-only", a checkpoint '
        'folder, or "none" (the plain default-v1 extractor)',
    )
    args = parser.parse_args()

    import torch

    from preprocessing import Extractor, ExtractorSettings

    load_before = os.getloadavg()[0]
    if args.checkpoint == "none":
        extractor = Extractor(ExtractorSettings())
    else:  # the extractor the service builds for that checkpoint
        from model import load_checkpoint_with_info
        from service.core.lifecycle import default_extractor
        from service.settings import ServiceSettings

        service = ServiceSettings(model_path=args.checkpoint)
        model, info = load_checkpoint_with_info(service.model_path)
        extractor = default_extractor(  # type: ignore[assignment]
            service, model.config.modalities, info.text_encoder, info.face_encoder
        )
    settings = extractor.settings
    start = time.perf_counter()
    warm = extractor.warmup()
    warm_s = time.perf_counter() - start

    rows = []
    with tempfile.TemporaryDirectory(prefix="cmamba-bench-") as tmp:
        long_clip = make_talking_clip(Path(tmp) / "talking.mp4", args.seconds)
        clips = [(name, MEDIA / name) for name in SHARED]
        clips.append((f"talking {args.seconds:.0f} s (looped, mp4)", long_clip))
        for label, path in clips:
            duration, med, bundle = time_clip(extractor, path, args.repeats)
            rows.append((label, duration, med, bundle.summary))
            print(label, f"{duration:.1f}s", {k: round(v) for k, v in med.items()}, flush=True)
        # The same long clip with every stage in the calling thread (no ASR overlap).
        sequential = Extractor(
            replace(settings, overlap_asr=False),
            text_encoder=extractor.text_encoder,
            recognizer=extractor.recognizer,
        )
        duration, med, bundle = time_clip(sequential, long_clip, args.repeats)
        rows.append((f"{clips[-1][0]}, ASR not overlapped", duration, med, bundle.summary))
        print(rows[-1][0], {k: round(v) for k, v in med.items()}, flush=True)
        pitch = pitch_table(long_clip)

    lines = [
        "### Preprocessing (`bench/preprocess.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s); shared with other work (load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after), so absolute times are "
        "noisy. Settings: grid "
        f"{settings.rate_hz:g} Hz, frames sampled at {settings.frame_rate_hz:g} fps (longer side "
        f"<= {settings.frame_max_side} px), ASR tiny.en int8 beam {settings.asr_beam_size} with "
        f"{settings.asr_threads} thread(s) and VAD, profile {settings.profile_name} (audio "
        f"features: {settings.audio_features}), F0 by {settings.f0_method}. Warm-up "
        f"(loads every model, compiles numba): {warm_s:.1f} s "
        f"({', '.join(f'{k} {v / 1000:.1f} s' for k, v in warm.items())}).",
        "",
        f"Real-time factor per stage after warm-up (median of {args.repeats} runs; stage time / "
        f"clip duration; target for the whole pipeline: <= {TARGET_RTF}). `total` is the wall "
        "time of `extract`: ASR runs on a helper thread beside the audio and visual stages, so "
        "the stages add up to more than the total; the last row runs them one after another.",
        "",
        "| clip | seconds | decode | asr | text | audio | visual | total | total ms "
        "| frames (face) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, duration, med, summary in rows:
        rtf = {k: v / 1000.0 / duration for k, v in med.items()}
        cells = " | ".join(f"{rtf[s]:.3f}" for s in STAGES)
        lines.append(
            f"| {label} | {duration:.1f} | {cells} | **{rtf['total']:.3f}** | "
            f"{med['total']:.0f} | {summary.frames} ({summary.frames_with_face}) |"
        )
    label, duration, med, _ = rows[-2]
    total_rtf = med["total"] / 1000.0 / duration
    verdict = "meets" if total_rtf <= TARGET_RTF else "misses"
    lines += [
        "",
        f"The {label} clip: {med['total'] / 1000:.2f} s for {duration:.0f} s of media, RTF "
        f"{total_rtf:.3f}, which {verdict} the {TARGET_RTF} target "
        f"({total_rtf / TARGET_RTF:.2f}x the budget).",
        "",
        "Where the time goes (sequential run of the same clip): "
        + ", ".join(
            f"{stage} {rows[-1][2][stage] / 1000:.2f} s "
            f"({100 * rows[-1][2][stage] / max(rows[-1][2]['total'], 1e-9):.0f} %)"
            for stage in STAGES
        )
        + ". Overlapping ASR with the audio and visual stages only pays when a second core is "
        f"free; the load average during this run was {load_before:.1f} on {os.cpu_count()} "
        "cores.",
        "",
        "Whisper reads audio in 30 s windows, so a clip of 2 s pays for a whole window: the "
        "short clips' ASR time is close to that of a 30 s clip, and their RTF is not "
        "comparable with the 60 s clip's.",
        "",
        "Pitch tracker inside the audio stage (the whole CH-SIMS frame recipe, 60 s of audio):",
        "",
        "| F0 method | ms | RTF |",
        "| --- | ---: | ---: |",
        *[f"| {m} | {ms:.0f} | {rtf:.3f} |" for m, ms, rtf in pitch],
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(DOC, "preprocess", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
