"""``cmamba evaluate``: MMSA metrics of a checkpoint on a dataset, or scores against rated texts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder, or 'default' for the embedded default checkpoint",
    )
    parser.add_argument(
        "data",
        nargs="?",
        type=Path,
        help="dataset: an MMSA pickle (.pkl) or a feature cache (.npz)",
    )
    parser.add_argument(
        "--texts",
        type=Path,
        help="tab-separated file of id, human rating, text: score the texts alone",
    )
    parser.add_argument(
        "--rating-scale",
        nargs=2,
        type=float,
        default=(-4.0, 4.0),
        metavar=("LOW", "HIGH"),
        help="scale of the ratings in --texts, rescaled to the checkpoint's (default -4 4)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "valid", "test", "all"),
        default=None,
        help="dataset split to evaluate (default: test); with --texts, keep only the "
        "sentences of that split of the fixed snippet split (default: all)",
    )
    parser.add_argument(
        "--metrics",
        choices=("mosi", "mosei", "sims", "simsv2"),
        help="MMSA metric set (default: from the file name, else the label range)",
    )
    parser.add_argument("--vader", action="store_true", help="with --texts: also score VADER")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per model call")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def _load(args: argparse.Namespace) -> Any:
    from model import load_checkpoint_with_info
    from model.checkpoints import default_checkpoint_path, pinned_hashes

    path = default_checkpoint_path() if args.checkpoint == "default" else args.checkpoint
    return load_checkpoint_with_info(path, device=args.device, **pinned_hashes(path))


def _texts(args: argparse.Namespace, model: Any, info: Any) -> dict[str, Any]:
    import numpy as np

    from model.checkpoint import TEXT_ENCODER_PROFILE
    from model.training.data import Sample
    from model.training.metrics import rated_text_metrics
    from model.training.rated_texts import read_rated_texts, rescale, split_of
    from model.training.trainer import predict_scores
    from preprocessing.dataset import encode_texts_on_grid
    from preprocessing.text import TextEncoder

    config = model.config
    if "text" not in config.modalities:
        raise SystemExit(f"the checkpoint has no text branch (modalities {config.modalities})")
    if config.feature_profile not in ("default-v1", TEXT_ENCODER_PROFILE):
        raise SystemExit(
            f"the checkpoint expects profile {config.feature_profile!r}; "
            "--texts produces default-v1 or tuned-text-v1 text features"
        )
    items = read_rated_texts(args.texts)
    if args.split not in (None, "all"):
        items = [i for i in items if split_of(i.source, i.id) == args.split]
    if not items:
        raise SystemExit(f"{args.texts}: no texts to score")
    scale = (float(args.rating_scale[0]), float(args.rating_scale[1]))
    labels = np.array([rescale(i.rating, scale, config.label_scale) for i in items])
    tuning = info.text_encoder
    encoder = TextEncoder(
        tuning=tuning["path"] if tuning else None,
        tuning_sha256=tuning["sha256"] if tuning else None,
    )
    encoded = encode_texts_on_grid([i.text for i in items], encoder)
    samples = [
        Sample.from_dense(i.id, float(y), {"text": f}, {"text": m}, dtype=np.float32)
        for i, y, (f, m) in zip(items, labels, encoded, strict=True)
    ]
    scores = predict_scores(model, samples, args.batch_size)
    results: dict[str, Any] = {
        "texts": str(args.texts),
        "n": len(items),
        "label_scale": list(config.label_scale),
        "model": rated_text_metrics(scores, labels),
    }
    if args.vader:
        from model.training.baselines import vader_compound

        half = (config.label_scale[1] - config.label_scale[0]) / 2
        vader = np.array(vader_compound([i.text for i in items])) * half
        results["vader"] = rated_text_metrics(vader, labels)
    return results


def _dataset(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from model.training.data import load_dataset
    from model.training.trainer import evaluate_samples

    config = model.config
    dataset = load_dataset(args.data, config.modalities, args.metrics)
    dims = {m: dataset.feature_dims[m] for m in config.modalities}
    if dims != dict(config.feature_dims):
        raise SystemExit(f"the data has feature dims {dims}, the checkpoint {config.feature_dims}")
    split = args.split or "test"
    names = list(dataset.splits) if split == "all" else [split]
    results: dict[str, Any] = {"data": str(args.data), "metric_set": dataset.metric_set}
    for name in names:
        samples = dataset.splits.get(name) or []
        if not samples:
            raise SystemExit(f"{args.data}: split {name!r} is empty")
        metrics, by_group, _ = evaluate_samples(model, samples, dataset.metric_set, args.batch_size)
        results[name] = {"n": len(samples), "metrics": metrics}
        if by_group:
            results[name]["by_group"] = by_group
    return results


def run(args: argparse.Namespace) -> int:
    import torch

    from model.training.metrics import format_metrics

    if (args.data is None) == (args.texts is None):
        print("error: give either DATA or --texts FILE", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    model, info = _load(args)
    print(
        f"checkpoint {args.checkpoint}: {model.describe()['parameters']:,} parameters, "
        f"modalities {list(model.config.modalities)}, scale {list(model.config.label_scale)}"
    )
    if args.texts is not None:
        results = _texts(args, model, info)
        print(
            f"{results['n']} texts from {args.texts}, ratings rescaled to {results['label_scale']}"
        )
        print("model:")
        print(format_metrics(results["model"]))
        if "vader" in results:
            print("VADER (compound score):")
            print(format_metrics(results["vader"]))
    else:
        results = _dataset(args, model)
        for name, part in results.items():
            if not isinstance(part, dict):
                continue
            print(f"{name} ({part['n']} samples, {results['metric_set']} metrics):")
            print(format_metrics(part["metrics"]))
            for group, values in part.get("by_group", {}).items():
                print(f"  {group}: " + json.dumps({k: round(v, 4) for k, v in values.items()}))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
