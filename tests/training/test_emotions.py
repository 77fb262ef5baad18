"""Emotion corpora: labels from file names, splits by person, the sentiment mapping, manifests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from model.config import EMOTION_NAMES
from model.training.emotions import (
    ManifestError,
    auc,
    check_manifest,
    emotion_class,
    folder_digests,
    parse_ravdess_name,
    polarity,
    read_fer2013,
    read_ravdess,
    sentiment_of,
)


def test_ravdess_names_give_emotion_intensity_actor_split_and_words() -> None:
    clip = parse_ravdess_name(Path("Actor_22/03-01-05-02-02-01-22.wav"))
    assert (clip.emotion, clip.intensity, clip.speaker, clip.split) == (
        "angry",
        "strong",
        "22",
        "test",
    )
    assert clip.transcript == "Dogs are sitting by the door"
    assert clip.sentiment == -3.0
    assert parse_ravdess_name(Path("03-01-03-01-01-01-01.wav")).split == "train"
    assert parse_ravdess_name(Path("03-01-03-01-01-01-18.wav")).split == "valid"
    for bad in ("03-01-09-01-01-01-01.wav", "03-01-03-01-01-01-25.wav", "song.wav"):
        with pytest.raises(ValueError):
            parse_ravdess_name(Path(bad))


def test_every_actor_is_in_exactly_one_split_with_both_sexes_held_out() -> None:
    splits: dict[str, set[int]] = {}
    for actor in range(1, 25):
        clip = parse_ravdess_name(Path(f"03-01-01-01-01-01-{actor:02d}.wav"))
        splits.setdefault(clip.split, set()).add(actor)
    assert sum(len(a) for a in splits.values()) == 24
    for held_out in ("valid", "test"):
        # RAVDESS actors: odd numbers are men, even numbers women.
        assert {a % 2 for a in splits[held_out]} == {0, 1}


def test_sentiment_mapping_signs_magnitudes_and_surprise() -> None:
    assert sentiment_of("happy", "strong") == 3.0 and sentiment_of("happy") == 2.0
    assert sentiment_of("neutral") == 0.0
    assert 0 < sentiment_of("calm") < sentiment_of("happy")  # type: ignore[operator]
    for negative in ("sad", "angry", "fearful", "disgust"):
        assert sentiment_of(negative) == -2.0 and polarity(negative) == -1
    assert sentiment_of("surprised") is None and polarity("surprised") is None
    assert polarity("happy") == 1 and polarity("calm") is None
    assert emotion_class("calm") == EMOTION_NAMES.index("neutral")


def test_readers_and_manifest(tmp_path: Path) -> None:
    rav = tmp_path / "ravdess" / "Actor_01"
    rav.mkdir(parents=True)
    (rav / "03-01-03-01-01-01-01.wav").write_bytes(b"one")
    (rav / "03-01-04-02-02-02-01.wav").write_bytes(b"two")
    fer = tmp_path / "fer"
    for split, emotion, name in [("train", "happy", "a"), ("test", "fear", "b")]:
        (fer / split / emotion).mkdir(parents=True)
        (fer / split / emotion / f"{name}.jpg").write_bytes(name.encode())
    clips = read_ravdess(tmp_path / "ravdess")
    faces = read_fer2013(fer)
    assert [c.emotion for c in clips] == ["happy", "sad"]
    assert [(f.split, f.emotion) for f in faces] == [("train", "happy"), ("test", "fearful")]

    manifest = tmp_path / "manifest.json"
    digests = folder_digests(fer, [f.path for f in faces])
    manifest.write_text(json.dumps({"fer2013": digests}))
    check_manifest(fer, [f.path for f in faces], manifest, "fer2013")
    (fer / "test" / "fear" / "b.jpg").write_bytes(b"changed")
    with pytest.raises(ManifestError, match="test/fear"):
        check_manifest(fer, [f.path for f in faces], manifest, "fer2013")
    (fer / "train" / "happy" / "a.jpg1.jpg").write_bytes(b"augmented")
    with pytest.raises(ValueError, match="augmented"):
        read_fer2013(fer)


def test_auc_counts_ties_as_half() -> None:
    assert auc([0.1, 0.2, 0.9, 0.8], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.1, 0.2], [False, False, True, True]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(auc([0.5], [True]))
