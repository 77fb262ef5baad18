"""One logging setup for the service, uvicorn (its error and access logs) and the CLI.

``CMAMBA_LOG_FORMAT`` picks ``text`` (one readable line, for a terminal) or ``json`` (one JSON
object per line, for containers and log shippers); ``CMAMBA_LOG_LEVEL`` the level. Every line
has a UTC timestamp; a line logged while a request is served carries that request's id (the
``X-Request-ID`` the request-id middleware sets in :data:`request_id_var`), the access log and
the unhandled-error log included. Known secrets (the API key) and bearer credentials are masked
in every line, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, TextIO

from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings import LogFormat, LogLevel

request_id_var: ContextVar[str | None] = ContextVar("cmamba_request_id", default=None)
"""The id of the request being served (None outside a request)."""
trace_ids_var: ContextVar[tuple[str, str] | None] = ContextVar("cmamba_trace_ids", default=None)
"""The trace id and span id (hex) of the request being served, when tracing is on."""

TRACE = 5
"""uvicorn's ``trace`` level (below ``debug``: every ASGI message, headers included)."""

REDACTED = "[redacted]"
# "Bearer <token>", and a bare token given as an authorization header's value.
_SCHEME_CREDENTIAL = re.compile(r"(?i)(\b(?:bearer|basic)\s+)[^\s\"',)\]]+")
_HEADER_CREDENTIAL = re.compile(
    r"(?i)(\bauthorization\b[\"']?\s*[:=,]\s*(?:(?-i:b)?[\"'])?)"
    r"(?!(?:bearer|basic)\s|(?-i:b)[\"'])[^\s\"',)\]]+"
)
_HANDLER_NAME = "cmamba"
# Record attributes written out when set: the request id (RequestContextFilter), and the trace
# and span ids a tracing setup may add the same way.
_CONTEXT_FIELDS = ("request_id", "trace_id", "span_id")
# uvicorn's access log passes these as the record's args (uvicorn.protocols.*).
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class LoggingSettings(BaseSettings):
    """The two logging knobs, read from the environment like :class:`ServiceSettings` reads
    them (the CLI configures logging before, or without, the service's settings)."""

    model_config = SettingsConfigDict(env_prefix="CMAMBA_", extra="ignore", frozen=True)

    log_format: LogFormat = "text"
    log_level: LogLevel = "info"


def level_number(level: str) -> int:
    """The ``logging`` number of a level name (``trace`` included)."""
    return TRACE if level.lower() == "trace" else logging.getLevelName(level.upper())


class Redactor:
    """Masks the given secret values and any bearer or basic credential in a text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _SCHEME_CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)
        return _HEADER_CREDENTIAL.sub(lambda m: m.group(1) + REDACTED, text)


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """The fields of a uvicorn access line (None for any other record)."""
    if record.name != "uvicorn.access" or not isinstance(record.args, tuple):
        return None
    if len(record.args) != len(_ACCESS_FIELDS):
        return None
    return dict(zip(_ACCESS_FIELDS, record.args, strict=True))


class _Formatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.render(record))

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class TextFormatter(_Formatter):
    """``<timestamp> <LEVEL> <logger> [request_id=<id>] <message>`` and the traceback."""

    def render(self, record: logging.LogRecord) -> str:
        context = "".join(
            f" {key}={getattr(record, key)}"
            for key in _CONTEXT_FIELDS
            if getattr(record, key, None)
        )
        line = f"{_timestamp(record)} {record.levelname} {record.name}{context}: "
        line += record.getMessage()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(_Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, ``request_id``
    when serving a request (``trace_id`` and ``span_id`` when a record has them),
    ``exception`` with the traceback, and the access log's fields
    (``client``, ``method``, ``path``, ``http_version``, ``status``)."""

    def render(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value:
                entry[key] = value
        access = _access_fields(record)
        if access is not None:
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` (from :data:`request_id_var`) to every record, and ``trace_id``
    and ``span_id`` (from :data:`trace_ids_var`) when the request is traced."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "trace_id", None) is None:
            ids = trace_ids_var.get()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


def configure_logging(
    log_format: str | None = None,
    level: str | None = None,
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    default_level: LogLevel | None = None,
) -> LoggingSettings:
    """Send every log record (the root logger, uvicorn's included) to one handler on stderr.

    ``log_format`` and ``level`` override ``CMAMBA_LOG_FORMAT`` and ``CMAMBA_LOG_LEVEL``;
    ``default_level`` replaces the level's default (``info``) when neither sets one;
    ``secrets`` are masked in every line. Calling it again replaces the handler. Returns the
    settings in force.
    """
    overrides: dict[str, Any] = {"log_format": log_format, "log_level": level}
    settings = LoggingSettings(**{k: v for k, v in overrides.items() if v is not None})
    if default_level is not None and "log_level" not in settings.model_fields_set:
        settings = LoggingSettings(log_format=settings.log_format, log_level=default_level)
    logging.addLevelName(TRACE, "TRACE")
    redact = Redactor(secrets)
    formatter: logging.Formatter = (
        JsonFormatter(redact) if settings.log_format == "json" else TextFormatter(redact)
    )
    handler: logging.Handler = (
        logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    )
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number(settings.log_level))
    logging.captureWarnings(True)  # warnings.warn lines get a timestamp too
    # uvicorn's loggers have their own handlers only when uvicorn configures logging (it does
    # not: cmamba serve passes log_config=None); they propagate to the root handler here.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return settings


def configure_cli_logging() -> None:
    """:func:`configure_logging` from the environment for a ``cmamba`` command, at ``warning``
    unless ``CMAMBA_LOG_LEVEL`` says otherwise (a command's answer is its output; ``cmamba
    serve`` sets its own level); an invalid ``CMAMBA_LOG_*`` value stops the command (exit
    status 2) with the reason."""
    from pydantic import ValidationError

    try:
        configure_logging(default_level="warning")
    except ValidationError as exc:
        print(f"cmamba: invalid logging settings:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None
