"""Training data on one shared time grid: MMSA pickles, compact feature caches, batching.

Every sample holds, per modality, ``rows`` (R, F) and an ``index`` (L,) into them: grid step t
carries ``rows[index[t]]``, and ``index[t] == -1`` marks a step with nothing (masked). A
modality whose value repeats over several steps (a word lasting several steps) is stored once;
MMSA data after pooling has ``index = arange(L)``. All modalities of one sample share L.

MMSA pickles (``{train|valid|test: {text, audio, vision, audio_lengths, vision_lengths,
regression_labels, id, ...}}``) are read as follows:

* ``-inf`` (MOSI/MOSEI audio) and NaN become 0, as MMSA's own loader does;
* only the first ``length`` frames of a sample are used: ``audio_lengths``/``vision_lengths``,
  and for text the attention mask of ``text_bert`` when present, else the last non-zero row;
* the grid is the text's: L = the sample's true token count. An unaligned audio or visual
  sequence of true length T is pooled onto it by masked averaging: grid step j averages frames
  ``[floor(j*T/L), max(floor((j+1)*T/L), floor(j*T/L)+1))``, so every step gets at least one
  frame and every frame lands in exactly one step when T >= L (frames repeat when T < L).
  Aligned data (all modalities with text's padded length and no separate lengths) keeps the
  text's mask for every modality. Without text, L is the shortest true length present.
* MMSA's ``vision`` is this project's ``visual`` modality.

Datasets written by ``cmamba extract`` use the same layout plus ``text_masks``,
``audio_masks`` and ``vision_masks`` (N, L) booleans, because they are already on one grid;
with those keys present the masks are used as they are and nothing is pooled.
"""

from __future__ import annotations

import json
import math
import pickle
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from model.config import MODALITY_ORDER

MMSA_KEYS = {"text": "text", "audio": "audio", "visual": "vision"}
SPLITS = ("train", "valid", "test")


@dataclass
class Sample:
    """One labelled sample on the grid; see the module doc for ``rows``/``index``."""

    id: str
    label: float
    length: int
    rows: dict[str, NDArray[Any]]  # modality -> (R, F) float16/float32
    index: dict[str, NDArray[np.int32]]  # modality -> (L,) row index, -1 = masked step
    group: str = ""  # source tag, used for per-source reports

    @classmethod
    def from_dense(
        cls,
        id: str,
        label: float,
        features: dict[str, NDArray[Any]],
        masks: dict[str, NDArray[np.bool_]],
        group: str = "",
        dtype: Any = np.float16,
    ) -> Sample:
        """Store grid features (L, F) with masks (L,), keeping runs of equal rows once.

        Rows are compared after the cast to ``dtype``; a word spread over several grid steps
        (the text modality) is therefore stored once per distinct value.
        """
        lengths = {len(m) for m in masks.values()} | {len(f) for f in features.values()}
        if len(lengths) != 1:
            raise ValueError(f"features and masks of one sample must share L, got {lengths}")
        (length,) = lengths
        rows: dict[str, NDArray[Any]] = {}
        index: dict[str, NDArray[np.int32]] = {}
        for m, values in features.items():
            cast = np.asarray(values).astype(dtype)
            valid = np.asarray(masks[m], dtype=bool)
            changed = np.ones(length, dtype=bool)
            changed[1:] = np.any(cast[1:] != cast[:-1], axis=1) | ~valid[:-1]
            new_row = valid & changed
            rows[m] = cast[new_row]
            index[m] = np.where(valid, np.cumsum(new_row) - 1, -1).astype(np.int32)
        return cls(id, float(label), int(length), rows, index, group)

    def dense(self, modality: str) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Features (L, F) float32 and mask (L,) of one modality on the grid."""
        rows, idx = self.rows[modality], self.index[modality]
        mask = idx >= 0
        out = np.zeros((self.length, rows.shape[1]), dtype=np.float32)
        out[mask] = rows[idx[mask]]
        return out, mask


@dataclass
class FeatureDataset:
    """Samples per split, with the facts a checkpoint records about its data."""

    splits: dict[str, list[Sample]]
    modalities: tuple[str, ...]
    feature_dims: dict[str, int]
    label_scale: tuple[float, float]
    metric_set: str  # "mosi", "mosei", "sims", "simsv2" or "rated"
    description: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Sizes and facts, for logs and checkpoint configs."""
        return {
            "modalities": list(self.modalities),
            "feature_dims": dict(self.feature_dims),
            "label_scale": list(self.label_scale),
            "metric_set": self.metric_set,
            "sizes": {name: len(items) for name, items in self.splits.items()},
            **self.description,
        }


