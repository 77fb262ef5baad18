"""Which audio feature carries sentiment: three candidates measured on RAVDESS speech.

    nice .venv/bin/python bench/audio_features.py [--ravdess DIR] [--cache DIR] [--write-docs]

Candidates, each put on the 10 Hz grid and pooled per clip (mean and standard deviation over the
steps that hold sound, by the extractor's silence rule):

- ``librosa-33``: the current CH-SIMS recipe, ``preprocessing.audio.audio_on_grid``;
- ``egemaps-lld-25``: openSMILE 2.6.0 eGeMAPSv02 low-level descriptors (10 ms frames);
- ``whisper-enc-384``: the tiny.en encoder states of the ASR model,
  ``preprocessing.speech_states`` (one encoder pass per 30 s window).

Protocol: speaker-independent, 6 folds of 4 whole actors held out; standardised features and a
logistic regression (C=1, class-balanced). Metrics: AUC of positive (happy) against negative
(sad, angry, fearful, disgust); 3-class sentiment accuracy (negative / neutral+calm / positive,
surprised left out) and its balanced accuracy; CPU cost in ms per second of audio with one
thread on 10 s and 30 s of speech; and whether the CREMA-D happy clip scores above the angry one
(same actor and sentence) when the binary model is trained on all of RAVDESS.
Per-clip pooled features are cached under ``--cache`` (not in the repository).
With ``--write-docs`` the table replaces the section "Audio feature choice (measured)" of
docs/FEATURES.md (between its ``audio-choice`` markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, before numpy loads its BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, data_dir, write_section  # noqa: E402

DOC = DOCS / "FEATURES.md"
HAPPY_CLIP = "cremad_1001_DFA_HAP_XX.mp4"
ANGRY_CLIP = "cremad_1001_DFA_ANG_XX.mp4"
EMOTIONS = {
    1: "neutral",
    2: "calm",
    3: "happy",
    4: "sad",
    5: "angry",
    6: "fearful",
    7: "disgust",
    8: "surprised",
}
NEGATIVE = {4, 5, 6, 7}
POSITIVE = {3}
NEUTRAL = {1, 2}
CANDIDATES = ("librosa-33", "egemaps-lld-25", "whisper-enc-384")
RATE_HZ = 10.0


# -- features ---------------------------------------------------------------------------------


class Featurizer:
    """Grid features ``(L, F)`` and mask ``(L,)`` of 16 kHz audio for one candidate."""

    def __init__(self, name: str) -> None:
        from preprocessing.settings import ExtractorSettings

        self.name = name
        self.settings = ExtractorSettings(asr_threads=1)
        self._smile = None
        self._recognizer = None
        if name == "egemaps-lld-25":
            import opensmile

            self._smile = opensmile.Smile(
                feature_set=opensmile.FeatureSet.eGeMAPSv02,
                feature_level=opensmile.FeatureLevel.LowLevelDescriptors,
                num_workers=1,
            )
        elif name == "whisper-enc-384":
            from preprocessing.asr import SpeechRecognizer

            self._recognizer = SpeechRecognizer(self.settings)
            self._recognizer.load()

    def __call__(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from preprocessing.grid import grid_length

        s = self.settings
        length = grid_length(len(audio) / 16_000, RATE_HZ)
        silence = {
            "silence_floor_dbfs": s.silence_floor_dbfs,
            "silence_range_db": s.silence_range_db,
        }
        if self.name == "librosa-33":
            from preprocessing.audio import audio_on_grid

            return audio_on_grid(
                audio,
                length,
                RATE_HZ,
                silence_floor_dbfs=s.silence_floor_dbfs,
                silence_range_db=s.silence_range_db,
            )
        if self.name == "whisper-enc-384":
            from preprocessing.speech_states import states_on_grid

            assert self._recognizer is not None
            windows = self._recognizer.encode(audio)
            return states_on_grid(windows, audio, length, RATE_HZ, **silence)
        from preprocessing.audio import audio_sound_mask
        from preprocessing.grid import cell_means

        assert self._smile is not None
        frame = self._smile.process_signal(audio, 16_000)
        starts = frame.index.get_level_values("start").total_seconds().to_numpy()
        values = np.nan_to_num(frame.to_numpy(dtype=np.float64))
        means, counts = cell_means(values, starts, length, RATE_HZ)
        mask = audio_sound_mask(audio, length, RATE_HZ, **silence) & (counts > 0)
        means[~mask] = 0.0
        return means, mask


def pooled(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over the steps that hold sound (all steps if none does)."""
    rows = features[mask] if mask.any() else features
    return np.concatenate([rows.mean(axis=0), rows.std(axis=0)]).astype(np.float32)


