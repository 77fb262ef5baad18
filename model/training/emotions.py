"""Emotion-labelled media (RAVDESS speech, FER2013 faces): labels, splits, sentiment mapping.

Both corpora label *emotions*, not sentiment. One documented mapping turns an emotion (and, for
RAVDESS, its intensity) into a score on the sentiment scale [-3, 3], so that voice and face
train the same regression head as the rated sentences; the emotion itself is kept as a label
for the emotion head.

**Valence sign** (Russell's circumplex model of affect, J. Pers. Soc. Psychol. 39, 1980):
happiness lies in the pleasant half; sadness, anger, fear and disgust in the unpleasant half;
neutral at the centre; calm in the pleasant, low-arousal quadrant (beside "relaxed" and
"serene"), closer to the centre than happiness. Surprise lies on the arousal axis with no
fixed valence (a surprise can be good or bad), so a surprised sample carries **no sentiment
target** (its sentiment loss weight is 0) and only trains the emotion head.

**Magnitude**: a full-intensity expression sits at the end of the scale, an ordinary one two
thirds of the way, calm at a third of happiness:

| emotion | valence | normal intensity | strong intensity |
| --- | ---: | ---: | ---: |
| happy | +1 | +2.0 | +3.0 |
| calm | +1/3 | +0.67 | +1.0 |
| neutral | 0 | 0 | 0 |
| sad, angry, fearful, disgust | -1 | -2.0 | -3.0 |
| surprised | none | (no sentiment target) | (no sentiment target) |

FER2013 has no intensity: its faces take the normal-intensity value. The emotion head's classes
are ``model.config.EMOTION_NAMES``; RAVDESS's calm is taken as neutral there (FER2013 has no
calm, and the two are hard to tell apart without context).

**Splits** never let one person or image reach two splits: RAVDESS by actor (actors 1-16 train,
17-20 valid, 21-24 test: two women and two men in each held-out split), FER2013 by its own split
(Training / PublicTest / PrivateTest as the ``train`` / ``validation`` / ``test`` folders).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from model.config import EMOTION_NAMES

SENTIMENT_SCALE = (-3.0, 3.0)

# Valence per emotion name (None: no sentiment target), see the module docstring.
VALENCE: dict[str, float | None] = {
    "happy": 1.0,
    "calm": 1.0 / 3.0,
    "neutral": 0.0,
    "sad": -1.0,
    "angry": -1.0,
    "fearful": -1.0,
    "disgust": -1.0,
    "surprised": None,
}
INTENSITY = {"normal": 2.0 / 3.0, "strong": 1.0}

# RAVDESS file name fields (modality-channel-emotion-intensity-statement-repetition-actor).
RAVDESS_EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
RAVDESS_INTENSITIES = {"01": "normal", "02": "strong"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
RAVDESS_SPLIT_ACTORS = {"train": range(1, 17), "valid": range(17, 21), "test": range(21, 25)}

# FER2013 folder names -> emotion names; folder of each split.
FER_EMOTIONS = {
    "angry": "angry",
    "disgust": "disgust",
    "fear": "fearful",
    "happy": "happy",
    "neutral": "neutral",
    "sad": "sad",
    "surprise": "surprised",
}
FER_SPLIT_FOLDERS = {"train": "train", "valid": "validation", "test": "test"}

POSITIVE = frozenset({"happy"})
NEGATIVE = frozenset({"sad", "angry", "fearful", "disgust"})


def sentiment_of(emotion: str, intensity: str = "normal") -> float | None:
    """The sentiment score of an emotion at an intensity; None for surprise (no target)."""
    valence = VALENCE[emotion]
    if valence is None:
        return None
    return SENTIMENT_SCALE[1] * valence * INTENSITY[intensity]


def emotion_class(emotion: str) -> int:
    """Index of an emotion in the emotion head's classes (calm counts as neutral)."""
    return EMOTION_NAMES.index("neutral" if emotion == "calm" else emotion)


def polarity(emotion: str) -> int | None:
    """+1 for a positive emotion, -1 for a negative one, None otherwise (the AUC targets)."""
    if emotion in POSITIVE:
        return 1
    if emotion in NEGATIVE:
        return -1
    return None


@dataclass(frozen=True)
class LabelledMedia:
    """One emotion-labelled file: a RAVDESS clip or a FER2013 face."""

    path: Path
    corpus: str  # "ravdess" or "fer2013"
    split: str  # "train", "valid" or "test"
    emotion: str  # a key of VALENCE
    intensity: str = "normal"
    speaker: str = ""  # RAVDESS actor number
    transcript: str | None = None  # RAVDESS statement

    @property
    def sentiment(self) -> float | None:
        return sentiment_of(self.emotion, self.intensity)

    @property
    def id(self) -> str:
        return f"{self.corpus}:{self.path.stem}"


