"""Coupled Mamba fusion model for multimodal sentiment analysis.

Public interface (see docs/ARCHITECTURE.md)::

    from model import (CoupledMambaConfig, CoupledMambaForSentiment, SentimentOutput,
                       load_checkpoint, load_checkpoint_with_info, save_checkpoint)
"""

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
