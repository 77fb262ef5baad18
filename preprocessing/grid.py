"""The shared time grid: step ``i`` covers ``[i / rate_hz, (i + 1) / rate_hz)`` seconds."""

from __future__ import annotations

import math

import numpy as np


def grid_length(duration_s: float, rate_hz: float) -> int:
    """Number of grid steps covering ``duration_s`` (at least 1)."""
    return max(1, math.ceil(duration_s * rate_hz - 1e-6))


def cell_means(
    values: np.ndarray, times_s: np.ndarray, length: int, rate_hz: float
) -> tuple[np.ndarray, np.ndarray]:
    """Average per-frame ``values`` (N, F) at ``times_s`` (N,) into grid cells.

    Returns ``means`` (length, F) float32 (zeros where a cell got no frame) and ``counts``
    (length,) int64. Frames past the last cell are dropped.
    """
    cells = np.floor(np.asarray(times_s, dtype=np.float64) * rate_hz + 1e-9).astype(np.int64)
    keep = (cells >= 0) & (cells < length)
    cells = cells[keep]
    vals = np.asarray(values, dtype=np.float64)[keep]
    counts = np.bincount(cells, minlength=length)
    sums = np.zeros((length, vals.shape[1]), dtype=np.float64)
    np.add.at(sums, cells, vals)
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return means.astype(np.float32), counts