def parse_ravdess_name(path: Path) -> LabelledMedia:
    """Label and split of a RAVDESS speech file from its name (``03-01-05-02-01-01-12.wav``)."""
    fields = path.stem.split("-")
    if (
        len(fields) != 7
        or fields[2] not in RAVDESS_EMOTIONS
        or fields[3] not in RAVDESS_INTENSITIES
    ):
        raise ValueError(f"{path.name} is not a RAVDESS file name")
    actor = int(fields[6])
    split = next((s for s, actors in RAVDESS_SPLIT_ACTORS.items() if actor in actors), None)
    if split is None:
        raise ValueError(f"{path.name}: actor {actor} is not one of RAVDESS's 24")
    return LabelledMedia(
        path=path,
        corpus="ravdess",
        split=split,
        emotion=RAVDESS_EMOTIONS[fields[2]],
        intensity=RAVDESS_INTENSITIES[fields[3]],
        speaker=f"{actor:02d}",
        transcript=RAVDESS_STATEMENTS.get(fields[4]),
    )


def read_ravdess(folder: Path) -> list[LabelledMedia]:
    """Every speech clip under ``folder/Actor_XX/``, sorted by name."""
    return [parse_ravdess_name(p) for p in sorted(Path(folder).glob("Actor_*/*.wav"))]


def read_fer2013(folder: Path) -> list[LabelledMedia]:
    """Every face under ``folder/{train,validation,test}/<emotion>/``, sorted by path.

    Augmented copies that some distributions add (``*.jpgN.jpg``) are not FER2013 images and
    are refused: delete them first (docs/TRAINING.md).
    """
    items = []
    for split, sub in FER_SPLIT_FOLDERS.items():
        for name, emotion in FER_EMOTIONS.items():
            for path in sorted((Path(folder) / sub / name).glob("*.jpg")):
                if ".jpg" in path.stem:
                    raise ValueError(f"{path} is an augmented copy, not a FER2013 image")
                items.append(LabelledMedia(path, "fer2013", split, emotion))
    return items


# --------------------------------------------------------------------------- manifest


def folder_digests(root: Path, files: Iterable[Path]) -> dict[str, dict[str, object]]:
    """Per parent folder (relative to ``root``): file count and the sha256 of the sorted lines
    ``<name> <sha256 of the file>``. Every file is read; one changed byte changes its folder's
    digest."""
    lines: dict[str, list[str]] = {}
    for path in files:
        folder = path.parent.relative_to(root).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.setdefault(folder, []).append(f"{path.name} {digest}")
    out: dict[str, dict[str, object]] = {}
    for folder in sorted(lines):
        body = "\n".join(sorted(lines[folder])).encode()
        out[folder] = {"files": len(lines[folder]), "sha256": hashlib.sha256(body).hexdigest()}
    return out


class ManifestError(ValueError):
    """The data on disk is not the data the manifest describes."""


def check_manifest(root: Path, files: Iterable[Path], manifest: Path, key: str) -> None:
    """Compare ``folder_digests`` of ``files`` with the manifest's entry ``key``.

    Raises:
        ManifestError: naming every folder that is missing, extra or different.
    """
    expected = json.loads(Path(manifest).read_text())[key]
    found = folder_digests(root, files)
    problems = [f"missing {f}" for f in sorted(set(expected) - set(found))]
    problems += [f"unexpected {f}" for f in sorted(set(found) - set(expected))]
    problems += [
        f"{f}: {found[f]['files']} files, sha256 {str(found[f]['sha256'])[:12]}... "
        f"(expected {expected[f]['files']} files, {str(expected[f]['sha256'])[:12]}...)"
        for f in sorted(set(found) & set(expected))
        if found[f] != expected[f]
    ]
    if problems:
        raise ManifestError(f"{key} under {root} differs from {manifest}: " + "; ".join(problems))


def auc(scores: Iterable[float], positive: Iterable[bool]) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` flags (ties count half)."""
    pairs = list(zip(scores, positive, strict=True))
    pos = [s for s, p in pairs if p]
    neg = [s for s, p in pairs if not p]
    if not pos or not neg:
        return math.nan
    ranked = sorted((s, i) for i, (s, _) in enumerate(pairs))
    ranks = [0.0] * len(pairs)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, (_, p) in zip(ranks, pairs, strict=True) if p)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