# --------------------------------------------------------------------------- grid pooling


def pool_to_grid(frames: NDArray[Any], true_length: int, grid_length: int) -> NDArray[np.float32]:
    """Masked average pooling of ``frames[:true_length]`` (T, F) onto ``grid_length`` bins.

    Bin j averages frames ``[floor(j*T/L), max(floor((j+1)*T/L), floor(j*T/L)+1))``.
    Returns (L, F) float32; raises when there is nothing to pool.
    """
    T, L = int(true_length), int(grid_length)
    if T <= 0 or L <= 0:
        raise ValueError(f"cannot pool {T} frames onto {L} steps")
    x = np.asarray(frames[:T], dtype=np.float64)  # (T, F)
    starts = (np.arange(L) * T) // L
    ends = np.maximum((np.arange(1, L + 1) * T) // L, starts + 1)
    csum = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])  # (T+1, F)
    pooled = (csum[ends] - csum[starts]) / (ends - starts)[:, None]
    return pooled.astype(np.float32)


def _text_lengths(split: dict[str, Any], padded: int) -> NDArray[np.int64]:
    if "text_bert" in split:
        bert = np.asarray(split["text_bert"])  # (N, 3, L): ids, attention mask, segments
        return bert[:, 1, :].sum(axis=1).astype(np.int64)
    text = np.asarray(split["text"])
    nonzero = np.abs(text).sum(axis=2) > 0  # (N, L)
    last = np.where(nonzero.any(axis=1), padded - np.argmax(nonzero[:, ::-1], axis=1), 0)
    return last.astype(np.int64)


def _clean(array: Any) -> NDArray[np.float32]:
    out = np.asarray(array, dtype=np.float32).copy()
    out[~np.isfinite(out)] = 0.0  # MOSI/MOSEI audio holds -inf
    return out


def _mmsa_split(split: dict[str, Any], modalities: Sequence[str], dtype: Any) -> list[Sample]:
    arrays = {m: _clean(split[MMSA_KEYS[m]]) for m in modalities}
    labels = np.asarray(split["regression_labels"], dtype=np.float32).reshape(-1)
    n = len(labels)
    ids = [str(i) for i in split.get("id", range(n))]
    lengths: dict[str, NDArray[np.int64]] = {}
    grid_masks: dict[str, NDArray[np.bool_]] = {}
    for m in modalities:
        key = MMSA_KEYS[m]
        padded = arrays[m].shape[1]
        if f"{key}_masks" in split:
            grid_masks[m] = np.asarray(split[f"{key}_masks"], dtype=bool)
        if m == "text":
            lengths[m] = _text_lengths(split, padded)
        elif f"{key}_lengths" in split:
            lengths[m] = np.asarray(split[f"{key}_lengths"], dtype=np.int64).reshape(-1)
        else:
            lengths[m] = np.full(n, padded, dtype=np.int64)
        lengths[m] = np.clip(lengths[m], 0, padded)

    samples: list[Sample] = []
    on_grid = len(grid_masks) == len(modalities)
    padded_all = {arrays[m].shape[1] for m in modalities}
    aligned = (
        "text" in modalities
        and len(padded_all) == 1
        and not any(f"{MMSA_KEYS[m]}_lengths" in split for m in modalities if m != "text")
    )
    for i in range(n):
        rows: dict[str, NDArray[Any]] = {}
        index: dict[str, NDArray[np.int32]] = {}
        if on_grid:
            L = int(max(grid_masks[m][i].nonzero()[0].max(initial=-1) + 1 for m in modalities))
            for m in modalities:
                mask = grid_masks[m][i][:L]
                rows[m] = arrays[m][i][:L].astype(dtype)
                index[m] = np.where(mask, np.arange(L), -1).astype(np.int32)
        else:
            if "text" in modalities:
                L = int(lengths["text"][i])
            else:
                L = int(min((lengths[m][i] for m in modalities if lengths[m][i] > 0), default=0))
            for m in modalities:
                T = int(lengths["text"][i]) if aligned else int(lengths[m][i])
                if L == 0 or T == 0:
                    rows[m] = np.zeros((0, arrays[m].shape[2]), dtype=dtype)
                    index[m] = np.full(L, -1, dtype=np.int32)
                elif T == L:
                    rows[m] = arrays[m][i][:L].astype(dtype)
                    index[m] = np.arange(L, dtype=np.int32)
                else:
                    rows[m] = pool_to_grid(arrays[m][i], T, L).astype(dtype)
                    index[m] = np.arange(L, dtype=np.int32)
        if L == 0:
            continue  # nothing observed: MMSA has a handful of these; they cannot be scored
        samples.append(Sample(ids[i], float(labels[i]), L, rows, index))
    return samples


