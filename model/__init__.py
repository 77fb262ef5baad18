"""Coupled Mamba fusion model for multimodal sentiment analysis.

Public interface (see docs/ARCHITECTURE.md)::

    from model import (CoupledMambaConfig, CoupledMambaForSentiment, SentimentOutput,
                       load_checkpoint, load_checkpoint_with_info, save_checkpoint)

Names are imported on first use, so that ``from model.config import CLASS_NAMES`` (the shared
vocabulary) does not import torch: the HTTP layer and the command line read it without the
network.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.checkpoint import (
        CheckpointError,
        CheckpointInfo,
        LoadedCheckpoint,
        load_checkpoint,
        load_checkpoint_with_info,
        read_checkpoint_config,
        save_checkpoint,
    )
    from model.checkpoints import default_checkpoint_path
    from model.config import (
        CLASS_NAMES,
        CONFIG_VERSION,
        MODALITY_ORDER,
        ConfigError,
        CoupledMambaConfig,
    )
    from model.mamba import CoupledMambaForSentiment, SentimentOutput

_EXPORTS: dict[str, str] = {
    "CLASS_NAMES": "model.config",
    "CONFIG_VERSION": "model.config",
    "MODALITY_ORDER": "model.config",
    "CheckpointError": "model.checkpoint",
    "CheckpointInfo": "model.checkpoint",
    "ConfigError": "model.config",
    "CoupledMambaConfig": "model.config",
    "CoupledMambaForSentiment": "model.mamba",
    "LoadedCheckpoint": "model.checkpoint",
    "SentimentOutput": "model.mamba",
    "default_checkpoint_path": "model.checkpoints",
    "load_checkpoint": "model.checkpoint",
    "load_checkpoint_with_info": "model.checkpoint",
    "read_checkpoint_config": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
}

__all__ = [
    "CLASS_NAMES",
    "CONFIG_VERSION",
    "MODALITY_ORDER",
    "CheckpointError",
    "CheckpointInfo",
    "ConfigError",
    "CoupledMambaConfig",
    "CoupledMambaForSentiment",
    "LoadedCheckpoint",
    "SentimentOutput",
    "default_checkpoint_path",
    "load_checkpoint",
    "load_checkpoint_with_info",
    "read_checkpoint_config",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
