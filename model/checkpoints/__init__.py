"""The checkpoints embedded in the package: where they are, and the hashes they must have.

- ``default/``: the three-modality checkpoint ``make run`` serves, built by ``make default-model``
  (docs/TRAINING.md), which also rewrites its hashes below. Its weights inherit RAVDESS's
  non-commercial licence (its MODEL_CARD.md).
- ``text-only/``: the text-only checkpoint (rated sentences only), for users who need weights
  without that licence: serve it with ``CMAMBA_MODEL_PATH=text-only``.

Loading either folder always checks the sha256 of its ``model.safetensors`` and of its encoder
files against the pins below, so a corrupted or swapped file is refused instead of served.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from model.mamba import CoupledMambaForSentiment

DEFAULT_CHECKPOINT_SHA256 = "e687ba7829c22246518f1c7cdc3b7dcea12526a16fcdfbbd6761f2110f40e4ec"
"""sha256 (hex) of ``default/model.safetensors``; written by scripts/build_default_model.py."""

DEFAULT_TEXT_ENCODER_SHA256 = "a51bf4769e389ad02163fab8d79765c1abe6d3a0cd3ef4603f45399309c14fdc"
"""sha256 (hex) of ``default/text_encoder.safetensors`` (empty: the checkpoint has none)."""

DEFAULT_FACE_ENCODER_SHA256 = "f3e61d0ae95e03119babb180b722d1012d842016e21c7e8859a47f44f9c4e2f4"
"""sha256 (hex) of ``default/face_encoder.safetensors`` (empty: the checkpoint has none)."""

TEXT_ONLY_CHECKPOINT_SHA256 = "c7b007ddc8e076354c7e3a8540f175ce555f74e6ab400084f5895800ba09e95c"
"""sha256 (hex) of ``text-only/model.safetensors``; written by scripts/build_text_model.py."""

TEXT_ONLY_TEXT_ENCODER_SHA256 = "a51bf4769e389ad02163fab8d79765c1abe6d3a0cd3ef4603f45399309c14fdc"
"""sha256 (hex) of ``text-only/text_encoder.safetensors``."""


def text_only_checkpoint_path() -> Path:
    """Folder of the embedded text-only checkpoint."""
    return Path(__file__).resolve().parent / "text-only"


def default_checkpoint_path() -> Path:
    """Folder of the embedded default checkpoint (config.json, model.safetensors, card)."""
    return Path(__file__).resolve().parent / "default"


def load_default_checkpoint(
    device: str | torch.device = "cpu", scan_backend: str = "auto"
) -> CoupledMambaForSentiment:
    """Load the embedded default checkpoint, verifying its pinned sha256.

    Raises:
        model.CheckpointError: the folder is incomplete or the weights' hash differs.
    """
    from model.checkpoint import load_checkpoint

    return load_checkpoint(
        default_checkpoint_path(),
        device=device,
        scan_backend=scan_backend,
        **pinned_hashes(default_checkpoint_path()),
    )


def pinned_hashes(path: str | Path) -> dict[str, str]:
    """``load_checkpoint`` keyword arguments that pin the files of an embedded checkpoint when
    ``path`` is its folder; empty for any other folder."""
    folder = Path(path).resolve()
    if folder == default_checkpoint_path().resolve():
        values = (
            DEFAULT_CHECKPOINT_SHA256,
            DEFAULT_TEXT_ENCODER_SHA256,
            DEFAULT_FACE_ENCODER_SHA256,
        )
    elif folder == text_only_checkpoint_path().resolve():
        values = (TEXT_ONLY_CHECKPOINT_SHA256, TEXT_ONLY_TEXT_ENCODER_SHA256, "")
    else:
        return {}
    keys = ("expected_sha256", "expected_text_encoder_sha256", "expected_face_encoder_sha256")
    return {key: value for key, value in zip(keys, values, strict=True) if value}


__all__ = [
    "DEFAULT_CHECKPOINT_SHA256",
    "DEFAULT_FACE_ENCODER_SHA256",
    "DEFAULT_TEXT_ENCODER_SHA256",
    "TEXT_ONLY_CHECKPOINT_SHA256",
    "TEXT_ONLY_TEXT_ENCODER_SHA256",
    "default_checkpoint_path",
    "load_default_checkpoint",
    "pinned_hashes",
    "text_only_checkpoint_path",
]
