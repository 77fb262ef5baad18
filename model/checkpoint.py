"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + ``MODEL_CARD.md``.

``config.json`` holds the architecture (every :class:`CoupledMambaConfig` field, flat, with
``config_version``, so the feature profile and label scale are top-level keys), plus a
``checkpoint`` section (name, version, file hash, library versions), ``training`` (data and
recipe) and ``metrics``. Loading is strict: every tensor must be present with its shape and
dtype, and nothing extra may be there.

A checkpoint may also carry its own text encoder layers (``text_encoder.safetensors``, fine-tuned
top layers of MiniLM applied over the bundled base model; see
:mod:`preprocessing.text_tuning`), declared in a ``text_encoder`` section with the file's
sha256, which loading checks. Its features are then of profile ``tuned-text-v1``. A
``multimodal-v1`` checkpoint ships those layers and a facial-expression encoder
(``face_encoder.safetensors``, the CNN of :mod:`preprocessing.face_expression`), declared the
same way in a ``face_encoder`` section.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from model.config import CLASS_NAMES, ConfigError, CoupledMambaConfig
from model.mamba import CoupledMambaForSentiment

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
TEXT_ENCODER_FILE = "text_encoder.safetensors"
FACE_ENCODER_FILE = "face_encoder.safetensors"

# The feature profile of a checkpoint that ships text encoder layers (alone).
TEXT_ENCODER_PROFILE = "tuned-text-v1"
# The feature profile of a checkpoint that ships text encoder layers and a face encoder.
MULTIMODAL_PROFILE = "multimodal-v1"
# Profiles whose features need the checkpoint's own encoder files, per section.
ENCODER_PROFILES = {
    "text_encoder": (TEXT_ENCODER_PROFILE, MULTIMODAL_PROFILE),
    "face_encoder": (MULTIMODAL_PROFILE,),
}
ENCODER_FILES = {"text_encoder": TEXT_ENCODER_FILE, "face_encoder": FACE_ENCODER_FILE}

_RESERVED_KEYS = ("checkpoint", "training", "metrics", "text_encoder", "face_encoder")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or does not match its config."""


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself besides the weights (``load_checkpoint_with_info``)."""

    path: str
    name: str
    version: str
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_card: str = ""
    # The ``text_encoder`` section with ``path`` (absolute) added; None without one.
    text_encoder: dict[str, Any] | None = None
    # The ``face_encoder`` section with ``path`` (absolute) added; None without one.
    face_encoder: dict[str, Any] | None = None


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
    face_encoder: str | os.PathLike[str] | None = None,
    face_encoder_info: Mapping[str, Any] | None = None,
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
        face_encoder: a facial-expression encoder file to ship (profile ``multimodal-v1``
            only), recorded with ``face_encoder_info`` in the ``face_encoder`` section.

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
    for key, source, info in (
        ("text_encoder", text_encoder, text_encoder_info),
        ("face_encoder", face_encoder, face_encoder_info),
    ):
        section = _ship_encoder(folder, model.config.feature_profile, key, source, info)
        if section is not None:
            config[key] = section
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


