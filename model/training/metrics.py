"""Evaluation metrics, defined exactly as MMSA (thuiar/MMSA, ``utils/metricsTop.py``) defines them.

MMSA's conventions, kept on purpose so numbers compare with published tables:

* multi-class accuracy rounds predictions and labels with ``numpy.round`` (half to even) after
  clipping both to the class range, and compares the rounded values;
* MOSI/MOSEI: "Has0" binary metrics split at ``>= 0`` (non-negative vs negative) over all
  samples; "Non0" metrics drop the samples whose *label* is exactly 0 and split at ``> 0``;
  MAE and Corr use the unclipped predictions;
* SIMS: predictions and labels are clipped to [-1, 1] first (MAE and Corr included), then binned
  by left-open intervals: 2 classes {[-1, 0], (0, 1]}, 3 classes {[-1, -0.1], (-0.1, 0.1],
  (0.1, 1]}, 5 classes {[-1, -0.7], (-0.7, -0.1], (-0.1, 0.1], (0.1, 0.7], (0.7, 1]};
* F1 is scikit-learn's ``average="weighted"`` F1 (per-class F1 weighted by the class's support
  in the labels; a class with no predictions has F1 0).

MMSA rounds the MOSI/MOSEI numbers to 4 decimals when it reports them; these functions return
unrounded floats and leave rounding to the printer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

MOSEI_KEYS = (
    "Has0_acc_2",
    "Has0_F1_score",
    "Non0_acc_2",
    "Non0_F1_score",
    "Mult_acc_5",
    "Mult_acc_7",
    "MAE",
    "Corr",
)
SIMS_KEYS = ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr")
TEXT_KEYS = ("Pearson_r", "MAE", "Acc_2", "F1_score", "N")


def _flat(values: ArrayLike) -> NDArray[np.float64]:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def multiclass_accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Share of samples whose rounded prediction equals the rounded label (MMSA's rule)."""
    p, y = _flat(preds), _flat(labels)
    return float(np.sum(np.round(p) == np.round(y)) / float(len(y)))


def weighted_f1(labels: ArrayLike, preds: ArrayLike) -> float:
    """F1 per class, averaged with the label support as weights (scikit-learn's ``weighted``).

    Classes are the union of the values in ``labels`` and ``preds``; a class with no support
    weighs nothing, a class never predicted (or never right) has F1 0.
    """
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(preds).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"labels and preds differ in length: {len(y)} vs {len(p)}")
    total = 0.0
    for cls in np.union1d(y, p):
        support = int(np.sum(y == cls))
        if support == 0:
            continue
        true_pos = int(np.sum((y == cls) & (p == cls)))
        predicted = int(np.sum(p == cls))
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + support)
        f1 = 2.0 * true_pos / (predicted + support)
        total += f1 * support
    return float(total / len(y))


def pearson_r(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation (``numpy.corrcoef``); NaN when either side is constant."""
    p, y = _flat(preds), _flat(labels)
    if len(p) < 2 or np.std(p) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(p, y)[0, 1])


def mosei_regression_metrics(preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """MMSA's MOSI/MOSEI regression metrics for scores on the [-3, 3] scale."""
    p, y = _flat(preds), _flat(labels)
    if len(p) != len(y):
        raise ValueError(f"preds and labels differ in length: {len(p)} vs {len(y)}")
    mae = float(np.mean(np.abs(p - y)))
    corr = pearson_r(p, y)
    acc7 = multiclass_accuracy(np.clip(p, -3.0, 3.0), np.clip(y, -3.0, 3.0))
    acc5 = multiclass_accuracy(np.clip(p, -2.0, 2.0), np.clip(y, -2.0, 2.0))

    non_zero = y != 0
    nz_true, nz_pred = y[non_zero] > 0, p[non_zero] > 0
    non0_acc2 = float(np.mean(nz_true == nz_pred)) if non_zero.any() else float("nan")
    non0_f1 = weighted_f1(nz_true, nz_pred) if non_zero.any() else float("nan")

    has0_true, has0_pred = y >= 0, p >= 0
    return {
        "Has0_acc_2": float(np.mean(has0_true == has0_pred)),
        "Has0_F1_score": weighted_f1(has0_true, has0_pred),
        "Non0_acc_2": non0_acc2,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": acc5,
        "Mult_acc_7": acc7,
        "MAE": mae,
        "Corr": corr,
    }


def _bin_left_open(values: NDArray[np.float64], edges: Sequence[float]) -> NDArray[np.float64]:
    """Class index i for values in (edges[i], edges[i+1]] (MMSA's SIMS binning)."""
    out = values.copy()
    for i in range(len(edges) - 1):
        out[(values > edges[i]) & (values <= edges[i + 1])] = i
    return out


SIMS_EDGES_2 = (-1.01, 0.0, 1.01)
SIMS_EDGES_3 = (-1.01, -0.1, 0.1, 1.01)
SIMS_EDGES_5 = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)


