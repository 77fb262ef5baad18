"""Streaming speech recognition against offline recognition on the shared clips.

    nice .venv/bin/python bench/stream_asr.py [--write-docs]

Each clip is played into a text-only :class:`preprocessing.live.LiveExtractor` in 0.5 s pieces
with ``ready()`` after each piece (``finish()`` at the end), for a few
:class:`preprocessing.live.LiveAsrSettings`. Reported per setting: word error rate against the
offline extractor's transcript of the same audio and against the clip's reference transcript
(../shared/media/SOURCES.md), and the word delay: from a word's end in the audio to the moment
the stream's recognition thread committed it (the stream time of the ``ready()`` call that
handed it the audio, plus that call's compute and the pass, as if the stream were played in real
time; the words are taken by the next call). "all" is one stream of every clip back to back
with 1 s of silence between them (28 s); words emitted only by ``finish()`` are counted with the
end of the stream. CPU: the recognition's wall time per second of audio (one thread).

With ``--write-docs`` the table replaces the section "stream-asr" of docs/STREAMING.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, write_section  # noqa: E402

DOC = DOCS / "STREAMING.md"
SR = 16_000
PIECE_S = 0.5
# Reference transcripts (SOURCES.md of the shared media).
CLIPS = {
    "jfk.flac": "And so my fellow Americans, ask not what your country can do for you, ask what "
    "you can do for your country.",
    "grid_bbaf2n.mp4": "bin blue at f two now",
    "cremad_1001_DFA_HAP_XX.mp4": "Don't forget a jacket",
    "cremad_1001_DFA_ANG_XX.mp4": "Don't forget a jacket",
}
NUMBERS = {"2": "two", "f2": "f two"}


@dataclass(frozen=True)
class Setting:
    name: str
    window_s: float
    step_s: float
    guard_s: float
    vad: bool


SETTINGS = [
    Setting("VAD utterances, step 1 s (default)", 8.0, 1.0, 1.0, True),
    Setting("VAD utterances, step 0.5 s, guard 0.5 s", 5.0, 0.5, 0.5, True),
    Setting("sliding window 8 s, step 1 s, guard 1 s", 8.0, 1.0, 1.0, False),
]


def normalise(text: str) -> list[str]:
    out: list[str] = []
    for raw in text.lower().replace("-", " ").split():
        word = raw.strip(".,!?;:\"'")
        out.extend(NUMBERS.get(word, word).split())
    return [w for w in out if w]


def errors(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance."""
    d = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        prev, d[0] = d[:], i
        for j, h in enumerate(hypothesis, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return d[-1]


def stream(extractor, audio: np.ndarray, setting: Setting) -> tuple[list[str], list[float], float]:  # type: ignore[no-untyped-def]
    """Play ``audio``; returns the words, each word's delay and the total compute seconds."""
    from preprocessing.live import LiveAsrSettings, LiveExtractor

    asr = LiveAsrSettings(
        window_s=setting.window_s, step_s=setting.step_s, guard_s=setting.guard_s, vad=setting.vad
    )
    live = LiveExtractor(extractor, sample_rate=SR, asr=asr)
    step = int(PIECE_S * SR)
    words: list[str] = []
    delays: list[float] = []
    compute = 0.0
    available = 0.0  # when the words the next ready() takes were committed (played in real time)
    for start in range(0, len(audio) + step, step):
        piece = audio[start : start + step]
        final = start + step >= len(audio) + step
        if len(piece):
            live.push_audio(piece)
        now = min(start + step, len(audio)) / SR
        began = time.perf_counter()
        rows = live.finish() if final else live.ready()
        # Recognition runs on the stream's own thread: the pass this call handed audio to
        # counts with the call, and its words are taken by the next call.
        while live.recognising:
            time.sleep(0.002)
        spent = time.perf_counter() - began
        compute += spent
        for word in rows.words:
            words.append(word.text)
            delays.append((now + spent if final else available) - word.end_s)
        available = now + spent
        if final:
            break
    return words, delays, compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    from preprocessing import Extractor, ExtractorSettings
    from preprocessing.media import decode_media

    extractor = Extractor(ExtractorSettings(), modalities=("text",))
    extractor.warmup()
    clips: dict[str, tuple[np.ndarray, list[str], list[str]]] = {}
    gap = np.zeros(SR, np.float32)
    joined: list[np.ndarray] = []
    for name, reference in CLIPS.items():
        decoded = decode_media(MEDIA / name, extractor.settings, audio=True, video=False)
        assert decoded.audio is not None
        offline = extractor.extract(MEDIA / name).summary.transcript or ""
        clips[name] = (decoded.audio, normalise(offline), normalise(reference))
        joined += [decoded.audio, gap]
    all_audio = np.concatenate(joined[:-1])
    all_offline = extractor.recognizer.transcribe(all_audio).text
    clips["all"] = (
        all_audio,
        normalise(all_offline),
        [w for name in CLIPS for w in normalise(CLIPS[name])],
    )

    lines = [
        f"Measured by `bench/stream_asr.py` on {platform.machine()} ({os.cpu_count()} cores, "
        f"shared), faster-whisper tiny.en int8, one thread, {PIECE_S} s pieces.",
        "",
        "| setting | clip | words | WER vs offline | WER vs reference | offline WER vs "
        "reference | delay p50 (s) | delay max (s) | CPU s per audio s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in SETTINGS:
        for name, (audio, offline, reference) in clips.items():
            words, delays, compute = stream(extractor, audio, setting)
            hyp = normalise(" ".join(words))
            row = (
                f"| {setting.name} | {name} | {len(hyp)} "
                f"| {errors(offline, hyp) / max(len(offline), 1):.2f} "
                f"| {errors(reference, hyp) / len(reference):.2f} "
                f"| {errors(reference, offline) / len(reference):.2f} "
                f"| {np.median(delays) if delays else float('nan'):.2f} "
                f"| {max(delays) if delays else float('nan'):.2f} "
                f"| {compute / (len(audio) / SR):.2f} |"
            )
            print(row, flush=True)
            lines.append(row)
    table = "\n".join(lines)
    print()
    print(table)
    if args.write_docs:
        write_section(DOC, "stream-asr", table, append=True)


if __name__ == "__main__":
    main()
