"""The benchmark scripts live in ``bench/`` (not an installed package): put the repo root on
``sys.path`` so that tests can import ``bench.baselines`` and ``bench.fusion_efficiency``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
