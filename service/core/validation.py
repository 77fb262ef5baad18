"""Input validation: precomputed features and extracted feature bundles checked against the
loaded checkpoint, and turned into :class:`ClipFeatures` for the model.

Every refusal is a domain error (:mod:`service.errors`) with a message the client can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from service.core.extraction import FeatureBundleLike
from service.core.types import ClipFeatures
from service.errors import (
    FeatureMismatchError,
    InvalidInputError,
    UndecodableMediaError,
    echo,
    echo_names,
)

if TYPE_CHECKING:
    from model import CoupledMambaConfig

WANTED = {"text": "speech", "audio": "audio", "visual": "a face"}
"""What a media file must hold for each modality to have a valid step."""


def clip_from_features(
    config: CoupledMambaConfig,
    max_steps: int,
    profile: str,
    features: Mapping[str, np.ndarray | Sequence[Sequence[float]]],
    masks: Mapping[str, np.ndarray | Sequence[bool]] | None = None,
) -> ClipFeatures:
    """Validate precomputed features (arrays or nested lists) against the loaded checkpoint's
    ``config``, with at most ``max_steps`` steps.

    Raises:
        FeatureMismatchError: other profile, modality or feature size than the checkpoint.
        InvalidInputError: ragged, empty, too long, non-finite or fully masked input.
    """
    if profile != config.feature_profile:
        raise FeatureMismatchError(
            f"features are in profile {echo(profile)}, but the loaded model takes "
            f"{config.feature_profile!r}"
        )
    if not features:
        raise InvalidInputError("features must hold at least one modality")
    unknown = sorted(set(features) - set(config.modalities))
    if unknown:
        raise FeatureMismatchError(
            f"modalities {echo_names(unknown)} are not inputs of the loaded model "
            f"(it takes {list(config.modalities)})"
        )
    arrays: dict[str, np.ndarray] = {}
    for modality in config.modalities:
        if modality not in features:
            continue
        try:
            with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
                array = np.asarray(features[modality], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"features.{modality} must be a rectangular list of steps x {modality} "
                "feature values"
            ) from exc
        dim = config.feature_dims[modality]
        if array.ndim != 2 or array.shape[0] == 0:
            raise InvalidInputError(
                f"features.{modality} must be a non-empty list of steps, each a list of "
                f"{dim} numbers"
            )
        if array.shape[1] != dim:
            raise FeatureMismatchError(
                f"features.{modality} has {array.shape[1]} values per step; profile "
                f"{config.feature_profile!r} has {dim}"
            )
        if not np.isfinite(array).all():
            raise InvalidInputError(f"features.{modality} holds values out of float32 range")
        arrays[modality] = array
    lengths = {m: a.shape[0] for m, a in arrays.items()}
    length = next(iter(lengths.values()))
    if any(n != length for n in lengths.values()):
        raise InvalidInputError(f"all modalities must share one time grid, got {lengths}")
    if length > max_steps:
        raise InvalidInputError(f"{length} steps is over the limit of {max_steps}")
    mask_arrays: dict[str, np.ndarray] = {}
    extra = sorted(set(masks or {}) - set(arrays))
    if extra:
        raise InvalidInputError(f"masks given for modalities without features: {echo_names(extra)}")
    for modality in arrays:
        given = (masks or {}).get(modality)
        if given is None:
            mask_arrays[modality] = np.ones(length, dtype=np.bool_)
            continue
        mask = np.asarray(given, dtype=np.bool_)
        if mask.shape != (length,):
            raise InvalidInputError(
                f"masks.{modality} must have one flag per step ({length}), got {mask.shape}"
            )
        mask_arrays[modality] = mask
    if not any(m.any() for m in mask_arrays.values()):
        raise InvalidInputError("every step of every modality is masked out")
    return ClipFeatures(features=arrays, masks=mask_arrays, length=length)


def clip_from_bundle(
    bundle: FeatureBundleLike, config: CoupledMambaConfig, max_steps: int | None
) -> ClipFeatures:
    """The checkpoint's modalities of an extracted bundle as one clip.

    Args:
        bundle: the extractor's output.
        config: the loaded checkpoint's configuration.
        max_steps: the longest clip taken (None: any length, for callers that cut it).

    Raises:
        UndecodableMediaError: the media holds nothing the model uses.
        InvalidInputError: the media spans more than ``max_steps`` steps.
    """
    if bundle.profile != config.feature_profile:
        raise RuntimeError(
            f"extractor profile {bundle.profile!r} differs from the model's "
            f"{config.feature_profile!r}"
        )
    length = int(bundle.length)
    if length <= 0:
        raise UndecodableMediaError("the media holds no usable content")
    if max_steps is not None and length > max_steps:
        raise InvalidInputError(f"the media spans {length} steps, over the limit of {max_steps}")
    features = {
        m: np.asarray(bundle.features[m], dtype=np.float32)
        for m in config.modalities
        if m in bundle.features
    }
    masks = {m: np.asarray(bundle.masks[m], dtype=np.bool_) for m in features}
    if not any(mask.any() for mask in masks.values()):
        missing = " or ".join(WANTED[m] for m in config.modalities)
        raise UndecodableMediaError(
            f"the model uses {', '.join(config.modalities)}, and the media holds no {missing}"
        )
    return ClipFeatures(features=features, masks=masks, length=length)
