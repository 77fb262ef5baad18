"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + ``MODEL_CARD.md``.

``config.json`` holds the architecture (every :class:`CoupledMambaConfig` field, flat, with
``config_version``, so the feature profile and label scale are top-level keys), plus a
``checkpoint`` section (name, version, file hash, library versions), ``training`` (data and
recipe) and ``metrics``. Loading is strict: every tensor must be present with its shape and
dtype, and nothing extra may be there.

A checkpoint may also carry its own text encoder layers (``text_encoder.safetensors``, fine-tuned
top layers of MiniLM applied over the bundled base model; see
:mod:`model.training.text_tuning`), declared in a ``text_encoder`` section with the file's
sha256, which loading checks. Its features are then of profile ``tuned-text-v1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import CLASS_NAMES, ConfigError, CoupledMambaConfig
from model.mamba import CoupledMambaForSentiment

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
TEXT_ENCODER_FILE = "text_encoder.safetensors"

# The feature profile of a checkpoint that ships text encoder layers.
TEXT_ENCODER_PROFILE = "tuned-text-v1"

_RESERVED_KEYS = ("checkpoint", "training", "metrics", "text_encoder")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or does not match its config."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself besides the weights (``model.checkpoint_info``)."""

    path: str
    name: str
    version: str
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_card: str = ""
    # The ``text_encoder`` section with ``path`` (absolute) added; None without one.
    text_encoder: dict[str, Any] | None = None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_model_card(
    config: CoupledMambaConfig,
    *,
    name: str,
    version: str,
    n_parameters: int,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """A plain Markdown card generated from the config, training facts and metrics."""
    low, high = config.label_scale
    lines = [
        f"# {name} (version {version})",
        "",
        "Coupled Mamba multimodal sentiment model (arXiv 2405.18014): per-modality Mamba-1",
        "mixers whose selective scans are coupled across modalities, masked pooling over time,",
        "a gated fusion of the modalities, a regression head and a 3-class head.",
        "",
        "## Architecture",
        "",
        f"- modalities: {', '.join(config.modalities)}",
        f"- feature profile: `{config.feature_profile}` "
        f"({', '.join(f'{m} {d}' for m, d in config.feature_dims.items())})",
        f"- d_model {config.d_model}, d_state {config.d_state}, d_conv {config.d_conv}, "
        f"expand {config.expand}, dt_rank {config.resolved_dt_rank}, {config.n_layers} layers",
        f"- state coupling: `{config.state_coupling}`; feature mixing: {config.feature_mixing}",
        f"- pooling `{config.pooling}`, fusion `{config.fusion}`, norm `{config.norm}`",
        f"- parameters: {n_parameters:,}",
        "",
        "## Outputs",
        "",
        f"- score on the scale [{low:g}, {high:g}]",
        f"- class probabilities: {', '.join(CLASS_NAMES)} (neutral band ±{config.neutral_band:g} "
        "around the middle of the scale when labels come from scores)",
        "",
        "## Training",
        "",
    ]
    if training:
        lines += [f"- {key}: {_card_value(value)}" for key, value in training.items()]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += [f"- {key}: {_card_value(value)}" for key, value in metrics.items()]
    else:
        lines.append("Not recorded.")
    lines += [
        "",
        "## Limitations",
        "",
        "Scores reflect the training data's domain and language; they are not a judgement of a",
        "person. Inputs must come from the feature profile above.",
        "",
    ]
    return "\n".join(lines)


def _card_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def save_checkpoint(
    model: CoupledMambaForSentiment,
    path: str | os.PathLike[str],
    *,
    model_card: str | None = None,
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    name: str | None = None,
    version: str = "1",
    text_encoder: str | os.PathLike[str] | None = None,
    text_encoder_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (created if needed; its three files are overwritten).

    Args:
        model: the model to save; its weights are written in their current dtype.
        path: the folder.
        model_card: Markdown for ``MODEL_CARD.md``; a generated card when None.
        training: JSON-ready facts about the training data and recipe.
        metrics: JSON-ready evaluation results.
        name: the model's name (default: the folder's name).
        version: the model's version string.
        text_encoder: a file of fine-tuned text encoder layers to ship in the folder (the
            model's ``feature_profile`` must then be ``tuned-text-v1``); ``text_encoder_info``
            is recorded beside its sha256 in the ``text_encoder`` section.

    Returns:
        The folder's path.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or folder.resolve().name
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": "pt"})

    config = model.config.to_dict()
    clashes = [k for k in _RESERVED_KEYS if k in config]
    if clashes:  # a config field must never shadow a section
        raise CheckpointError(f"config fields {clashes} clash with config.json sections")
    config["checkpoint"] = {
        "name": name,
        "version": str(version),
        "weights_sha256": sha256_file(weights),
        "parameters": model.count_parameters(),
        "torch": torch.__version__,
    }
    config["training"] = dict(training or {})
    config["metrics"] = dict(metrics or {})
    tuned_file = folder / TEXT_ENCODER_FILE
    if text_encoder is not None:
        if model.config.feature_profile != TEXT_ENCODER_PROFILE:
            raise CheckpointError(
                f"a text encoder needs feature_profile {TEXT_ENCODER_PROFILE!r}, "
                f"not {model.config.feature_profile!r}"
            )
        source = Path(text_encoder)
        if source.resolve() != tuned_file.resolve():
            shutil.copyfile(source, tuned_file)
        config["text_encoder"] = {
            **dict(text_encoder_info or {}),
            "file": TEXT_ENCODER_FILE,
            "sha256": sha256_file(tuned_file),
        }
    elif model.config.feature_profile == TEXT_ENCODER_PROFILE:
        raise CheckpointError(
            f"feature_profile {TEXT_ENCODER_PROFILE!r} needs the text encoder layers it was "
            "made with"
        )
    else:
        tuned_file.unlink(missing_ok=True)
    text = json.dumps(config, indent=2, sort_keys=False, default=_json_default)
    (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")

    if model_card is None:
        model_card = default_model_card(
            model.config,
            name=name,
            version=str(version),
            n_parameters=model.count_parameters(),
            training=training,
            metrics=metrics,
        )
    (folder / CARD_FILE).write_text(model_card, encoding="utf-8")
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_checkpoint_config(path: str | os.PathLike[str]) -> tuple[CoupledMambaConfig, dict]:
    """Read and validate a checkpoint's ``config.json``.

    Returns the architecture config and the raw dict (with its ``checkpoint``, ``training``
    and ``metrics`` sections).

    Raises:
        CheckpointError: no folder or no config file, invalid JSON, unknown config version,
            invalid fields.
    """
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {CONFIG_FILE}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    arch = {k: v for k, v in raw.items() if k not in _RESERVED_KEYS}
    try:
        config = CoupledMambaConfig.from_dict(arch, strict=True)
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    except TypeError as exc:
        raise CheckpointError(f"{config_path}: invalid field value: {exc}") from exc
    return config, raw


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
    *,
    expected_sha256: str | None = None,
    expected_text_encoder_sha256: str | None = None,
) -> CoupledMambaForSentiment:
    """Load a checkpoint folder into a model in eval mode on ``device``.

    Args:
        path: the folder written by :func:`save_checkpoint`.
        device: where to put the model.
        scan_backend: a name of ``model.ops.BACKENDS``, or "auto" to pick the best one for
            ``device`` (chosen once, here, and kept in ``model.scan_backend``).
        expected_sha256: when given, ``model.safetensors`` must have this sha256 (hex).
        expected_text_encoder_sha256: when given, the checkpoint must ship a text encoder file
            with this sha256 (its config's own record is always checked).

    Returns:
        The model, with ``model.checkpoint_info`` (:class:`CheckpointInfo`) attached.

    Raises:
        CheckpointError: missing files, hash mismatch, unknown config version, missing,
            unexpected or mismatched tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    config, raw = read_checkpoint_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    digest = sha256_file(weights)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(f"{weights} has sha256 {digest}, expected {expected_sha256.lower()}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc

    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        model = CoupledMambaForSentiment(config, scan_backend="ref")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing tensors {missing}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected}")
        if mismatched:
            problems.append(f"mismatched tensors [{'; '.join(mismatched)}]")
        raise CheckpointError(f"{weights} does not match its config: {'; '.join(problems)}")
    model.load_state_dict(tensors, strict=True)
    model.to(device)
    model.eval()
    model.set_scan_backend(scan_backend)

    text_encoder = _text_encoder_section(folder, raw, config)
    if expected_text_encoder_sha256 is not None and (
        text_encoder is None or text_encoder["sha256"] != expected_text_encoder_sha256.lower()
    ):
        found = text_encoder["sha256"] if text_encoder else "none"
        raise CheckpointError(
            f"{folder}: text encoder sha256 {found}, expected {expected_text_encoder_sha256}"
        )
    card_path = folder / CARD_FILE
    section = raw.get("checkpoint") or {}
    model.checkpoint_info = CheckpointInfo(
        path=str(folder),
        name=str(section.get("name") or folder.resolve().name),
        version=str(section.get("version") or "1"),
        sha256=digest,
        training=dict(raw.get("training") or {}),
        metrics=dict(raw.get("metrics") or {}),
        model_card=card_path.read_text(encoding="utf-8") if card_path.is_file() else "",
        text_encoder=text_encoder,
    )
    return model


def _text_encoder_section(
    folder: Path, raw: Mapping[str, Any], config: CoupledMambaConfig
) -> dict[str, Any] | None:
    """Check the ``text_encoder`` section and its file; the section with ``path`` added."""
    section = raw.get("text_encoder")
    if section is None:
        if config.feature_profile == TEXT_ENCODER_PROFILE:
            raise CheckpointError(
                f"checkpoint {folder} takes {TEXT_ENCODER_PROFILE} features but has no "
                "text_encoder section"
            )
        return None
    if not isinstance(section, dict) or not isinstance(section.get("sha256"), str):
        raise CheckpointError(f"checkpoint {folder}: text_encoder must hold a sha256")
    path = folder / str(section.get("file") or TEXT_ENCODER_FILE)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {path.name}")
    digest = sha256_file(path)
    if digest != section["sha256"].lower():
        raise CheckpointError(f"{path} has sha256 {digest}, expected {section['sha256']}")
    return {**section, "path": str(path.resolve())}
