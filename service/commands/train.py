"""``cmamba train``: train a Coupled Mamba checkpoint on an MMSA pickle or a feature cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.config import MODALITY_ORDER
from service.commands._training import add_model_arguments, model_config_overrides, resolve_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        type=Path,
        help="dataset: an MMSA pickle (.pkl, e.g. from `cmamba extract` or MMSA's "
        "MOSI/MOSEI/SIMS files) or a feature cache (.npz)",
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="run folder (states, log); an interrupted run there resumes (default: OUT.run)",
    )
    parser.add_argument("--name", help="model name (default: the folder name)")
    parser.add_argument("--version", default="1", help="model version string")
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITY_ORDER,
        help="modalities to train on (default: all in the data)",
    )
    parser.add_argument(
        "--metrics",
        choices=("mosi", "mosei", "sims", "simsv2", "rated"),
        help="MMSA metric set (default: from the file name, else the label range)",
    )
    parser.add_argument(
        "--profile", help="feature profile name to record (default: from the data or dims)"
    )
    parser.add_argument(
        "--text-encoder",
        type=Path,
        help="fine-tuned text encoder layers the text features were made with (a file from "
        "preprocessing.text_tuning); shipped in the checkpoint, profile tuned-text-v1",
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("training (defaults: the paper's recipe)")
    group.add_argument("--epochs", type=int, default=30, help="passes over the data")
    group.add_argument("--batch-size", type=int, default=32, help="clips per step")
    group.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    group.add_argument(
        "--loss", choices=("l1", "mse", "smooth_l1"), default="l1", help="regression loss"
    )
    group.add_argument(
        "--class-loss-weight",
        type=float,
        default=0.0,
        help="weight of cross-entropy on the 3-class head (0 = off)",
    )
    group.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning rate over the run",
    )
    group.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    group.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm limit")
    group.add_argument(
        "--select",
        choices=("mae", "corr", "group_corr"),
        default="mae",
        help="validation number that picks the best epoch (group_corr: mean of the "
        "per-source Pearson r)",
    )
    group.add_argument("--patience", type=int, default=0, help="early stop (0 = off)")
    group.add_argument(
        "--group-weighting",
        choices=("none", "std"),
        default="none",
        help="std: weigh the loss per data source by the spread of its labels",
    )
    group.add_argument("--max-length", type=int, default=0, help="cut training sequences")
    group.add_argument("--seed", type=int, default=1111, help="random seed")
    group.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from model import CoupledMambaConfig, CoupledMambaForSentiment, save_checkpoint
    from model.checkpoint import TEXT_ENCODER_PROFILE
    from model.training.card import training_model_card
    from model.training.data import load_dataset
    from model.training.metrics import format_metrics
    from model.training.trainer import RunMismatchError, TrainSettings, train

    torch.set_num_threads(max(1, args.threads))
    dataset = load_dataset(args.data, args.modalities, args.metrics)
    profile = args.profile or (
        TEXT_ENCODER_PROFILE
        if args.text_encoder
        else resolve_profile(dataset.description, dataset.feature_dims)
    )
    if (profile == TEXT_ENCODER_PROFILE) != (args.text_encoder is not None):
        print(
            "error: --text-encoder goes with profile tuned-text-v1, and only with it",
            file=sys.stderr,
        )
        return 2
    if args.text_encoder is not None and not args.text_encoder.is_file():
        print(f"error: --text-encoder {args.text_encoder} does not exist", file=sys.stderr)
        return 2
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss=args.loss,
        class_loss_weight=args.class_loss_weight,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        select=args.select,
        patience=args.patience,
        group_weighting=args.group_weighting,
        max_length=args.max_length,
        seed=args.seed,
        threads=args.threads,
    )
    neutral = 0.1 if dataset.metric_set.startswith("sims") else 0.5
    config = CoupledMambaConfig(
        modalities=dataset.modalities,
        feature_dims=dataset.feature_dims,
        feature_profile=profile,
        label_scale=dataset.label_scale,
        neutral_band=neutral,
        **model_config_overrides(args),
    )
    torch.manual_seed(settings.seed)  # parameter init
    model = CoupledMambaForSentiment(config, scan_backend="auto").to(args.device)
    model.set_scan_backend("auto")
    sizes = {k: len(v) for k, v in dataset.splits.items()}
    print(
        f"data {args.data}: {sizes}, modalities {list(dataset.modalities)}, "
        f"metrics {dataset.metric_set}, profile {profile}; model "
        f"{model.count_parameters():,} parameters, scan backend {model.scan_backend}",
        flush=True,
    )
    run_dir = args.run_dir or args.out.with_name(args.out.name + ".run")
    try:
        result = train(
            model, dataset, settings, run_dir, progress=not args.quiet and sys.stderr.isatty()
        )
    except RunMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    training: dict[str, Any] = {
        "data": dataset.summary(),
        "data_path": str(args.data),
        "settings": result.settings,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "seconds": result.seconds,
        "run_dir": str(run_dir),
    }
    metrics: dict[str, Any] = {
        "metric_set": dataset.metric_set,
        "valid": result.valid_metrics,
        "test": result.test_metrics,
    }
    if result.test_by_group:
        metrics["test_by_group"] = result.test_by_group
    card = training_model_card(
        name=args.name or args.out.resolve().name,
        version=args.version,
        config=config,
        parameters=model.count_parameters(),
        training=training,
        metrics=metrics,
    )
    model.to("cpu")
    save_checkpoint(
        model,
        args.out,
        model_card=card,
        training=training,
        metrics=metrics,
        name=args.name,
        version=args.version,
        text_encoder=args.text_encoder,
        text_encoder_info=text_encoder_info(args.text_encoder) if args.text_encoder else None,
    )
    print(f"best epoch {result.best_epoch}; test metrics ({dataset.metric_set}):")
    print(format_metrics(result.test_metrics))
    for group, values in result.test_by_group.items():
        shown = json.dumps({k: round(v, 4) for k, v in values.items()})
        print(f"  {group}: {shown}")
    print(f"checkpoint written to {args.out}")
    return 0


def text_encoder_info(path: Path) -> dict[str, Any]:
    """What a checkpoint records about its text encoder layers besides their hash."""
    from safetensors import safe_open

    from preprocessing.models import TEXT_MODEL_SHA256, TEXT_PACKAGE, TEXT_PACKAGE_VERSION
    from preprocessing.text_tuning import layer_of

    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())
    layers = sorted({n for k in names if (n := layer_of(k)) is not None})
    return {
        "base": f"{TEXT_PACKAGE} {TEXT_PACKAGE_VERSION} (all-MiniLM-L6-v2)",
        "base_sha256": TEXT_MODEL_SHA256,
        "tuned_layers": layers,
    }
