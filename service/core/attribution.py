"""Per-modality attribution of a prediction (occlusion by modality).

For a clip ``x`` and a modality ``m`` of the checkpoint,

    attribution[m] = score(x) - score(x with every step of m masked)

i.e. how far the score moves because the model saw ``m``. Masking is the model's own notion of an
absent modality (padding and absence never change an output), so the ablated clip is simply the
clip without ``m``. It costs one extra clip per modality; all of them go through the micro-batcher
together with the full clip, so they share model calls. A modality the clip has no valid step of
gets exactly 0 (nothing to remove, nothing is run); one the checkpoint lacks gets None.
Attributions need not add up to the score: the model is not additive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from model.config import MODALITY_ORDER
from service.core.types import Attribution, ClipFeatures, ClipResult

"""The keys of every attribution, in this order."""


def without(clip: ClipFeatures, modality: str) -> ClipFeatures:
    """The clip with ``modality`` absent (the model treats it as fully masked)."""
    return ClipFeatures(
        features={m: a for m, a in clip.features.items() if m != modality},
        masks={m: a for m, a in clip.masks.items() if m != modality},
        length=clip.length,
    )


@dataclass(frozen=True)
class AttributionPlan:
    """The clips to score for one prediction and its attribution: the full clip first, then
    one clip per modality that has something to remove (``ablated`` names them in order)."""

    clips: list[ClipFeatures]
    ablated: list[str]
    model_modalities: tuple[str, ...]


def attribution_plan(clip: ClipFeatures, model_modalities: Sequence[str]) -> AttributionPlan:
    """Which clips score ``clip`` and its per-modality attribution."""
    ablated = [
        m for m in model_modalities if m in clip.masks and bool(np.asarray(clip.masks[m]).any())
    ]
    clips = [clip, *(without(clip, m) for m in ablated)]
    return AttributionPlan(clips=clips, ablated=ablated, model_modalities=tuple(model_modalities))


def attribution(plan: AttributionPlan, results: Sequence[ClipResult]) -> Attribution:
    """``{text, audio, visual}``: score(all) - score(all but m); None for modalities the
    checkpoint lacks, 0.0 for ones the clip has no valid step of. ``results`` match
    ``plan.clips`` in order."""
    full = results[0].score
    moved = {m: full - r.score for m, r in zip(plan.ablated, results[1:], strict=True)}
    return {
        m: (float(moved.get(m, 0.0)) if m in plan.model_modalities else None)
        for m in MODALITY_ORDER
    }


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean of ``values`` weighted by ``weights`` (plain mean when the weights sum to 0)."""
    w = np.asarray(weights, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if w.sum() <= 0:
        return float(v.mean()) if len(v) else 0.0
    return float((v * w).sum() / w.sum())


def mean_attribution(
    parts: Sequence[Mapping[str, float | None]], weights: Sequence[float]
) -> Attribution:
    """Weighted mean of attributions (None stays None)."""
    out: Attribution = {}
    for m in MODALITY_ORDER:
        values = [p[m] for p in parts]
        out[m] = (
            None
            if not values or any(v is None for v in values)
            else weighted_mean([float(v) for v in values if v is not None], weights)
        )
    return out
