"""Training of the facial-expression encoder on FER2013 (Training split only).

Steps, each cached under ``cache_dir`` (never in the repository):

1. face mesh (static image mode) on every FER image, upscaled to 128 px and padded to 192 px
   (:func:`preprocessing.face_expression.fer_canvas`): landmarks, the 17 landmark features and a
   found flag per image (:func:`mesh_split`);
2. the framing of the crop fitted on Training images with a face (:func:`fit_crop_params`);
3. crops with :func:`preprocessing.face_expression.face_crop` on the same canvas; images where
   face mesh finds no face keep their own 48x48 image, which is already framed as FER frames
   its faces (:func:`crops_for_split`);
4. the CNN trained on Training with augmentation, the epoch kept by PublicTest (validation/)
   AUC + accuracy, reported once on PrivateTest (test/) (:func:`train_face_encoder`).

The FER2013 folders are ``<data_dir>/{train,validation,test}/<class>/*.jpg``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.face_expression import (
    CLASSES,
    CROP_PARAMS,
    CROP_SIZE,
    NEGATIVE_CLASSES,
    POSITIVE_CLASSES,
    CropParams,
    crop_box,
    face_crop,
    fer_canvas,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CANVAS_INNER, CANVAS_TOTAL = 128, 192
DEFAULT_CACHE = Path("build") / "fer2013-cache"  # relative to the working directory


def list_split(data_dir: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """Image paths (sorted) and class indices of one FER split."""
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(CLASSES):
        files = sorted((Path(data_dir) / split / name).glob("*.jpg"))
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _mesh_chunk(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import cv2

    from preprocessing.visual import FaceMeshRunner

    n = len(paths)
    images = np.zeros((n, CROP_SIZE, CROP_SIZE), np.uint8)
    marks = np.zeros((n, 468, 3), np.float32)
    feats = np.zeros((n, 17), np.float32)
    found = np.zeros((n,), bool)
    with FaceMeshRunner(0.5, static_image_mode=True) as runner:
        for i, path in enumerate(paths):
            img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
            if img.shape != (CROP_SIZE, CROP_SIZE):
                img = cv2.resize(img, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
            images[i] = img
            seen = runner.observe(fer_canvas(img, CANVAS_INNER, CANVAS_TOTAL))
            if seen is not None:
                marks[i], feats[i], found[i] = seen.landmarks, seen.features, True
    return images, marks, feats, found


def mesh_split(
    data_dir: Path, split: str, cache_dir: Path = DEFAULT_CACHE, workers: int = 2
) -> dict[str, np.ndarray]:
    """Images, labels, landmarks, 17 landmark features and found flags of one split (cached
    in ``cache_dir/<split>_mesh.npz``)."""
    cache = Path(cache_dir) / f"{split}_mesh.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    paths, labels = list_split(data_dir, split)
    if not paths:
        raise FileNotFoundError(f"no FER images under {Path(data_dir) / split}")
    chunks = [[str(p) for p in paths[i : i + 500]] for i in range(0, len(paths), 500)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_mesh_chunk, chunks))
    else:
        parts = [_mesh_chunk(c) for c in chunks]
    out = {
        "images": np.concatenate([p[0] for p in parts]),
        "landmarks": np.concatenate([p[1] for p in parts]),
        "mesh_features": np.concatenate([p[2] for p in parts]),
        "found": np.concatenate([p[3] for p in parts]),
        "labels": labels,
        "names": np.asarray([p.name for p in paths]),
    }
    log.info("face mesh on %s: %d images in %.0f s", split, len(paths), time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def fit_crop_params(landmarks: np.ndarray) -> tuple[CropParams, dict[str, float]]:
    """The framing that makes the crop of a FER canvas reproduce the FER image: medians over
    the given landmark sets (canvas-normalised) of the FER square's side and centre offset, in
    units of the landmark extent. Returns the parameters and their spread (IQR)."""
    target = np.array([CANVAS_TOTAL / 2.0, CANVAS_TOTAL / 2.0])
    unit = CropParams(size=1.0, dx=0.0, dy=0.0)
    sizes, dxs, dys = [], [], []
    for marks in landmarks:
        centre, u, v, extent = crop_box(marks, CANVAS_TOTAL, CANVAS_TOTAL, unit)
        rel = target - centre
        sizes.append(CANVAS_INNER / extent)
        dxs.append(float(rel @ u) / extent)
        dys.append(float(rel @ v) / extent)
    arr = {"size": np.asarray(sizes), "dx": np.asarray(dxs), "dy": np.asarray(dys)}
    params = CropParams(
        size=round(float(np.median(arr["size"])), 3),
        dx=round(float(np.median(arr["dx"])), 3),
        dy=round(float(np.median(arr["dy"])), 3),
    )
    spread = {f"{k}_iqr": float(np.subtract(*np.percentile(a, [75, 25]))) for k, a in arr.items()}
    return params, spread


def crops_for_split(mesh: dict[str, np.ndarray], params: CropParams = CROP_PARAMS) -> np.ndarray:
    """(N, 48, 48) uint8 crops: face_crop on the canvas where face mesh found a face, the FER
    image itself where it did not."""
    crops = mesh["images"].copy()
    for i in np.flatnonzero(mesh["found"]):
        canvas = fer_canvas(mesh["images"][i], CANVAS_INNER, CANVAS_TOTAL)
        crops[i] = face_crop(canvas, mesh["landmarks"][i], params)
    return crops


def load_split(
    data_dir: Path, split: str, cache_dir: Path = DEFAULT_CACHE, workers: int = 2
) -> dict[str, np.ndarray]:
    """Mesh results plus crops (cached as ``<split>_crops_<version>.npy``)."""
    mesh = mesh_split(data_dir, split, cache_dir, workers)
    cache = Path(cache_dir) / f"{split}_crops_{CROP_PARAMS.version}.npy"
    if cache.is_file():
        crops = np.load(cache)
    else:
        crops = crops_for_split(mesh)
        np.save(cache, crops)
    return {**mesh, "crops": crops}


def pos_neg_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` separating positive (happy) from negative (angry, disgust, fear,
    sad) faces; neutral and surprise are left out."""
    pos = np.isin(labels, [CLASSES.index(c) for c in POSITIVE_CLASSES])
    neg = np.isin(labels, [CLASSES.index(c) for c in NEGATIVE_CLASSES])
    s_pos, s_neg = np.asarray(scores)[pos], np.asarray(scores)[neg]
    if len(s_pos) == 0 or len(s_neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([s_pos, s_neg]), kind="mergesort")
    ranks = np.empty(len(order), np.float64)
    ranks[order] = np.arange(1, len(order) + 1)
    # average ranks of ties
    allv = np.concatenate([s_pos, s_neg])
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    u = ranks[: len(s_pos)].sum() - len(s_pos) * (len(s_pos) + 1) / 2.0
    return float(u / (len(s_pos) * len(s_neg)))


