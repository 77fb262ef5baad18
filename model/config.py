"""The Coupled Mamba configuration: every architectural knob, versioned for checkpoints.

A checkpoint's ``config.json`` is this dataclass as a dict plus ``config_version``. A config
written by an older version is upgraded explicitly, one version at a time, by the functions in
``_UPGRADES``; a config from a version this code does not know is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

CONFIG_VERSION = 2
"""The config layout this code writes. Bump it when a field changes meaning or is removed,
and add an upgrade function from the previous version to ``_UPGRADES``."""

# The shared vocabulary. The service, the trainer and the command line import these names
# (``model.config`` imports no torch); preprocessing keeps its own copy of the modality names
# (``preprocessing.profiles.MODALITIES``) because model and preprocessing never import each
# other, and a test checks the two agree.

Modality = Literal["text", "audio", "visual"]
MODALITY_ORDER: tuple[str, ...] = get_args(Modality)
"""Every modality name the model knows, in the one order used everywhere."""

SentimentClass = Literal["negative", "neutral", "positive"]
CLASS_NAMES: tuple[str, ...] = get_args(SentimentClass)
"""Order of the classification head's outputs."""

EMOTION_NAMES: tuple[str, ...] = (
    "neutral",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgust",
    "surprised",
)
"""Emotion classes the embedded default's emotion head predicts (the classes RAVDESS and FER2013
share; RAVDESS's "calm" is taken as neutral). A checkpoint lists its own in ``emotion_classes``."""

# The choices of the config's string fields (``cmamba train`` offers the same).
STATE_COUPLINGS: tuple[str, ...] = ("none", "mean", "sum", "learned")
POOLINGS: tuple[str, ...] = ("mean", "last", "max")
FUSIONS: tuple[str, ...] = ("gate", "mean", "concat")
NORMS: tuple[str, ...] = ("layernorm", "rmsnorm")


class ConfigError(ValueError):
    """A configuration is invalid, or comes from a config version this code cannot read."""


def _default_feature_dims() -> dict[str, int]:
    # The "default-v1" preprocessing profile: MiniLM-L6 text, the CH-SIMS librosa audio recipe,
    # face-mesh expression features. The profile is the authority; a test checks they agree.
    return {"text": 384, "audio": 33, "visual": 17}