def load_audio(path: Path) -> np.ndarray:
    from preprocessing.media import decode_media
    from preprocessing.settings import ExtractorSettings

    decoded = decode_media(path, ExtractorSettings(), audio=True, video=False)
    assert decoded.audio is not None
    return decoded.audio


def ravdess_clips(root: Path) -> list[tuple[Path, int, int]]:
    """(path, emotion code, actor) of every RAVDESS speech clip."""
    clips = []
    for path in sorted(root.glob("Actor_*/*.wav")):
        fields = path.stem.split("-")
        clips.append((path, int(fields[2]), int(fields[6])))
    return clips


def clip_features(
    name: str, clips: list[tuple[Path, int, int]], cache: Path, featurize: Callable[[], Featurizer]
) -> np.ndarray:
    """Pooled features of every clip (N, 2F), cached in ``cache/<name>.npz``."""
    file = cache / f"ravdess-{name}.npz"
    keys = np.array([p.name for p, _, _ in clips])
    if file.is_file():
        stored = np.load(file)
        if np.array_equal(stored["keys"], keys):
            return stored["x"]
    fn = featurize()
    rows = []
    start = time.perf_counter()
    for i, (path, _, _) in enumerate(clips):
        rows.append(pooled(*fn(load_audio(path))))
        if (i + 1) % 200 == 0:
            print(f"  {name}: {i + 1}/{len(clips)} ({time.perf_counter() - start:.0f} s)")
    x = np.stack(rows)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, keys=keys, x=x)
    return x


# -- evaluation -------------------------------------------------------------------------------


def classifier() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, class_weight="balanced")
    )