def guess_metric_set(path: str | Path, labels: NDArray[Any]) -> str:
    """MMSA metric set from the file name (mosi/mosei/simsv2/sims), else from the label range."""
    name = Path(path).name.lower()
    for key in ("mosei", "mosi", "simsv2", "sims"):
        if key in name:
            return key
    return "sims" if labels.size and float(np.abs(labels).max()) <= 1.0 else "mosei"


def load_mmsa_pickle(
    path: str | Path,
    modalities: Sequence[str] | None = None,
    metric_set: str | None = None,
    dtype: Any = np.float16,
) -> FeatureDataset:
    """Read a dataset in the MMSA pickle layout (see the module doc for the rules)."""
    path = Path(path)
    with path.open("rb") as handle:
        raw = pickle.load(handle)
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ValueError(f"{path}: not an MMSA pickle, missing splits {missing}")
    present = [m for m in MODALITY_ORDER if MMSA_KEYS[m] in raw["train"]]
    chosen = tuple(modalities) if modalities else tuple(present)
    unknown = [m for m in chosen if m not in present]
    if unknown:
        raise ValueError(f"{path}: no data for modalities {unknown} (has {present})")
    splits = {s: _mmsa_split(raw[s], chosen, dtype) for s in SPLITS}
    dims = {m: int(np.asarray(raw["train"][MMSA_KEYS[m]]).shape[2]) for m in chosen}
    labels = np.asarray(raw["train"]["regression_labels"], dtype=np.float32)
    kind = metric_set or guess_metric_set(path, labels)
    scale = (-1.0, 1.0) if kind.startswith("sims") else (-3.0, 3.0)
    meta = raw.get("meta", {}) if isinstance(raw.get("meta"), dict) else {}
    description = {"source": str(path), "format": "mmsa-pickle", **meta}
    return FeatureDataset(splits, chosen, dims, scale, kind, description)


# --------------------------------------------------------------------------- compact cache


