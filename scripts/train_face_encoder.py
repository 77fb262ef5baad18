"""Train the facial-expression encoder on FER2013 Training (``face_encoder.safetensors``).

Face mesh, the crops and the split caches go to ``--cache`` (outside the repository); the weights
(float16 safetensors with a JSON metadata header) and ``face_encoder.metrics.json`` go to
``--out``. Prints the metrics (PublicTest picks the epoch; PrivateTest is reported once) and the
file's sha256. Rerunning reuses the caches, not the weights.

Usage::

    python scripts/train_face_encoder.py [--data DIR] [--out FILE] [--seed N] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.doc_sections import data_dir  # noqa: E402
from preprocessing.face_training import train_face_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_dir() / "fer2013")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "build" / "face_encoder" / "face_encoder.safetensors"
    )
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "fer2013-cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--workers", type=int, default=2, help="face-mesh processes")
    parser.add_argument("--max-minutes", type=float, default=25.0)
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"FER2013 folders not found under {args.data} (pass --data)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = train_face_encoder(
        args.data,
        args.out,
        args.seed,
        epochs=args.epochs,
        threads=args.threads,
        cache_dir=args.cache,
        workers=args.workers,
        max_minutes=args.max_minutes,
    )
    summary = {k: v for k, v in metrics.items() if k != "history"}
    print(json.dumps(summary, indent=2))
    print(f"{args.out} sha256 {metrics['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