def evaluate(x: np.ndarray, emotion: np.ndarray, actor: np.ndarray) -> dict[str, float]:
    """Speaker-independent scores over 6 folds of 4 actors."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    binary = np.isin(emotion, list(POSITIVE | NEGATIVE))
    three = np.isin(emotion, list(POSITIVE | NEGATIVE | NEUTRAL))
    y3 = np.where(np.isin(emotion, list(NEGATIVE)), 0, np.where(np.isin(emotion, [3]), 2, 1))
    aucs, accs, baccs = [], [], []
    for fold in range(6):
        test_actor = np.isin(actor, np.arange(4 * fold + 1, 4 * fold + 5))
        train_b, test_b = binary & ~test_actor, binary & test_actor
        model = classifier().fit(x[train_b], np.isin(emotion[train_b], list(POSITIVE)))
        score = model.predict_proba(x[test_b])[:, 1]
        aucs.append(roc_auc_score(np.isin(emotion[test_b], list(POSITIVE)), score))
        train3, test3 = three & ~test_actor, three & test_actor
        model3 = classifier().fit(x[train3], y3[train3])
        pred = model3.predict(x[test3])
        accs.append(float(np.mean(pred == y3[test3])))
        baccs.append(balanced_accuracy_score(y3[test3], pred))
    return {
        "auc": float(np.mean(aucs)),
        "auc_sd": float(np.std(aucs)),
        "acc": float(np.mean(accs)),
        "bacc": float(np.mean(baccs)),
    }


def cremad_check(
    x: np.ndarray, emotion: np.ndarray, fn: Featurizer, media: Path
) -> tuple[float, float]:
    """Log-odds of positive for the CREMA-D happy and angry clips, binary model trained on all
    of RAVDESS."""
    binary = np.isin(emotion, list(POSITIVE | NEGATIVE))
    model = classifier().fit(x[binary], np.isin(emotion[binary], list(POSITIVE)))
    rows = [pooled(*fn(load_audio(media / clip))) for clip in (HAPPY_CLIP, ANGRY_CLIP)]
    happy, angry = model.decision_function(np.stack(rows))
    return float(happy), float(angry)


def speech_of(seconds: float, media: Path) -> np.ndarray:
    """``seconds`` of real speech: the shared clips looped."""
    parts = [load_audio(media / n) for n in ("jfk.flac", HAPPY_CLIP, "grid_bbaf2n.mp4")]
    loop = np.concatenate(parts)
    reps = int(np.ceil(seconds * 16_000 / len(loop)))
    return np.tile(loop, reps)[: int(seconds * 16_000)]


def cost_ms_per_s(fn: Featurizer, audio: np.ndarray, repeats: int) -> float:
    fn(audio)  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(audio)
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times) / (len(audio) / 16_000)


# -- report -----------------------------------------------------------------------------------


def table(rows: dict[str, dict[str, float]], n_clips: int) -> str:
    lines = [
        "| candidate | dim | AUC pos vs neg (6 actor folds) | 3-class acc | 3-class balanced acc"
        " | ms per audio s, 10 s clip | ms per audio s, 30 s"
        " | CREMA-D log-odds pos, happy / angry |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    dims = {"librosa-33": 33, "egemaps-lld-25": 25, "whisper-enc-384": 384}
    for name, r in rows.items():
        verdict = "happy > angry" if r["happy"] > r["angry"] else "**angry >= happy**"
        lines.append(
            f"| `{name}` | {dims[name]} | {r['auc']:.3f} ± {r['auc_sd']:.3f} | {r['acc']:.3f} | "
            f"{r['bacc']:.3f} | {r['ms10']:.1f} | {r['ms30']:.1f} | "
            f"{r['happy']:.1f} / {r['angry']:.1f}: {verdict} |"
        )
    lines += [
        "",
        f"RAVDESS speech, {n_clips} clips of 24 actors; clip features are the mean and standard "
        "deviation of the grid steps that hold sound; standardised, logistic regression (C=1, "
        "class-balanced), 4 whole actors held out per fold. 3-class: negative (sad, angry, "
        "fearful, disgust) / neutral+calm / positive (happy), surprised left out (majority "
        "class 61.5 %). Cost: one thread, best of the repeats, on the shared speech looped to "
        f"10 s and 30 s ({platform.machine()}, {os.cpu_count()} cores, shared with other jobs). "
        "Whisper's encoder always reads a full 30 s window, so its cost per clip is constant up "
        'to 30 s. CREMA-D: actor 1001 saying "Don\'t forget a jacket" happy and angry, scored '
        "by the binary model trained on all of RAVDESS (log-odds of positive; below 0 is "
        "negative). Made by `bench/audio_features.py`.",
        "",
    ]
    lines[-2] = textwrap.fill(lines[-2], width=100)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ravdess", type=Path, default=data_dir() / "ravdess")
    parser.add_argument("--cache", type=Path, default=data_dir() / "cache" / "audio_features")
    parser.add_argument("--media", type=Path, default=MEDIA)
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)

    clips = ravdess_clips(args.ravdess)
    if not clips:
        raise SystemExit(f"no RAVDESS clips under {args.ravdess}")
    emotion = np.array([e for _, e, _ in clips])
    actor = np.array([a for _, _, a in clips])
    ten, thirty = speech_of(10.0, args.media), speech_of(30.0, args.media)
    rows: dict[str, dict[str, float]] = {}
    for name in args.candidates:
        print(f"{name}: features of {len(clips)} clips")
        x = clip_features(name, clips, args.cache, partial(Featurizer, name))
        r = evaluate(x, emotion, actor)
        fn = Featurizer(name)
        r["happy"], r["angry"] = cremad_check(x, emotion, fn, args.media)
        r["ms10"] = cost_ms_per_s(fn, ten, args.repeats)
        r["ms30"] = cost_ms_per_s(fn, thirty, args.repeats)
        rows[name] = r
        print(f"  {r}")
    text = table(rows, len(clips))
    print(text)
    if args.write_docs:
        write_section(DOC, "audio-choice", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