def save_feature_cache(dataset: FeatureDataset, path: str | Path) -> None:
    """Write a dataset as one ``.npz``: concatenated float16 rows and int32 indexes per split.

    Variable lengths cost nothing: per split and modality, ``rows`` of all samples are stacked
    with offsets, and so are the indexes.
    """
    arrays: dict[str, NDArray[Any]] = {}
    for split, samples in dataset.splits.items():
        arrays[f"{split}/labels"] = np.array([s.label for s in samples], dtype=np.float32)
        arrays[f"{split}/ids"] = np.array([s.id for s in samples], dtype=np.str_)
        arrays[f"{split}/groups"] = np.array([s.group for s in samples], dtype=np.str_)
        for m in dataset.modalities:
            rows = [s.rows[m] for s in samples]
            idx = [s.index[m] for s in samples]
            dim = dataset.feature_dims[m]
            arrays[f"{split}/{m}/rows"] = (
                np.concatenate(rows).astype(np.float16) if rows else np.zeros((0, dim), np.float16)
            )
            arrays[f"{split}/{m}/row_offsets"] = np.cumsum([0] + [len(r) for r in rows])
            arrays[f"{split}/{m}/index"] = (
                np.concatenate(idx).astype(np.int32) if idx else np.zeros(0, np.int32)
            )
            arrays[f"{split}/{m}/index_offsets"] = np.cumsum([0] + [len(i) for i in idx])
    meta = {
        "modalities": list(dataset.modalities),
        "feature_dims": dataset.feature_dims,
        "label_scale": list(dataset.label_scale),
        "metric_set": dataset.metric_set,
        "description": dataset.description,
        "splits": list(dataset.splits),
    }
    arrays["meta"] = np.array(json.dumps(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_feature_cache(path: str | Path) -> FeatureDataset:
    """Read a dataset written by ``save_feature_cache``."""
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        modalities = tuple(meta["modalities"])
        splits: dict[str, list[Sample]] = {}
        for split in meta["splits"]:
            labels = data[f"{split}/labels"]
            ids, groups = data[f"{split}/ids"], data[f"{split}/groups"]
            per_mod = {
                m: (
                    data[f"{split}/{m}/rows"],
                    data[f"{split}/{m}/row_offsets"],
                    data[f"{split}/{m}/index"],
                    data[f"{split}/{m}/index_offsets"],
                )
                for m in modalities
            }
            samples = []
            for i in range(len(labels)):
                rows, index = {}, {}
                for m, (r, ro, ix, io) in per_mod.items():
                    rows[m] = r[ro[i] : ro[i + 1]]
                    index[m] = ix[io[i] : io[i + 1]]
                length = len(next(iter(index.values())))
                samples.append(
                    Sample(str(ids[i]), float(labels[i]), length, rows, index, str(groups[i]))
                )
            splits[split] = samples
    return FeatureDataset(
        splits,
        modalities,
        {k: int(v) for k, v in meta["feature_dims"].items()},
        (float(meta["label_scale"][0]), float(meta["label_scale"][1])),
        meta["metric_set"],
        meta.get("description", {}),
    )


def load_dataset(
    path: str | Path, modalities: Sequence[str] | None = None, metric_set: str | None = None
) -> FeatureDataset:
    """Load an MMSA pickle (``.pkl``/``.pickle``) or a feature cache (``.npz``)."""
    path = Path(path)
    if path.suffix == ".npz":
        dataset = load_feature_cache(path)
        if modalities:
            dataset = select_modalities(dataset, modalities)
        if metric_set:
            dataset.metric_set = metric_set
        return dataset
    return load_mmsa_pickle(path, modalities, metric_set)


def select_modalities(dataset: FeatureDataset, modalities: Sequence[str]) -> FeatureDataset:
    """The same dataset restricted to ``modalities`` (each must be present)."""
    unknown = [m for m in modalities if m not in dataset.modalities]
    if unknown:
        raise ValueError(f"dataset has no modalities {unknown} (has {list(dataset.modalities)})")
    keep = tuple(m for m in MODALITY_ORDER if m in modalities)
    splits = {
        name: [
            Sample(
                s.id,
                s.label,
                s.length,
                {m: s.rows[m] for m in keep},
                {m: s.index[m] for m in keep},
                s.group,
            )
            for s in samples
        ]
        for name, samples in dataset.splits.items()
    }
    dims = {m: dataset.feature_dims[m] for m in keep}
    return FeatureDataset(
        splits, keep, dims, dataset.label_scale, dataset.metric_set, dataset.description
    )


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Padded tensors for the model: features (B, L, F_m), masks (B, L), labels (B,)."""

    features: dict[str, Tensor]
    masks: dict[str, Tensor]
    labels: Tensor
    ids: list[str]
    groups: list[str]


def collate(samples: Sequence[Sample], modalities: Sequence[str], max_length: int = 0) -> Batch:
    """Pad samples to the longest one (cut at ``max_length`` when > 0) and build masks."""
    L = max(s.length for s in samples)
    if max_length > 0:
        L = min(L, max_length)
    features: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for m in modalities:
        dim = samples[0].rows[m].shape[1]
        feats = np.zeros((len(samples), L, dim), dtype=np.float32)
        mask = np.zeros((len(samples), L), dtype=bool)
        for b, s in enumerate(samples):
            idx = s.index[m][:L]
            valid = idx >= 0
            steps = np.nonzero(valid)[0]
            feats[b, steps] = s.rows[m][idx[valid]]
            mask[b, steps] = True
        features[m] = torch.from_numpy(feats)
        masks[m] = torch.from_numpy(mask)
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    return Batch(features, masks, labels, [s.id for s in samples], [s.group for s in samples])


def length_bucketed_batches(
    samples: Sequence[Sample], batch_size: int, rng: random.Random | None, pool: int = 50
) -> Iterator[list[Sample]]:
    """Batches of similar lengths (less padding); shuffled by ``rng``, in order when None.

    Samples are shuffled, cut into pools of ``pool`` batches, sorted by length inside each
    pool, cut into batches, and the batches shuffled again.
    """
    order = list(range(len(samples)))
    if rng is None:
        order.sort(key=lambda i: samples[i].length)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        rng.shuffle(order)
        batches = []
        chunk = batch_size * pool
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: samples[i].length)
            batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
        rng.shuffle(batches)
    for batch in batches:
        yield [samples[i] for i in batch]


def num_batches(n: int, batch_size: int, pool: int = 50) -> int:
    """How many batches ``length_bucketed_batches`` yields for n samples when shuffling."""
    chunk = batch_size * pool
    return (n // chunk) * pool + math.ceil((n % chunk) / batch_size)
