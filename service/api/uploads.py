"""Streaming ``multipart/form-data`` upload to a temp file, with the size limit enforced early.

The body is read chunk by chunk from the ASGI stream and parsed as it arrives; the ``file``
part goes straight to disk. A declared ``Content-Length`` over the limit is refused before
anything is read, and a streamed body is cut off as soon as the byte count passes the limit,
so an oversized upload costs at most one chunk beyond the limit.
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import (
    ClientDisconnectedError,
    DeadlineExceededError,
    InvalidInputError,
    PayloadTooLargeError,
    UnsupportedMediaError,
    echo,
)
from service.settings import ServiceSettings

ACCEPTED_MEDIA_PREFIXES = ("video/", "audio/")
ACCEPTED_MEDIA_TYPES = ("application/octet-stream", "application/ogg", "")
FILE_FIELD = "file"
TRANSCRIPT_FIELD = "transcript"
MAX_FIELD_BYTES = 256 * 1024  # any non-file part
MAX_FORM_PARTS = 8
MAX_PART_HEADER_BYTES = 8 * 1024

MEDIA_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "a video or audio file",
                        },
                        TRANSCRIPT_FIELD: {
                            "type": "string",
                            "description": "what is said, when known (skips speech recognition)",
                        },
                    },
                },
                "encoding": {FILE_FIELD: {"contentType": "video/*, audio/*"}},
            }
        },
    },
}
"""The OpenAPI ``requestBody`` of the endpoints that take a media upload."""

MEDIA_OR_TRANSCRIPT_BODY: dict[str, Any] = copy.deepcopy(MEDIA_UPLOAD_BODY)
"""The ``requestBody`` of ``POST /v1/predict``: a media upload, or a ``transcript`` alone."""
_form_schema = MEDIA_OR_TRANSCRIPT_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
del _form_schema["required"]
_form_schema["minProperties"] = 1
_form_schema["description"] = (
    "a `file` (with an optional `transcript`), or a `transcript` alone to score the text"
)


@dataclass
class Upload:
    """A received upload: the temp file (the caller must remove it) and the form fields."""

    path: Path
    size: int
    filename: str | None
    content_type: str
    transcript: str | None
    receive_ms: float


@dataclass
class TranscriptForm:
    """A received form with a ``transcript`` and no ``file`` part (a text to score alone)."""

    transcript: str
    receive_ms: float


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)
    size: int = 0


class _FormCollector:
    """Callbacks for :class:`MultipartParser` that spool the file part to ``sink``."""

    def __init__(
        self,
        sink: IO[bytes],
        max_transcript_chars: int,
        max_parts: int = MAX_FORM_PARTS,
        max_header_bytes: int = MAX_PART_HEADER_BYTES,
    ) -> None:
        self.sink = sink
        self.max_field_bytes = min(MAX_FIELD_BYTES, max_transcript_chars * 4)
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.parts = 0
        self.in_part = False
        self._header_bytes = 0
        self.file_part: _Part | None = None
        self.fields: dict[str, str] = {}
        self.error: Exception | None = None
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
        }

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._headers = {}
        self._header_bytes = 0
        self.in_part = True
        self.parts += 1
        if self.parts > self.max_parts and self.error is None:
            self.error = InvalidInputError(
                f"the form has more than {self.max_parts} parts: send a `file` part and an "
                "optional `transcript`"
            )

    def _count_header_bytes(self, count: int) -> bool:
        self._header_bytes += count
        if self._header_bytes <= self.max_header_bytes:
            return True
        if self.error is None:
            self.error = InvalidInputError(
                f"a form part's headers are over {self.max_header_bytes} bytes"
            )
        return False

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        if self._count_header_bytes(end - start):
            self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        if self._count_header_bytes(end - start):
            self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").strip().lower()] = bytes(
            self._header_value
        ).strip()
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        content_type, _ = parse_options_header(self._headers.get("content-type", b""))
        self._part.content_type = content_type.decode("latin-1").lower()
        if self._part.name != FILE_FIELD or self.error is not None:
            return
        if self.file_part is not None:
            self.error = InvalidInputError("send one `file` part only")
        elif not media_type_accepted(self._part.content_type):
            self.error = UnsupportedMediaError(
                f"unsupported media type {echo(self._part.content_type)}: send audio or video"
            )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.name == FILE_FIELD:
            if self.file_part is None or self.file_part is part:
                self.sink.write(data[start:end])
        elif part.size <= self.max_field_bytes:
            part.data += data[start:end]
        elif self.error is None:
            self.error = InvalidInputError(f"form field {echo(part.name)} is too long")

    def _on_part_end(self) -> None:
        self.in_part = False
        part = self._part
        if part.name == FILE_FIELD:
            if self.file_part is None:
                self.file_part = part
        elif part.name:
            try:
                self.fields[part.name] = part.data.decode("utf-8")
            except UnicodeDecodeError:
                self.error = InvalidInputError(f"form field {echo(part.name)} is not UTF-8 text")


def media_type_accepted(content_type: str) -> bool:
    """Whether a file part's declared type may be audio or video (unknown types may)."""
    return content_type.startswith(ACCEPTED_MEDIA_PREFIXES) or content_type in (
        ACCEPTED_MEDIA_TYPES
    )


