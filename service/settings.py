"""Typed service settings, read from the environment (``CMAMBA_`` prefix) once per app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, StringConstraints, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.faults import FAULT_SPEC_PATTERN

ScanBackendName = Literal["auto", "ref", "torch", "triton"]
"""A scan backend to ask for: "auto" or a name of ``model.ops.BACKENDS`` (a test keeps the two
in step; importing ``model.ops`` here would import torch with the settings)."""

CudaOrdinal = Annotated[str, StringConstraints(pattern=r"^cuda:[0-9]+$")]
"""One CUDA device by index, e.g. "cuda:1"."""

DeviceName = Literal["auto", "cpu", "cuda"] | CudaOrdinal
"""Where the model runs: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""


LogFormat = Literal["json", "text"]
"""How log lines look: ``text`` for a terminal, ``json`` (one object per line) for containers."""

LogLevel = Annotated[
    Literal["critical", "error", "warning", "info", "debug", "trace"],
    BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value),
]
"""A log level name, in any case; ``trace`` is uvicorn's, below ``debug``."""


def default_model_path() -> Path:
    """The embedded default checkpoint folder (``model/checkpoints/default``)."""
    from model import default_checkpoint_path

    return Path(default_checkpoint_path())


def default_jobs_dir() -> Path:
    """``$XDG_DATA_HOME/cmamba/jobs`` (``~/.local/share/cmamba/jobs`` when unset)."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cmamba" / "jobs"


class ServiceSettings(BaseSettings):
    """Every knob of the service. The model's architecture comes from its checkpoint, not here.

    Each field can be set from the environment as ``CMAMBA_<FIELD>`` (for example
    ``CMAMBA_MAX_BATCH_SIZE=32``); list fields take JSON (``CMAMBA_LENGTH_BUCKETS='[64,256]'``).
    """

    model_config = SettingsConfigDict(
        env_prefix="CMAMBA_", extra="ignore", protected_namespaces=(), frozen=True
    )

    # Model ------------------------------------------------------------------------------
    model_path: Path = Field(
        default_factory=default_model_path,
        description='checkpoint folder to serve; "default" and "text-only" name the embedded '
        "checkpoints (the text-only one is trained on rated sentences alone, see its card)",
    )
    model_name: str | None = Field(
        default=None, description="name served under /v2/models/{name}; default from checkpoint"
    )
    device: DeviceName = Field(
        default="auto", description='"auto" (CUDA when present), "cpu", "cuda" or "cuda:N"'
    )
    scan_backend: ScanBackendName = Field(
        default="auto",
        description='coupled scan backend: "auto" (chosen once at load for the device, and '
        'logged), "torch", "triton" or "ref"',
    )
    torch_threads: int = Field(default=1, ge=1, description="torch intra-op threads")
    warmup: bool = Field(default=True, description="run dummy batches before going ready")

    # Micro-batching ---------------------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1, description="1 turns batching off")
    max_batch_delay_ms: float = Field(
        default=5.0, ge=0.0, description="longest wait of the oldest queued clip for company"
    )
    adaptive_batch_delay: bool = Field(
        default=True,
        description="wait for company only while other requests are on their way (a lone "
        "request never waits); false always waits up to max_batch_delay_ms",
    )
    length_buckets: tuple[int, ...] = Field(
        default=(16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048),
        description="sequence lengths are padded up to the next bucket; empty = batch longest",
    )
    max_sequence_length: int = Field(default=2048, ge=1, description="longest accepted clip")

    # Admission and limits ---------------------------------------------------------------
    max_queue_size: int = Field(default=64, ge=1, description="clips waiting for the model")
    max_inflight: int = Field(default=128, ge=1, description="requests inside the service")
    request_timeout_s: float = Field(default=30.0, gt=0.0, description="deadline -> 504")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After on 503 answers")
    max_upload_bytes: int = Field(default=50 * 2**20, ge=1, description="request body limit")
    max_transcript_chars: int = Field(default=10_000, ge=1)
    max_form_parts: int = Field(default=8, ge=2, description="parts of a multipart upload")
    max_part_header_bytes: int = Field(
        default=8192, ge=256, description="header bytes of one multipart part"
    )
    offloop_body_bytes: int = Field(
        default=1 << 20,
        ge=0,
        description="features bodies over this are parsed off the event loop, and must be "
        "exact JSON (numbers as numbers): the lax schema path would hold the GIL throughout",
    )
    upload_dir: Path | None = Field(default=None, description="temp files; default a fresh dir")

    # Feature extraction -----------------------------------------------------------------
    enable_media: bool = Field(default=True, description="serve /v1/predict (loads extractors)")
    extract_workers: int = Field(default=1, ge=1, description="CPU feature extraction threads")
    max_media_seconds: float = Field(default=180.0, gt=0.0, description="longest accepted clip")
    max_audio_rate_channels: int = Field(
        default=768_000,
        ge=1,
        description="most audio sample rate x channels decoded (96 kHz x 8, 192 kHz x 4)",
    )
    extractor_options: dict[str, Any] = Field(
        default_factory=dict,
        description='more preprocessing.ExtractorSettings fields, e.g. {"frame_rate_hz": 5}',
    )

    # Security and lifecycle -------------------------------------------------------------
    api_key: SecretStr | None = Field(
        default=None, description="bearer token; when set, all but health and metrics need it"
    )
    public_docs: bool = Field(default=False, description="serve /docs without the token")
    drain_timeout_s: float = Field(default=30.0, ge=0.0, description="SIGTERM drain limit")

    # Jobs: the API and runner of long recordings (/v1/jobs, docs/JOBS.md) --------------
    jobs_enabled: bool = Field(
        default=True, description="serve /v1/jobs and run jobs (needs media extraction)"
    )
    jobs_import_dir: Path | None = Field(
        default=None,
        description="folder of host files a job may name by `path` (none: uploads only)",
    )
    jobs_workers: int = Field(default=1, ge=0, description="jobs run at once by this process")
    jobs_part_s: float = Field(
        default=60.0, ge=5.0, description="a recording is extracted and stored in parts of this"
    )
    jobs_poll_s: float = Field(default=1.0, gt=0.0, description="idle workers look this often")
    jobs_niceness: int = Field(
        default=10,
        ge=0,
        le=19,
        description="nice value added to the threads extracting job parts (online requests "
        "get the CPUs first); 0 keeps them level",
    )
    jobs_part_timeout_s: float = Field(
        default=600.0, gt=0.0, description="longest extraction and scoring of one part"
    )
    jobs_max_attempts: int = Field(
        default=5,
        ge=1,
        description="claims of one job before it fails (a job that keeps crashing its process "
        "is not run forever); a drained stop counts as one",
    )
    jobs_max_media_hours: float = Field(default=4.0, gt=0.0, description="longest recording")
    jobs_max_queued: int = Field(default=100, ge=1, description="queued jobs before 429")
    jobs_max_upload_bytes: int = Field(
        default=4 * 2**30, ge=1, description="body limit of one job upload"
    )
    jobs_disk_quota_bytes: int = Field(
        default=50 * 2**30, ge=1, description="all uploads kept for jobs together (507 beyond)"
    )
    jobs_retention_interval_s: float = Field(
        default=600.0, gt=0.0, description="how often expired jobs are looked for"
    )
    jobs_callback_secret: SecretStr | None = Field(
        default=None, description="HMAC-SHA256 key signing callback bodies"
    )
    jobs_callback_allow: tuple[str, ...] = Field(
        default=(),
        description="callback targets allowed: host names, IP addresses or CIDRs (JSON list); "
        "empty: callbacks refused",
    )
    jobs_callback_attempts: int = Field(default=5, ge=1, description="tries of one callback")
    jobs_callback_backoff_s: float = Field(
        default=1.0, ge=0.0, description="first retry delay (doubled each try)"
    )
    jobs_callback_timeout_s: float = Field(default=10.0, gt=0.0, description="per try")

    # Logs and metrics ---------------------------------------------------------------------
    log_format: LogFormat = Field(
        default="text", description='"text" (a terminal) or "json" (one object per line)'
    )
    log_level: LogLevel = Field(default="info", description="critical ... debug, trace")
    git_sha: str | None = Field(
        default=None,
        description="commit the image was built from (cmamba_build_info); default: asked of "
        "git when the source is a checkout",
    )

    # Failures that heal and saturation readiness ----------------------------------------
    fatal_exit_grace_s: float = Field(
        default=5.0,
        ge=0.0,
        le=300.0,
        description="after a fatal failure (a CUDA error, a dead worker) the process answers "
        "503 this long (health probes and a scrape see it), then exits non-zero",
    )
    ready_saturation_s: float = Field(
        default=0.0,
        ge=0.0,
        description="/v2/health/ready answers 503 once the model queue has been full this "
        "long without draining below half; 0 never",
    )
    fault_injection: str | None = Field(
        default=None,
        pattern=FAULT_SPEC_PATTERN,
        description="tests only: cuda_error:N, model_worker_exit:N or extraction_worker_exit:N "
        "(service.core.faults); unset in production",
    )

    # Slow clients (cmamba serve) ----------------------------------------------------------
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, description="close a connection whose request headers take longer"
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0.0, description="close a connection whose request body takes longer"
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0.0, description="close an idle keep-alive connection after this"
    )

    # Jobs: durable job state (long recordings, /v1/jobs) ------------------------------------
    jobs_dir: Path = Field(
        default_factory=default_jobs_dir,
        description="data folder of jobs: the SQLite job database (the default) and the "
        "uploads kept until their job ends",
    )
    jobs_database_url: SecretStr | None = Field(
        default=None,
        description='job database: "sqlite:///<path>" or "postgresql://user:password@host:'
        'port/database" (replicas sharing one queue); default a SQLite file in jobs_dir',
    )
    jobs_lease_s: float = Field(
        default=30.0,
        gt=0.0,
        description="a running job's lease: its runner renews it; once it lapses (the process "
        "died) another process takes the job over",
    )
    jobs_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0.0,
        description="finished jobs, their results and files are deleted this long after the end",
    )

    def jobs_store_url(self) -> str:
        """The job database URL: ``jobs_database_url``, else the SQLite file in ``jobs_dir``."""
        if self.jobs_database_url is not None:
            return self.jobs_database_url.get_secret_value()
        return f"sqlite:///{self.jobs_dir.expanduser().absolute() / 'jobs.db'}"

    # Live streams (WS /v1/stream, docs/STREAMING.md).
    stream_max_streams: int = Field(default=8, ge=0, description="concurrent live streams")
    stream_idle_timeout_s: float = Field(
        default=10.0, gt=0.0, description="end a stream that sends nothing for this long"
    )
    stream_max_duration_s: float = Field(
        default=3600.0, gt=0.0, description="longest stream, in seconds of audio"
    )
    stream_max_message_bytes: int = Field(
        default=2**20, ge=1024, description="largest WebSocket message of a stream"
    )
    stream_drop_video_lag_s: float = Field(
        default=2.0,
        ge=0.0,
        description="drop video frames while more audio than this waits for live features",
    )
    stream_tick_s: float = Field(
        default=0.05, gt=0.0, description="how often the stream hub looks for due updates"
    )
    stream_extract_workers: int = Field(
        default=2, ge=1, description="threads making live features (all streams share them)"
    )

    @field_validator("model_path", mode="before")
    @classmethod
    def _embedded_names(cls, value: Any) -> Any:
        from model.checkpoints import default_checkpoint_path, text_only_checkpoint_path

        embedded = {"default": default_checkpoint_path, "text-only": text_only_checkpoint_path}
        if isinstance(value, str) and value in embedded:
            return embedded[value]()
        return value

    @field_validator("length_buckets")
    @classmethod
    def _sorted_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= 0 for b in value):
            raise ValueError("length buckets must be positive")
        return tuple(sorted(set(value)))

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value