def _augment(batch: Any, generator: Any) -> Any:
    """Random flips, shifts (+-4 px), rotations (+-12 deg), zoom (0.9-1.1), brightness and
    contrast of a (N, 1, 48, 48) float batch in [0, 1]."""
    import torch
    import torch.nn.functional as F

    n = batch.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-12, 12) * np.pi / 180
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    theta[:, 0, 2] = uniform(-4, 4) / 24.0
    theta[:, 1, 2] = uniform(-4, 4) / 24.0
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = uniform(0.7, 1.3).view(n, 1, 1, 1)
    bias = uniform(-0.15, 0.15).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * gain + mean + bias).clamp(0.0, 1.0)


def evaluate(net: Any, crops: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """7-class accuracy, happy-vs-negative AUC of P(happy) and of the valence score."""
    import torch

    from preprocessing.face_expression import valence

    net.eval()
    probs = []
    with torch.inference_mode():
        for i in range(0, len(crops), 1024):
            x = torch.from_numpy(crops[i : i + 1024, None]).float() / 255.0
            # test-time flip average
            logits = net(x) + net(torch.flip(x, dims=[3]))
            probs.append(torch.softmax(logits / 2, dim=1).numpy())
    p = np.concatenate(probs)
    return {
        "accuracy": float((p.argmax(axis=1) == labels).mean()),
        "auc_p_happy": pos_neg_auc(p[:, CLASSES.index("happy")], labels),
        "auc_valence": pos_neg_auc(valence(p), labels),
        "n": len(labels),
    }


def train_face_encoder(
    data_dir: Path | str,
    out_path: Path | str,
    seed: int = 0,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 3e-3,
    threads: int = 2,
    cache_dir: Path | str = DEFAULT_CACHE,
    workers: int = 2,
    max_minutes: float | None = 25.0,
) -> dict[str, Any]:
    """Train the encoder on FER Training, keep the epoch with the best PublicTest score
    (AUC of P(happy) + accuracy), write it to ``out_path`` (float16 safetensors) and report
    PrivateTest once. Returns the metrics (also written beside the weights as JSON)."""
    import torch

    from preprocessing.face_expression import build_network, save_encoder

    data_dir, cache_dir, out_path = Path(data_dir), Path(cache_dir), Path(out_path)
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    splits = {s: load_split(data_dir, s, cache_dir, workers) for s in SPLITS}
    train = splits["train"]
    x_train = torch.from_numpy(train["crops"][:, None].copy())
    y_train = torch.from_numpy(train["labels"])
    generator = torch.Generator().manual_seed(seed)

    net = build_network()
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    best: dict[str, Any] = {"score": -1.0}
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = _augment(x_train[idx].float() / 255.0, generator)
            loss = loss_fn(net(x), y_train[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        val = evaluate(net, splits["validation"]["crops"], splits["validation"]["labels"])
        score = val["auc_p_happy"] + val["accuracy"]
        elapsed = time.perf_counter() - start
        history.append({"epoch": epoch + 1, "loss": total / len(x_train), **val, "s": elapsed})
        log.info("epoch %d %s", epoch + 1, history[-1])
        if score > best["score"]:
            best = {
                "score": score,
                "epoch": epoch + 1,
                "state": {k: v.clone() for k, v in net.state_dict().items()},
            }
        if max_minutes is not None and elapsed > max_minutes * 60 and epoch + 1 < epochs:
            log.warning("stopping after %d epochs: time budget of %s min", epoch + 1, max_minutes)
            break
    net.load_state_dict(best["state"])
    train_s = time.perf_counter() - start
    # Scores of the float16 file as served (weights rounded as saved).
    net.load_state_dict({k: v.half().float() for k, v in best["state"].items()})
    metrics: dict[str, Any] = {
        "seed": seed,
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "train_seconds": round(train_s, 1),
        "threads": threads,
        "crop": asdict(CROP_PARAMS),
        "detection_rate": {s: float(splits[s]["found"].mean()) for s in SPLITS},
        "validation": evaluate(net, splits["validation"]["crops"], splits["validation"]["labels"]),
        "test": evaluate(net, splits["test"]["crops"], splits["test"]["labels"]),
        "history": history,
    }
    for split in ("validation", "test"):
        found = splits[split]["found"]
        metrics[f"{split}_face_found"] = evaluate(
            net, splits[split]["crops"][found], splits[split]["labels"][found]
        )
    sha = save_encoder(
        net,
        out_path,
        extra={
            "trained_on": "FER2013 Training",
            "selected_on": "FER2013 PublicTest",
            "seed": seed,
            "best_epoch": best["epoch"],
        },
    )
    metrics["sha256"] = sha
    metrics["bytes"] = os.path.getsize(out_path)
    out_path.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
