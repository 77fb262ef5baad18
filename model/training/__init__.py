"""Training and evaluation of Coupled Mamba checkpoints.

Data in the MMSA pickle layout or in this package's compact feature cache
(:mod:`model.training.data`), the MMSA metrics (:mod:`model.training.metrics`), the training
loop (:mod:`model.training.trainer`), rated sentences and their fixed split
(:mod:`model.training.rated_texts`), and VADER as a reference (:mod:`model.training.baselines`).
Nothing here imports ``preprocessing``: features arrive as numpy arrays.
"""

from model.training.data import (
    Batch,
    FeatureDataset,
    Sample,
    collate,
    load_dataset,
    load_feature_cache,
    load_mmsa_pickle,
    save_feature_cache,
)
from model.training.metrics import compute_metrics, format_metrics
from model.training.trainer import (
    RunMismatchError,
    TrainResult,
    TrainSettings,
    evaluate_samples,
    predict_scores,
    train,
)

__all__ = [
    "Batch",
    "FeatureDataset",
    "RunMismatchError",
    "Sample",
    "TrainResult",
    "TrainSettings",
    "collate",
    "compute_metrics",
    "evaluate_samples",
    "format_metrics",
    "load_dataset",
    "load_feature_cache",
    "load_mmsa_pickle",
    "predict_scores",
    "save_feature_cache",
    "train",
]
