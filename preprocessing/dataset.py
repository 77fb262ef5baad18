"""Training data from labelled media or plain sentences, through the same path as the service.

* :func:`encode_texts_on_grid` turns sentences into text features exactly as the service does
  for a typed transcript: MiniLM token embeddings (:class:`TextEncoder`), words placed at the
  nominal speaking rate on the profile's grid (:func:`align_text`).
* :func:`extract_dataset` (``cmamba extract``) runs the :class:`Extractor` over a CSV of
  ``path,label[,transcript][,split]`` in a process pool and writes a dataset in the MMSA
  pickle layout. Each finished clip is written to a work folder at once, so an interrupted run
  resumes where it stopped; clips that fail are listed, not fatal.

The pickle holds, per split, ``id``, ``raw_text``, ``regression_labels`` and, per extracted
modality, MMSA's key (``text``, ``audio``, ``vision``) as (N, L, F) float32 zero-padded to the
split's longest clip, with ``audio_lengths``/``vision_lengths`` (the clip's grid length) and
``text_masks``/``audio_masks``/``vision_masks`` (N, L) bool: the features are already on one
grid, and the masks say which steps hold a word, sound or face. A top-level ``meta`` dict names
the profile, grid rate and modalities.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.models import sha256_file
from preprocessing.profiles import DEFAULT_RATE_HZ, MODALITIES
from preprocessing.settings import NOMINAL_WORDS_PER_S, ExtractorSettings
from preprocessing.text import TextEncoder, align_text

MMSA_KEYS = {"text": "text", "audio": "audio", "visual": "vision"}
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------- sentences


def encode_texts_on_grid(
    texts: Sequence[str],
    encoder: TextEncoder | None = None,
    rate_hz: float = DEFAULT_RATE_HZ,
    words_per_s: float = NOMINAL_WORDS_PER_S,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Text features of sentences as the service computes them for a typed transcript.

    Returns, per text, ``features`` (L, 384) float32 and ``mask`` (L,) bool, with L set by the
    words at ``words_per_s`` on a ``rate_hz`` grid (a text without words gives L = 1, masked).
    """
    encoder = encoder or TextEncoder()
    tokens = encoder.encode_batch(list(texts))
    return [align_text(t, None, None, rate_hz, words_per_s=words_per_s) for t in tokens]


# --------------------------------------------------------------------------- media CSV


@dataclass(frozen=True)
class LabelledMedia:
    """One row of an extraction CSV."""

    path: Path
    label: float
    transcript: str | None
    split: str
    key: str  # stable id: the path as written in the CSV

    @property
    def work_name(self) -> str:
        """File name of this clip's features in the work folder."""
        return hashlib.sha256(self.key.encode()).hexdigest()[:24] + ".npz"


