"""``cmamba extract``: build a training dataset (MMSA pickle layout) from labelled media."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from preprocessing.profiles import MODALITIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "csv",
        type=Path,
        help="CSV with header path,label[,transcript][,split]; relative paths are taken from "
        "the CSV's folder; without a split column, clips are split 80/10/10 by a hash of the path",
    )
    parser.add_argument("--out", type=Path, required=True, help="dataset pickle to write (.pkl)")
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        default=list(MODALITIES),
        help="modalities to extract",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel extraction processes")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="folder of per-clip results; a rerun resumes from it (default: OUT.parts)",
    )
    parser.add_argument(
        "--text-encoder",
        type=Path,
        help="fine-tuned text encoder layers (a checkpoint's text_encoder.safetensors): text "
        "features of profile tuned-text-v1, for training with `cmamba train --text-encoder`",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from preprocessing import ExtractorSettings
    from preprocessing.dataset import extract_dataset

    if args.text_encoder is not None and not args.text_encoder.is_file():
        print(f"error: --text-encoder {args.text_encoder} does not exist", file=sys.stderr)
        return 2
    try:
        report = extract_dataset(
            args.csv,
            args.out,
            settings=ExtractorSettings(text_tuning_path=args.text_encoder),
            modalities=args.modalities,
            workers=args.workers,
            work_dir=args.work_dir,
            progress=not args.quiet,
        )
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report.total} clips: {report.extracted} extracted now, {report.reused} reused, "
        f"{len(report.failed)} failed -> {report.output}"
    )
    return 1 if report.failed and report.total == len(report.failed) else 0