@dataclass
class CoupledMambaConfig:
    """Architecture and output conventions of a :class:`CoupledMambaForSentiment`.

    Attributes:
        modalities: modality branches of the network, a subset of ``MODALITY_ORDER`` kept in
            that order.
        feature_dims: input feature size per modality (keys = ``modalities``).
        feature_profile: name of the preprocessing feature profile the inputs come from.
        d_model: width of the residual stream of every modality.
        d_state: SSM state size N per channel (the paper's released code uses 64).
        d_conv: kernel size of the causal depthwise convolution.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the dt projection; "auto" = ceil(d_model / 8).
        n_layers: number of coupled Mamba layers.
        state_coupling: how a layer's scan mixes the previous states of the modalities:
            "none" (W = I, independent Mamba per modality), "mean" (W = ones / M),
            "learned" (W = softmax(W_logits) per row, initialised at mean coupling), or
            "sum" (W = all ones: the paper's literal "sum of states"; the transition can
            reach M per step and diverges over long inputs; kept for ablation only).
        feature_mixing: add the released code's between-layer mix: after every layer each
            modality adds a Linear map of the concatenated outputs of the other modalities.
        pooling: masked pooling over time per modality: "mean", "last" (last valid step) or
            "max".
        fusion: how pooled modalities are combined: "gate" (softmax gate over present
            modalities), "mean" (mean over present modalities) or "concat" (concatenation,
            absent modalities as zeros, then a Linear).
        norm: pre-norm type of every layer, "layernorm" or "rmsnorm".
        norm_eps: epsilon of the norms.
        dt_min, dt_max, dt_init_floor: Mamba's dt initialisation (log-uniform in
            [dt_min, dt_max], floored at dt_init_floor).
        dropout: dropout on the input projection, residual branches and heads.
        label_scale: (low, high) range of the regression score.
        n_classes: size of the classification head (negative, neutral, positive).
        neutral_band: half-width, in label units, of the neutral class around the middle of
            the label scale when class labels are derived from a score (see
            ``score_to_class``).
        emotion_classes: names of the emotion head's classes, in output order; empty means
            the network has no emotion head (config version 1 had none).
    """

    modalities: tuple[str, ...] = MODALITY_ORDER
    feature_dims: dict[str, int] = field(default_factory=_default_feature_dims)
    feature_profile: str = "default-v1"
    d_model: int = 128
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    n_layers: int = 3
    state_coupling: str = "learned"
    feature_mixing: bool = False
    pooling: str = "mean"
    fusion: str = "gate"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dropout: float = 0.1
    label_scale: tuple[float, float] = (-3.0, 3.0)
    n_classes: int = 3
    neutral_band: float = 0.5
    emotion_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare equal after a round trip.
        self.modalities = tuple(self.modalities)
        self.emotion_classes = tuple(str(e) for e in self.emotion_classes)
        self.label_scale = (float(self.label_scale[0]), float(self.label_scale[1]))
        # Sizes of modalities the network has no branch for are dropped, so a profile's full
        # table can be passed as is.
        dims = {str(k): int(v) for k, v in dict(self.feature_dims).items()}
        self.feature_dims = {m: dims[m] for m in self.modalities if m in dims}
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if not self.modalities:
            raise ConfigError("modalities must name at least one modality")
        unknown = [m for m in self.modalities if m not in MODALITY_ORDER]
        if unknown:
            raise ConfigError(f"unknown modalities {unknown}; known: {MODALITY_ORDER}")
        ordered = tuple(m for m in MODALITY_ORDER if m in self.modalities)
        if ordered != self.modalities:
            raise ConfigError(
                f"modalities must be unique and in the order {MODALITY_ORDER}, "
                f"got {self.modalities}"
            )
        missing = [m for m in self.modalities if m not in self.feature_dims]
        if missing:
            raise ConfigError(f"feature_dims has no size for modalities {missing}")
        for name, dim in self.feature_dims.items():
            if dim <= 0:
                raise ConfigError(f"feature_dims[{name!r}] must be positive, got {dim}")
        for name in ("d_model", "d_state", "d_conv", "expand", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.dt_rank != "auto" and (
            not isinstance(self.dt_rank, int) or isinstance(self.dt_rank, bool) or self.dt_rank <= 0
        ):
            raise ConfigError(f"dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        self._check_choice("state_coupling", STATE_COUPLINGS)
        self._check_choice("pooling", POOLINGS)
        self._check_choice("fusion", FUSIONS)
        self._check_choice("norm", NORMS)
        if not isinstance(self.feature_mixing, bool):
            raise ConfigError(f"feature_mixing must be a bool, got {self.feature_mixing!r}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.dt_init_floor <= 0.0:
            raise ConfigError(f"dt_init_floor must be positive, got {self.dt_init_floor}")
        if not 0.0 < self.norm_eps < 1.0:
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        low, high = self.label_scale
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(
                f"label_scale must be finite (low, high) with low < high, got {self.label_scale}"
            )
        if self.n_classes != len(CLASS_NAMES):
            raise ConfigError(f"n_classes must be {len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)})")
        if len(set(self.emotion_classes)) != len(self.emotion_classes) or any(
            not e for e in self.emotion_classes
        ):
            raise ConfigError(
                f"emotion_classes must be unique non-empty names, got {self.emotion_classes}"
            )
        if len(self.emotion_classes) == 1:
            raise ConfigError("emotion_classes needs at least two classes (or none)")
        if not 0.0 <= self.neutral_band < (high - low) / 2:
            raise ConfigError(
                f"neutral_band must be in [0, {(high - low) / 2}), got {self.neutral_band}"
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {choices}, got {value!r}")

    # Derived sizes ---------------------------------------------------------------------------

    @property
    def d_inner(self) -> int:
        """Channels of the Mamba mixer: expand * d_model."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """dt_rank as an int: "auto" = ceil(d_model / 8), as in the paper's released code."""
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 8)
        return int(self.dt_rank)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def score_to_class(self, score: float) -> int:
        """Class index (0 negative, 1 neutral, 2 positive) of a score on the label scale.

        The neutral class covers ``|score - middle| <= neutral_band``.
        """
        low, high = self.label_scale
        offset = score - (low + high) / 2
        if offset < -self.neutral_band:
            return 0
        if offset > self.neutral_band:
            return 2
        return 1

    # Serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``config_version``."""
        out: dict[str, Any] = {"config_version": CONFIG_VERSION}
        out.update(asdict(self))
        out["modalities"] = list(self.modalities)
        out["label_scale"] = list(self.label_scale)
        out["emotion_classes"] = list(self.emotion_classes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> CoupledMambaConfig:
        """Build a config from :meth:`to_dict` output, upgrading older versions.

        Args:
            data: the dict; it must carry ``config_version``.
            strict: refuse missing fields too (unknown fields are always refused). Checkpoints
                load strictly so that a changed default never silently changes a model.

        Raises:
            ConfigError: unknown or missing version, unknown or missing fields, invalid values.
        """
        data = dict(data)
        version = data.pop("config_version", None)
        if version is None:
            raise ConfigError("config has no 'config_version'")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError(f"config_version must be an int, got {version!r}")
        if version > CONFIG_VERSION or version < 1:
            raise ConfigError(
                f"config_version {version} is not supported by this code (it reads versions "
                f"1 to {CONFIG_VERSION}); upgrade the package to load this checkpoint"
            )
        data = upgrade_config_dict(data, version)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config has unknown fields {unknown}")
        missing = sorted(names - set(data))
        if strict and missing:
            raise ConfigError(f"config is missing fields {missing}")
        return cls(**data)


def _upgrade_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    # Version 2 added the optional emotion head; every version-1 network had none.
    data.setdefault("emotion_classes", [])
    return data


# _UPGRADES[v] turns a version-v dict (without "config_version") into a version v+1 dict.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2}


def upgrade_config_dict(data: dict[str, Any], version: int) -> dict[str, Any]:
    """Apply the upgrades from ``version`` to ``CONFIG_VERSION``, one step at a time."""
    while version < CONFIG_VERSION:
        step = _UPGRADES.get(version)
        if step is None:
            raise ConfigError(f"no upgrade from config_version {version} to {version + 1}")
        data = step(dict(data))
        version += 1
    return data
