"""The checkpoint embedded in the package: where it is, and the hash it must have.

``model/checkpoints/default/`` is built by ``make default-model`` (see docs/TRAINING.md), which
also rewrites the hashes below. Loading the default checkpoint always checks the sha256 of its
``model.safetensors``, ``text_encoder.safetensors`` and ``face_encoder.safetensors`` against them,
so a corrupted or swapped file is refused instead of served.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from model.mamba import CoupledMambaForSentiment

DEFAULT_CHECKPOINT_SHA256 = "c7b007ddc8e076354c7e3a8540f175ce555f74e6ab400084f5895800ba09e95c"
"""sha256 (hex) of ``default/model.safetensors``; written by scripts/build_default_model.py."""

DEFAULT_TEXT_ENCODER_SHA256 = "a51bf4769e389ad02163fab8d79765c1abe6d3a0cd3ef4603f45399309c14fdc"
"""sha256 (hex) of ``default/text_encoder.safetensors`` (empty: the checkpoint has none)."""

DEFAULT_FACE_ENCODER_SHA256 = ""
"""sha256 (hex) of ``default/face_encoder.safetensors`` (empty: the checkpoint has none)."""


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
    """``load_checkpoint`` keyword arguments that pin the files of the embedded default
    checkpoint when ``path`` is its folder; empty for any other folder."""
    if Path(path).resolve() != default_checkpoint_path().resolve():
        return {}
    pins = {}
    if DEFAULT_CHECKPOINT_SHA256:
        pins["expected_sha256"] = DEFAULT_CHECKPOINT_SHA256
    if DEFAULT_TEXT_ENCODER_SHA256:
        pins["expected_text_encoder_sha256"] = DEFAULT_TEXT_ENCODER_SHA256
    if DEFAULT_FACE_ENCODER_SHA256:
        pins["expected_face_encoder_sha256"] = DEFAULT_FACE_ENCODER_SHA256
    return pins


__all__ = [
    "DEFAULT_CHECKPOINT_SHA256",
    "DEFAULT_FACE_ENCODER_SHA256",
    "DEFAULT_TEXT_ENCODER_SHA256",
    "default_checkpoint_path",
    "load_default_checkpoint",
    "pinned_hashes",
]
