"""Typed preprocessing errors.

Every error carries a message a user can act on (what is wrong and what to send instead). The
service maps them to HTTP statuses in one place: ``UnsupportedMediaError`` -> 415,
``MediaTooLargeError`` -> 413, ``CorruptMediaError`` / ``MediaTooLongError`` /
``NoUsableStreamError`` -> 422. ``ModelLoadError`` is a deployment fault (a model file is missing
or differs from the pinned one), not a client error.
"""

from __future__ import annotations


class PreprocessingError(Exception):
    """Base class of every error raised by ``preprocessing``.

    ``message`` is safe to show to the client; ``kind`` is a short stable identifier.
    """

    kind: str = "preprocessing_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedMediaError(PreprocessingError):
    """The bytes are not a container this service reads (an image, a text file, unknown bytes)."""

    kind = "unsupported_media"


class CorruptMediaError(PreprocessingError):
    """The container was recognised but could not be decoded (empty, damaged or truncated)."""

    kind = "corrupt_media"


class MediaTooLongError(PreprocessingError):
    """The clip's duration is over the configured limit."""

    kind = "media_too_long"


class MediaTooLargeError(PreprocessingError):
    """The file size, frame size or frame count is over the configured limit."""

    kind = "media_too_large"


class NoUsableStreamError(PreprocessingError):
    """The file has no audio or video stream that the requested modalities can use."""

    kind = "no_usable_stream"


class ExtractionStoppedError(PreprocessingError):
    """The caller asked the extraction to stop (nobody waits for its answer any more)."""

    kind = "extraction_stopped"


class LiveInputError(PreprocessingError):
    """A live stream was handed input it cannot use (not finite, wrong shape or type, time
    going backwards, or input after the end of the stream); the stream's state is unchanged."""

    kind = "invalid_stream_input"


class ModelLoadError(PreprocessingError):
    """A bundled model is missing, or its version or checksum differs from the pinned one."""

    kind = "model_load_error"


__all__ = [
    "CorruptMediaError",
    "ExtractionStoppedError",
    "LiveInputError",
    "MediaTooLargeError",
    "MediaTooLongError",
    "ModelLoadError",
    "NoUsableStreamError",
    "PreprocessingError",
    "UnsupportedMediaError",
]