def sims_regression_metrics(preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """MMSA's CH-SIMS / CH-SIMSv2 regression metrics for scores on the [-1, 1] scale."""
    p = np.clip(_flat(preds), -1.0, 1.0)
    y = np.clip(_flat(labels), -1.0, 1.0)
    if len(p) != len(y):
        raise ValueError(f"preds and labels differ in length: {len(p)} vs {len(y)}")
    p2, y2 = _bin_left_open(p, SIMS_EDGES_2), _bin_left_open(y, SIMS_EDGES_2)
    p3, y3 = _bin_left_open(p, SIMS_EDGES_3), _bin_left_open(y, SIMS_EDGES_3)
    p5, y5 = _bin_left_open(p, SIMS_EDGES_5), _bin_left_open(y, SIMS_EDGES_5)
    return {
        "Mult_acc_2": multiclass_accuracy(p2, y2),
        "Mult_acc_3": multiclass_accuracy(p3, y3),
        "Mult_acc_5": multiclass_accuracy(p5, y5),
        "F1_score": weighted_f1(y2, p2),
        "MAE": float(np.mean(np.abs(p - y))),
        "Corr": pearson_r(p, y),
    }


def rated_text_metrics(preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Metrics for scores against rated texts: Pearson r, MAE, and sign agreement.

    Acc-2 and F1 follow the MOSEI "Non0" rule (samples rated exactly 0 are left out, split at
    ``> 0``), so a method that only knows the sign is judged on the samples that have one.
    """
    p, y = _flat(preds), _flat(labels)
    non_zero = y != 0
    nz_true, nz_pred = y[non_zero] > 0, p[non_zero] > 0
    return {
        "Pearson_r": pearson_r(p, y),
        "MAE": float(np.mean(np.abs(p - y))),
        "Acc_2": float(np.mean(nz_true == nz_pred)) if non_zero.any() else float("nan"),
        "F1_score": weighted_f1(nz_true, nz_pred) if non_zero.any() else float("nan"),
        "N": float(len(y)),
    }


METRIC_SETS = {
    "mosi": mosei_regression_metrics,
    "mosei": mosei_regression_metrics,
    "sims": sims_regression_metrics,
    "simsv2": sims_regression_metrics,
    "rated": rated_text_metrics,
}


def compute_metrics(kind: str, preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The metric set named ``kind`` ("mosi", "mosei", "sims", "simsv2" or "rated")."""
    try:
        fn = METRIC_SETS[kind.lower()]
    except KeyError:
        raise ValueError(
            f"unknown metric set {kind!r}; expected one of {sorted(METRIC_SETS)}"
        ) from None
    return fn(preds, labels)


def format_metrics(metrics: dict[str, float], digits: int = 4) -> str:
    """One ``key: value`` per line, rounded like MMSA's reports."""
    width = max((len(k) for k in metrics), default=0)
    lines = []
    for key, value in metrics.items():
        shown = str(int(value)) if key == "N" else f"{value:.{digits}f}"
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
