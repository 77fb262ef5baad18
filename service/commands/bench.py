"""``cmamba bench NAME [ARGS...]``: run one of the benchmark scripts in ``bench/``.

The scripts print their tables and write results to ``docs/PERFORMANCE.md``; they ship with
the source checkout, not with the installed package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "scan": "scan.py",
    "preprocess": "preprocess.py",
    "load": "load.py",
    "fusion": "fusion_efficiency.py",
    "ray": "ray_replicas.py",
    "stream": "stream.py",
}


def bench_dir() -> Path:
    """The ``bench/`` folder of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments passed to the script (see its --help)"
    )


def run(args: argparse.Namespace) -> int:
    script = bench_dir() / BENCHMARKS[args.name]
    if not script.is_file():
        raise SystemExit(f"{script} not found: benchmarks run from a source checkout")
    return subprocess.call([sys.executable, str(script), *args.args])