def _ship_encoder(
    folder: Path,
    profile: str,
    key: str,
    source: str | os.PathLike[str] | None,
    info: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """Copy an encoder file into the folder; its config section (None: no such file)."""
    target = folder / ENCODER_FILES[key]
    profiles = ENCODER_PROFILES[key]
    words = key.replace("_", " ")
    if source is None:
        if profile in profiles:
            raise CheckpointError(f"feature_profile {profile!r} needs the {words} it was made with")
        target.unlink(missing_ok=True)
        return None
    if profile not in profiles:
        raise CheckpointError(
            f"a {words} needs feature_profile {' or '.join(map(repr, profiles))}, not {profile!r}"
        )
    if Path(source).resolve() != target.resolve():
        shutil.copyfile(source, target)
    return {**dict(info or {}), "file": target.name, "sha256": sha256_file(target)}


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


class LoadedCheckpoint(NamedTuple):
    """A loaded model and what its checkpoint says about itself."""

    model: CoupledMambaForSentiment
    info: CheckpointInfo


def load_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
    *,
    expected_sha256: str | None = None,
    expected_text_encoder_sha256: str | None = None,
    expected_face_encoder_sha256: str | None = None,
) -> CoupledMambaForSentiment:
    """Load a checkpoint folder into a model in eval mode on ``device``.

    The arguments, checks and errors are those of :func:`load_checkpoint_with_info`, which also
    answers the checkpoint's name, version, hashes, training facts, metrics and model card.
    """
    return load_checkpoint_with_info(
        path,
        device,
        scan_backend,
        expected_sha256=expected_sha256,
        expected_text_encoder_sha256=expected_text_encoder_sha256,
        expected_face_encoder_sha256=expected_face_encoder_sha256,
    ).model


def load_checkpoint_with_info(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
    *,
    expected_sha256: str | None = None,
    expected_text_encoder_sha256: str | None = None,
    expected_face_encoder_sha256: str | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint folder into a model in eval mode on ``device``, with its facts.

    Args:
        path: the folder written by :func:`save_checkpoint`.
        device: where to put the model.
        scan_backend: a name of ``model.ops.BACKENDS``, or "auto" to pick the best one for
            ``device`` (chosen once, here, and kept in ``model.scan_backend``).
        expected_sha256: when given, ``model.safetensors`` must have this sha256 (hex).
        expected_text_encoder_sha256: when given, the checkpoint must ship a text encoder file
            with this sha256 (its config's own record is always checked).
        expected_face_encoder_sha256: the same for the face encoder file.

    Returns:
        The model and its :class:`CheckpointInfo`.

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

    encoders = {}
    for key, expected_digest in (
        ("text_encoder", expected_text_encoder_sha256),
        ("face_encoder", expected_face_encoder_sha256),
    ):
        section = _encoder_section(folder, raw, config, key)
        if expected_digest is not None and (
            section is None or section["sha256"] != expected_digest.lower()
        ):
            found = section["sha256"] if section else "none"
            words = key.replace("_", " ")
            raise CheckpointError(f"{folder}: {words} sha256 {found}, expected {expected_digest}")
        encoders[key] = section
    card_path = folder / CARD_FILE
    section = raw.get("checkpoint") or {}
    info = CheckpointInfo(
        path=str(folder),
        name=str(section.get("name") or folder.resolve().name),
        version=str(section.get("version") or "1"),
        sha256=digest,
        training=dict(raw.get("training") or {}),
        metrics=dict(raw.get("metrics") or {}),
        model_card=card_path.read_text(encoding="utf-8") if card_path.is_file() else "",
        text_encoder=encoders["text_encoder"],
        face_encoder=encoders["face_encoder"],
    )
    return LoadedCheckpoint(model, info)


def _encoder_section(
    folder: Path, raw: Mapping[str, Any], config: CoupledMambaConfig, key: str
) -> dict[str, Any] | None:
    """Check an encoder section (``text_encoder``, ``face_encoder``) and its file; the section
    with ``path`` added."""
    section = raw.get(key)
    if section is None:
        if config.feature_profile in ENCODER_PROFILES[key]:
            raise CheckpointError(
                f"checkpoint {folder} takes {config.feature_profile} features but has no "
                f"{key} section"
            )
        return None
    if not isinstance(section, dict) or not isinstance(section.get("sha256"), str):
        raise CheckpointError(f"checkpoint {folder}: {key} must hold a sha256")
    path = folder / str(section.get("file") or ENCODER_FILES[key])
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {path.name}")
    digest = sha256_file(path)
    if digest != section["sha256"].lower():
        raise CheckpointError(f"{path} has sha256 {digest}, expected {section['sha256']}")
    return {**section, "path": str(path.resolve())}