def split_for_key(key: str) -> str:
    """The fixed split of a clip without a ``split`` column: 80/10/10 by sha256 of its key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "valid" if bucket < 90 else "test"


def read_media_csv(path: str | Path) -> list[LabelledMedia]:
    """Read ``path,label[,transcript][,split]`` (with that header; extra columns ignored).

    Relative media paths are taken from the CSV's folder. Raises ``ValueError`` naming the
    line of a bad row.
    """
    path = Path(path)
    rows: list[LabelledMedia] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        if not {"path", "label"} <= fields:
            raise ValueError(f"{path}: the header must name at least 'path' and 'label'")
        for number, row in enumerate(reader, start=2):
            key = (row.get("path") or "").strip()
            if not key:
                raise ValueError(f"{path}:{number}: empty path")
            try:
                label = float(row["label"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}:{number}: label {row['label']!r} is not a number"
                ) from None
            transcript = (row.get("transcript") or "").strip() or None
            split = (row.get("split") or "").strip().lower() or split_for_key(key)
            if split not in SPLITS:
                raise ValueError(f"{path}:{number}: split must be one of {SPLITS}, got {split!r}")
            media = Path(key) if Path(key).is_absolute() else path.parent / key
            rows.append(LabelledMedia(media, label, transcript, split, key))
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: a path is listed twice")
    return rows


_WORKER: Any = None


def _init_worker(settings: ExtractorSettings, modalities: tuple[str, ...]) -> None:
    global _WORKER
    from preprocessing.extractor import Extractor

    _WORKER = Extractor(settings, modalities)


def _extract_one(item: LabelledMedia, out_file: str) -> str | None:
    """Extract one clip into ``out_file``; the error message on failure, else None."""
    from preprocessing.errors import PreprocessingError

    try:
        bundle = _WORKER.extract(item.path, transcript=item.transcript)
    except (PreprocessingError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    arrays: dict[str, Any] = {}
    for m in bundle.modalities:
        arrays[f"{m}/features"] = bundle.features[m].astype(np.float32)
        arrays[f"{m}/mask"] = bundle.masks[m].astype(bool)
    arrays["transcript"] = np.array(bundle.summary.transcript or "")
    tmp = out_file + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out_file)
    return None


@dataclass
class ExtractReport:
    """What :func:`extract_dataset` did."""

    total: int
    extracted: int  # clips extracted in this run
    reused: int  # clips found finished in the work folder
    failed: dict[str, str]  # CSV path -> error message
    output: Path


def extract_dataset(
    csv_path: str | Path,
    output: str | Path,
    *,
    settings: ExtractorSettings | None = None,
    modalities: Sequence[str] = MODALITIES,
    workers: int = 1,
    work_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractReport:
    """Extract every clip of a CSV and write an MMSA-layout pickle to ``output``.

    ``work_dir`` (default: ``<output>.parts``) keeps one ``.npz`` per finished clip; a rerun
    reuses them, so an interrupted extraction resumes. ``workers`` processes each load their
    own models.
    """
    settings = settings or ExtractorSettings()
    mods = tuple(m for m in MODALITIES if m in modalities)
    if not mods:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}")
    items = read_media_csv(csv_path)
    output = Path(output)
    work = Path(work_dir) if work_dir else output.with_name(output.name + ".parts")
    work.mkdir(parents=True, exist_ok=True)
    profile = settings.profile_name
    stamp: dict[str, Any] = {"modalities": list(mods), "rate_hz": settings.rate_hz}
    if settings.text_tuning_path is not None:  # features made with a checkpoint's text layers
        stamp["text_tuning_sha256"] = sha256_file(Path(settings.text_tuning_path))
    stamp_file = work / "extract.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) != stamp:
        raise ValueError(f"{work} holds clips extracted with other settings ({stamp_file})")
    stamp_file.write_text(json.dumps(stamp))

    todo = [i for i in items if not (work / i.work_name).exists()]
    reused = len(items) - len(todo)
    if reused:
        log(f"reusing {reused} finished clips from {work}")
    failed: dict[str, str] = {}
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="extract", disable=not progress, dynamic_ncols=True)
        # spawn, not fork: forking a process that already runs torch / mediapipe threads can
        # corrupt the child's allocator state.
        with ProcessPoolExecutor(
            max_workers=max(1, workers),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(settings, mods),
        ) as pool:
            futures: dict[Future[str | None], LabelledMedia] = {
                pool.submit(_extract_one, item, str(work / item.work_name)): item for item in todo
            }
            for future in as_completed(futures):
                error = future.result()
                if error is not None:
                    failed[futures[future].key] = error
                bar.update(1)
        bar.close()
    for key, error in failed.items():
        log(f"failed: {key}: {error}")

    done = [i for i in items if (work / i.work_name).exists()]
    data = _assemble(done, work, mods, settings.rate_hz, str(csv_path), profile)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("wb") as handle:
        pickle.dump(data, handle, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(output)
    return ExtractReport(len(items), len(todo) - len(failed), reused, failed, output)


def _assemble(
    items: Sequence[LabelledMedia],
    work: Path,
    modalities: tuple[str, ...],
    rate_hz: float,
    source: str,
    profile: str = "default-v1",
) -> dict[str, Any]:
    from preprocessing.profiles import PROFILES

    dims = {m: PROFILES[profile].dims[m] for m in modalities}
    out: dict[str, Any] = {
        "meta": {
            "feature_profile": profile,
            "rate_hz": rate_hz,
            "modalities": list(modalities),
            "source": source,
        }
    }
    for split in SPLITS:
        chosen = [i for i in items if i.split == split]
        clips = []
        for item in chosen:
            with np.load(work / item.work_name) as data:
                clips.append({k: data[k] for k in data.files})
        lengths = [len(c[f"{modalities[0]}/mask"]) for c in clips]
        width = max(lengths, default=1)
        n = len(chosen)
        part: dict[str, Any] = {
            "id": [i.key for i in chosen],
            "raw_text": [str(c["transcript"]) for c in clips],
            "regression_labels": np.array([i.label for i in chosen], dtype=np.float32),
        }
        for m in modalities:
            key = MMSA_KEYS[m]
            feats = np.zeros((n, width, dims[m]), np.float32)
            masks = np.zeros((n, width), bool)
            for row, clip in enumerate(clips):
                length = lengths[row]
                feats[row, :length] = clip[f"{m}/features"]
                masks[row, :length] = clip[f"{m}/mask"]
            part[key] = feats
            part[f"{key}_masks"] = masks
            if m != "text":
                part[f"{key}_lengths"] = list(lengths)
        out[split] = part
    return out
