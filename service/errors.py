"""Domain errors of the service: what went wrong, in the service's own words.

The inference core, the upload parser and the feature parser raise these exceptions; none of
them knows HTTP. Each error names itself (``error_type``, the ``type`` of the JSON error body)
and, when it refuses a request on a limit, the ``rejected_requests_total`` reason. Which HTTP
status and headers answer each is decided in one place, :mod:`service.api.errors`.
Preprocessing errors are translated here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

MAX_ECHO_CHARS = 64
"""Longest client-sent value quoted in an error message (longer ones are cut)."""
MAX_ECHO_ITEMS = 5
"""Most client-sent names listed in an error message."""
MAX_MESSAGE_CHARS = 1000
"""Longest error message answered (a last bound on anything a message quotes)."""


def echo(value: object) -> str:
    """A client-sent value quoted for an error message, cut to ``MAX_ECHO_CHARS``."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= MAX_ECHO_CHARS:
        return repr(text)
    return f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"


def echo_names(names: Sequence[object]) -> str:
    """Client-sent names quoted for an error message: the first ``MAX_ECHO_ITEMS``, each cut."""
    shown = [echo(name) for name in names[:MAX_ECHO_ITEMS]]
    if len(names) > MAX_ECHO_ITEMS:
        shown.append(f"... {len(names) - MAX_ECHO_ITEMS} more")
    return f"[{', '.join(shown)}]"


class ServiceError(Exception):
    """Base of every error the service answers with; ``error_type`` names it in the JSON."""

    error_type: ClassVar[str] = "internal_error"
    reject_reason: str | None = None
    """Label of ``rejected_requests_total`` when this error refuses a request on a limit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(ServiceError):
    """The request is well-formed HTTP but its content is not acceptable."""

    error_type = "invalid_input"


class FeatureMismatchError(InvalidInputError):
    """Precomputed features do not match the loaded checkpoint's profile or dimensions."""

    error_type = "feature_mismatch"


class UndecodableMediaError(InvalidInputError):
    """The uploaded media cannot be decoded, is too long, or has no usable stream."""

    error_type = "undecodable_media"


class InvalidJobCursorError(InvalidInputError):
    """A job listing's paging cursor is not one the job store handed out."""

    error_type = "invalid_cursor"


class UnsupportedMediaError(ServiceError):
    """The request or the uploaded file has a media type the service does not take."""

    error_type = "unsupported_media"


class PayloadTooLargeError(ServiceError):
    """The request body is over the upload limit."""

    error_type = "payload_too_large"
    reject_reason = "too_large"


class UnauthorizedError(ServiceError):
    """A bearer token is required and was missing or wrong."""

    error_type = "unauthorized"


class ModelNotFoundError(ServiceError):
    """No model of that name is served here."""

    error_type = "model_not_found"


class MediaDisabledError(ServiceError):
    """This deployment serves precomputed features only."""

    error_type = "media_disabled"


class ClientDisconnectedError(ServiceError):
    """The client went away before its request was read (nginx's 499; nobody gets the answer)."""

    error_type = "client_closed_request"


class RetryableError(ServiceError):
    """Temporary refusal (capacity, readiness, memory): the client may retry later."""


class NotReadyError(RetryableError):
    """The model is still loading or warming up."""

    error_type = "not_ready"
    reject_reason = "not_ready"


class DrainingError(RetryableError):
    """The server is shutting down and takes no new work."""

    error_type = "draining"
    reject_reason = "draining"


class OverCapacityError(RetryableError):
    """The queue or the in-flight limit is full; ``reason`` says which."""

    error_type = "over_capacity"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reject_reason = reason


class GpuOutOfMemoryError(RetryableError):
    """The clip did not fit in GPU memory even in a batch of one."""

    error_type = "gpu_oom"
    reject_reason = "gpu_oom"


class FatalServiceError(RetryableError):
    """The instance hit a failure it cannot recover from (a CUDA error, a dead worker thread):
    it fails what it holds, turns not live, and exits to be restarted; retry elsewhere."""

    error_type = "unavailable"
    reject_reason = "fatal"


class DeadlineExceededError(ServiceError):
    """The request was not answered within the request deadline."""

    error_type = "deadline_exceeded"
    reject_reason = "deadline"


# Jobs: long recordings (/v1/jobs) ------------------------------------------------------------


class JobNotFoundError(ServiceError):
    """No job has that id (never created, deleted, or expired)."""

    error_type = "job_not_found"


class JobNotFinishedError(ServiceError):
    """The job has no result (yet): it is queued or running, or it failed or was cancelled."""

    error_type = "job_not_finished"


class JobRequestError(ServiceError):
    """A job request names something it may not: a path outside the import folder, a callback
    target outside the allow-list."""

    error_type = "bad_request"


class ImportPathError(JobRequestError):
    """The ``path`` of a job is not a file inside the configured import folder."""

    error_type = "invalid_path"


class CallbackNotAllowedError(JobRequestError):
    """The ``callback_url`` of a job is not an allowed target."""

    error_type = "callback_not_allowed"


class MediaTooLongForJobError(InvalidInputError):
    """The recording is longer than a job may be."""

    error_type = "media_too_long"


class TooManyJobsError(ServiceError):
    """As many jobs as allowed are queued already; retry later."""

    error_type = "too_many_jobs"
    reject_reason = "jobs_queue_full"


class JobStorageFullError(ServiceError):
    """The uploads kept for jobs would pass the disk quota."""

    error_type = "insufficient_storage"
    reject_reason = "jobs_disk_quota"


class JobsDisabledError(MediaDisabledError):
    """This server runs no jobs (disabled, or it extracts no media)."""

    error_type = "jobs_disabled"


# Live streams (WS /v1/stream): each ends its own stream with a close code
# (service.api.errors.WS_CLOSE_CODES).


class StreamProtocolError(InvalidInputError):
    """A live stream's message breaks the protocol (docs/STREAMING.md)."""

    error_type = "stream_protocol"


class StreamMessageTooLargeError(PayloadTooLargeError):
    """A live stream's message is over ``stream_max_message_bytes``."""


class TooManyStreamsError(OverCapacityError):
    """``stream_max_streams`` live streams are already open."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="streams")


class StartupError(RuntimeError):
    """The service cannot start (missing checkpoint, mismatched extractor...)."""


def from_preprocessing_error(exc: Exception) -> ServiceError:
    """Translate a ``preprocessing.errors`` exception into the service's own error."""
    from preprocessing import errors as pre

    message = str(exc) or type(exc).__name__
    if isinstance(exc, pre.UnsupportedMediaError):
        return UnsupportedMediaError(message)
    if isinstance(exc, pre.MediaTooLargeError):
        return PayloadTooLargeError(message)
    if isinstance(exc, pre.ExtractionStoppedError):
        return DeadlineExceededError("the request deadline passed during extraction")
    return UndecodableMediaError(message)


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The JSON body of every error answer (the message cut to ``MAX_MESSAGE_CHARS``)."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return {"error": {"type": error_type, "message": message}}
