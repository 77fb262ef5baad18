"""The training loop: seeded, resumable, best-on-valid, with progress bars and a log.

A run folder holds everything needed to resume or inspect a run::

    run.json          settings, model config and data summary (a resume must match them)
    log.jsonl         one JSON line per epoch: train loss, valid metrics, seconds
    state_last.pt     model, optimizer and RNG state after the last finished epoch
    state_best.pt     model state of the best epoch on the validation split

Training again with the same folder continues after the last finished epoch; the data order of
epoch e depends only on (seed, e), so an interrupted and resumed run sees the same batches as
an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.training.data import (
    FeatureDataset,
    Sample,
    collate,
    length_bucketed_batches,
    num_batches,
)
from model.training.metrics import compute_metrics, rated_text_metrics

LOSSES = ("l1", "mse", "smooth_l1")
SELECT = ("mae", "corr", "group_corr")


class RunMismatchError(RuntimeError):
    """A run folder holds a run with other settings, model or data than the one asked for."""


@dataclass
class TrainSettings:
    """The training recipe. Defaults follow the paper: Adam, lr 5e-4, weight decay 5e-4, L1.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per step (the paper sets it per dataset).
        lr, weight_decay: Adam's learning rate and L2 weight decay.
        loss: regression loss on the score: "l1" (paper), "mse" or "smooth_l1".
        class_loss_weight: weight of a cross-entropy term on the 3-class head, with class
            targets from the label through the model's ``score_to_class`` (0 = off).
        lr_schedule: "constant" or "cosine" (cosine decay to 5 % over all steps, after a
            linear warm-up of ``warmup_steps``).
        warmup_steps: linear warm-up steps (0 = none).
        grad_clip: max gradient norm (0 = off).
        select: which validation number picks the best epoch: "mae" (lower is better, as
            MMSA's default), "corr" (Pearson r, higher is better) or "group_corr" (the mean
            of the Pearson r of each group, for data from several sources).
        patience: stop after this many epochs without a better validation number (0 = off).
        max_length: cut sequences to this many grid steps in training (0 = no cut).
        eval_batch_size: batch size for validation and test.
        group_weighting: "none", or "std": weigh each sample's regression loss by
            (std of all train labels / std of its group's train labels), squared for "mse",
            normalised to mean 1 over the train split, so that a group whose labels span a
            narrow range (e.g. editorial sentences) counts as much per unit of spread as the
            others. Needs samples with groups.
        seed: seeds parameter init (done by the caller), dropout and the data order.
        threads: torch CPU threads.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 5e-4
    loss: str = "l1"
    class_loss_weight: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    select: str = "mae"
    patience: int = 0
    max_length: int = 0
    eval_batch_size: int = 64
    group_weighting: str = "none"
    seed: int = 1111
    threads: int = 1

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {self.select!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.group_weighting not in ("none", "std"):
            raise ValueError(f"group_weighting must be none or std, got {self.group_weighting!r}")
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError("epochs and batch_size must be positive")


@dataclass
class TrainResult:
    """What a finished run reports."""

    best_epoch: int
    valid_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_by_group: dict[str, dict[str, float]]
    history: list[dict[str, Any]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- prediction


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    samples: Sequence[Sample],
    batch_size: int = 64,
    modalities: Sequence[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Scores (N,) for samples, in their order (batched by length, in eval mode)."""
    was_training = model.training
    model.eval()
    config: Any = model.config
    mods = tuple(modalities or config.modalities)
    device = next(model.parameters()).device
    scores = np.zeros(len(samples), dtype=np.float64)
    position = {id(s): i for i, s in enumerate(samples)}
    batches = length_bucketed_batches(samples, batch_size, rng=None)
    total = math.ceil(len(samples) / batch_size)
    for chunk in _progress(batches, total, "predict", progress):
        batch = collate(chunk, mods)
        out = model(
            {m: t.to(device) for m, t in batch.features.items()},
            {m: t.to(device) for m, t in batch.masks.items()},
        )
        values = out.score.float().cpu().numpy()
        for sample, value in zip(chunk, values, strict=True):
            scores[position[id(sample)]] = value
    model.train(was_training)
    return scores


def evaluate_samples(
    model: nn.Module,
    samples: Sequence[Sample],
    metric_set: str,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray]:
    """Metrics of ``metric_set`` on samples, per-group rated-text metrics, and the scores."""
    scores = predict_scores(model, samples, batch_size, progress=progress)
    labels = np.array([s.label for s in samples], dtype=np.float64)
    overall = compute_metrics(metric_set, scores, labels)
    groups = sorted({s.group for s in samples if s.group})
    by_group = {}
    for group in groups:
        pick = np.array([s.group == group for s in samples])
        by_group[group] = rated_text_metrics(scores[pick], labels[pick])
    return overall, by_group, scores


# --------------------------------------------------------------------------- training


def _loss_fn(settings: TrainSettings) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Elementwise regression loss (reduction left to the caller)."""
    if settings.loss == "l1":
        return lambda pred, target: F.l1_loss(pred, target, reduction="none")
    if settings.loss == "mse":
        return lambda pred, target: F.mse_loss(pred, target, reduction="none")
    return lambda pred, target: F.smooth_l1_loss(pred, target, reduction="none")


def group_loss_weights(samples: Sequence[Sample], settings: TrainSettings) -> dict[str, float]:
    """Per-group loss weights of ``settings.group_weighting`` (empty for "none")."""
    if settings.group_weighting == "none":
        return {}
    labels = np.array([s.label for s in samples], dtype=np.float64)
    groups = np.array([s.group for s in samples])
    if len(set(groups.tolist())) < 2:
        return {}
    power = 2.0 if settings.loss == "mse" else 1.0
    overall = float(labels.std())
    raw = {
        str(g): (overall / max(float(labels[groups == g].std()), 1e-6)) ** power
        for g in sorted(set(groups.tolist()))
    }
    mean = float(np.mean([raw[str(g)] for g in groups]))
    return {g: w / mean for g, w in raw.items()}


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning rate's multiplier at ``step``: linear warm-up over ``warmup_steps``, then
    constant or a cosine decay to 5 % at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _lr_factor(settings: TrainSettings, step: int, total_steps: int) -> float:
    return lr_factor(step, total_steps, settings.warmup_steps, settings.lr_schedule)


def _score_of(
    metric_set: str,
    metrics: dict[str, float],
    by_group: dict[str, dict[str, float]],
    select: str,
) -> float:
    """A number where higher is better."""
    if select == "group_corr" and by_group:
        values = [v["Pearson_r"] for v in by_group.values()]
        return -math.inf if any(math.isnan(v) for v in values) else float(np.mean(values))
    if select in ("corr", "group_corr"):
        key = "Pearson_r" if metric_set == "rated" else "Corr"
        value = metrics[key]
        return -math.inf if math.isnan(value) else value
    return -metrics["MAE"]


def _run_identity(
    settings: TrainSettings, model: nn.Module, dataset: FeatureDataset
) -> dict[str, Any]:
    config: Any = model.config
    config_dict = config.to_dict()
    return {
        "settings": asdict(settings),
        "model_config": config_dict,
        "data": dataset.summary(),
    }


def _comparable(identity: dict[str, Any]) -> str:
    # epochs and patience may grow on resume; everything else must match
    relaxed = json.loads(json.dumps(identity, default=str))
    relaxed["settings"].pop("epochs", None)
    relaxed["settings"].pop("patience", None)
    relaxed["settings"].pop("threads", None)
    return json.dumps(relaxed, sort_keys=True)


def train(
    model: nn.Module,
    dataset: FeatureDataset,
    settings: TrainSettings,
    run_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` on ``dataset``'s train split, keep the best epoch on valid, test it.

    The model must follow ``CoupledMambaForSentiment``'s interface (``config``,
    ``forward(features, masks)`` returning ``score`` and ``logits``). On return the model
    holds the best epoch's weights. A run folder with a finished or interrupted run of the
    same settings, model and data is resumed; one of another run raises
    :class:`RunMismatchError`.
    """
    start_time = time.perf_counter()
    torch.set_num_threads(max(1, settings.threads))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    identity = _run_identity(settings, model, dataset)
    run_file, last_file, best_file = (
        run_dir / "run.json",
        run_dir / "state_last.pt",
        run_dir / "state_best.pt",
    )
    log_file = run_dir / "log.jsonl"

    train_set, valid_set = dataset.splits["train"], dataset.splits["valid"]
    if not train_set or not valid_set:
        raise ValueError("the dataset needs non-empty train and valid splits")
    config: Any = model.config
    modalities = tuple(config.modalities)
    missing = [m for m in modalities if m not in dataset.modalities]
    if missing:
        raise ValueError(f"the model needs modalities {missing} that the dataset lacks")

    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    steps_per_epoch = num_batches(len(train_set), settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    regression_loss = _loss_fn(settings)
    weights = group_loss_weights(train_set, settings)
    if weights:
        log("loss weights by group: " + ", ".join(f"{g} {w:.3f}" for g, w in weights.items()))

    history: list[dict[str, Any]] = []
    best_value, best_epoch, since_best = -math.inf, 0, 0
    first_epoch = 1
    if last_file.exists() and run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if _comparable(previous) != _comparable(identity):
            raise RunMismatchError(
                f"{run_dir} holds another run (settings, model or data differ); "
                "use another folder or remove it"
            )
        state = torch.load(last_file, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        best_value, best_epoch, since_best = (
            state["best_value"],
            state["best_epoch"],
            state["since_best"],
        )
        first_epoch = state["epoch"] + 1
        log(f"resuming {run_dir} after epoch {state['epoch']} (best so far: epoch {best_epoch})")
    else:
        torch.manual_seed(settings.seed)
        log_file.write_text("", encoding="utf-8")
    run_file.write_text(json.dumps(identity, indent=2, default=str) + "\n", encoding="utf-8")

    class_targets = settings.class_loss_weight > 0
    device = next(model.parameters()).device
    for epoch in range(first_epoch, settings.epochs + 1):
        if settings.patience and since_best >= settings.patience:
            log(f"stopping early: no better validation number for {since_best} epochs")
            break
        epoch_start = time.perf_counter()
        model.train()
        rng = random.Random(settings.seed * 100_003 + epoch)
        batches = length_bucketed_batches(train_set, settings.batch_size, rng)
        losses: list[float] = []
        bar = _progress(batches, steps_per_epoch, f"epoch {epoch}/{settings.epochs}", progress)
        for step_in_epoch, chunk in enumerate(bar):
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * _lr_factor(settings, step, total_steps)
            batch = collate(chunk, modalities, settings.max_length)
            labels = batch.labels.to(device)
            out = model(
                {m: t.to(device) for m, t in batch.features.items()},
                {m: t.to(device) for m, t in batch.masks.items()},
            )
            elementwise = regression_loss(out.score, labels)
            if weights:
                w = torch.tensor([weights[g] for g in batch.groups], device=device)
                elementwise = elementwise * w
            loss = elementwise.mean()
            if class_targets:
                target = torch.tensor(
                    [config.score_to_class(float(y)) for y in batch.labels], device=device
                )
                loss = loss + settings.class_loss_weight * F.cross_entropy(out.logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")

        valid_metrics, valid_groups, _ = evaluate_samples(
            model, valid_set, dataset.metric_set, settings.eval_batch_size
        )
        value = _score_of(dataset.metric_set, valid_metrics, valid_groups, settings.select)
        improved = value > best_value
        if improved:
            best_value, best_epoch, since_best = value, epoch, 0
            torch.save({"model": model.state_dict(), "epoch": epoch}, best_file)
        else:
            since_best += 1
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "valid": valid_metrics,
            "valid_by_group": valid_groups,
            "best": improved,
            "seconds": round(time.perf_counter() - epoch_start, 2),
        }
        history.append(record)
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in valid_metrics.items() if k != "N")
        if valid_groups:
            shown += "; r by group: " + ", ".join(
                f"{g} {v['Pearson_r']:.4f}" for g, v in valid_groups.items()
            )
        log(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}; valid {shown}"
            f"{' (best)' if improved else ''} [{record['seconds']:.0f} s]"
        )
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "history": history,
                "best_value": best_value,
                "best_epoch": best_epoch,
                "since_best": since_best,
            },
            last_file,
        )

    best = torch.load(best_file, map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    model.eval()
    valid_metrics, _, _ = evaluate_samples(
        model, valid_set, dataset.metric_set, settings.eval_batch_size
    )
    test_set = dataset.splits.get("test", [])
    test_metrics: dict[str, float] = {}
    test_by_group: dict[str, dict[str, float]] = {}
    if test_set:
        test_metrics, test_by_group, _ = evaluate_samples(
            model, test_set, dataset.metric_set, settings.eval_batch_size
        )
    return TrainResult(
        best_epoch=int(best["epoch"]),
        valid_metrics=valid_metrics,
        test_metrics=test_metrics,
        test_by_group=test_by_group,
        history=history,
        seconds=round(time.perf_counter() - start_time, 1),
        settings=asdict(settings),
    )