async def receive_upload(
    request: Request,
    *,
    max_bytes: int,
    upload_dir: Path,
    max_transcript_chars: int,
    max_parts: int = MAX_FORM_PARTS,
    max_header_bytes: int = MAX_PART_HEADER_BYTES,
    transcript_alone: bool = False,
) -> Upload | TranscriptForm:
    """Stream the request's multipart body to a temp file in ``upload_dir``.

    With ``transcript_alone``, a form with a ``transcript`` and no ``file`` part is taken: it
    answers a :class:`TranscriptForm` (and keeps no file). Otherwise it answers an
    :class:`Upload`.

    Raises:
        UnsupportedMediaError: not multipart/form-data, or a ``file`` part that is neither
            audio nor video.
        PayloadTooLargeError: the body is (or is declared) over ``max_bytes``.
        InvalidInputError: malformed form, no ``file`` part (nor a transcript, when one alone
            is taken), empty file, bad transcript.
    """
    started = time.perf_counter()
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaError(
            "send the media as multipart/form-data with a `file` part (and optional `transcript`)"
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInputError("multipart/form-data without a boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(
            f"the body is {int(declared)} bytes, over the limit of {max_bytes} bytes"
        )

    upload_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", dir=upload_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as sink:
            form = _FormCollector(sink, max_transcript_chars, max_parts, max_header_bytes)
            try:
                parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
            except Exception as exc:
                raise InvalidInputError(f"malformed multipart boundary: {exc}") from exc
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise PayloadTooLargeError(f"the body is over the limit of {max_bytes} bytes")
                try:
                    parser.write(chunk)
                except MultipartParseError as exc:
                    raise InvalidInputError(f"malformed multipart body: {exc}") from exc
                if form.error is not None:
                    raise form.error
            try:
                parser.finalize()
            except MultipartParseError as exc:
                raise InvalidInputError(f"malformed multipart body: {exc}") from exc
        file_part = form.file_part
        if form.error is not None:
            raise form.error
        if form.in_part:
            raise InvalidInputError(
                "the multipart body ends inside a part, without its closing boundary "
                "(--BOUNDARY--): the upload is incomplete"
            )
        transcript = form.fields.get(TRANSCRIPT_FIELD)
        if transcript is not None:
            transcript = transcript.strip() or None
        if transcript is not None and len(transcript) > max_transcript_chars:
            raise InvalidInputError(f"the transcript is over {max_transcript_chars} characters")
        if file_part is None:
            if not transcript_alone:
                raise InvalidInputError("the form has no `file` part")
            if transcript is None:
                raise InvalidInputError(
                    "the form has neither a `file` part nor a `transcript`: send a video or "
                    "audio `file`, or a `transcript` to score the text alone"
                )
            path.unlink(missing_ok=True)
            return TranscriptForm(transcript, (time.perf_counter() - started) * 1000.0)
        if file_part.size == 0:
            raise InvalidInputError("the uploaded file is empty")
        return Upload(
            path=path,
            size=file_part.size,
            filename=file_part.filename,
            content_type=file_part.content_type,
            transcript=transcript,
            receive_ms=(time.perf_counter() - started) * 1000.0,
        )
    except ClientDisconnect as exc:
        path.unlink(missing_ok=True)
        raise ClientDisconnectedError("the client disconnected during the upload") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def receive_upload_in_time(request: Request, settings: ServiceSettings) -> Upload:
    """``receive_upload`` with the app's limits, bounded by the request deadline.

    Raises:
        DeadlineExceededError: the body did not arrive within ``request_timeout_s``.
    """
    upload = await _receive_in_time(request, settings, transcript_alone=False)
    assert isinstance(upload, Upload)  # a form without a file is refused
    return upload


async def receive_upload_or_transcript_in_time(
    request: Request, settings: ServiceSettings
) -> Upload | TranscriptForm:
    """:func:`receive_upload_in_time` that also takes a ``transcript`` alone."""
    return await _receive_in_time(request, settings, transcript_alone=True)


async def _receive_in_time(
    request: Request, settings: ServiceSettings, *, transcript_alone: bool
) -> Upload | TranscriptForm:
    upload_dir: Path = request.app.state.upload_dir
    try:
        return await asyncio.wait_for(
            receive_upload(
                request,
                max_bytes=settings.max_upload_bytes,
                upload_dir=upload_dir,
                max_transcript_chars=settings.max_transcript_chars,
                max_parts=settings.max_form_parts,
                max_header_bytes=settings.max_part_header_bytes,
                transcript_alone=transcript_alone,
            ),
            settings.request_timeout_s,
        )
    except TimeoutError as exc:
        raise DeadlineExceededError("the upload did not finish in time") from exc


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """Read a whole (JSON) body, refusing it as soon as it passes ``max_bytes``.

    Raises:
        PayloadTooLargeError: the body is (or is declared) over ``max_bytes``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(
            f"the body is {int(declared)} bytes, over the limit of {max_bytes} bytes"
        )
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLargeError(f"the body is over the limit of {max_bytes} bytes")
    except ClientDisconnect as exc:
        raise ClientDisconnectedError("the client disconnected during the request") from exc
    return b"".join(chunks)  # one copy, not one per chunk
