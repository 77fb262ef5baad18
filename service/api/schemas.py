"""Request and response bodies of the REST API (field names are a contract: service/README.md,
Endpoints)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from model.config import SentimentClass
from service.core.types import ModelIdentity, Prediction

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Sentiment(BaseModel):
    score: float = Field(description="regression score on the model's label scale")
    label: SentimentClass
    probabilities: dict[str, float] = Field(description="negative, neutral, positive")


class Modalities(BaseModel):
    """What was found in the input and fed to the model."""

    model_config = ConfigDict(extra="allow")

    used: list[str] = Field(description="modalities with at least one valid step")
    steps: int = Field(description="length of the clip's time grid")
    transcript: str | None = None
    audio_seconds: float | None = None
    frames: int | None = None
    frames_with_face: int | None = None


class GpuMemory(BaseModel):
    """Accelerator memory after the request's batch; nulls with ``device: "cpu"``."""

    device: str
    allocated_bytes: int | None
    reserved_bytes: int | None
    peak_allocated_bytes: int | None = Field(description="peak during this request's batch")
    total_bytes: int | None


class ModelInfo(BaseModel):
    name: str
    version: str
    device: str
    scan_backend: str

    @classmethod
    def from_identity(cls, identity: ModelIdentity) -> ModelInfo:
        return cls(
            name=identity.name,
            version=identity.version,
            device=identity.device,
            scan_backend=identity.scan_backend,
        )


class BatchInfo(BaseModel):
    size: int = Field(description="clips in the model call that scored this request")
    padded_length: int = Field(description="steps the batch was padded to")


class PredictResponse(BaseModel):
    sentiment: Sentiment
    modalities: Modalities
    timings_ms: dict[str, float] = Field(
        description="decode, asr, text, audio, visual, queue, model, total (and more)"
    )
    gpu_memory: GpuMemory
    model: ModelInfo
    batch: BatchInfo
    request_id: str
    attribution: dict[str, float | None] | None = Field(
        default=None,
        description="with ?attribution=true: {text, audio, visual}, score(all) - score(all but "
        "the modality); null for modalities the checkpoint lacks (docs/TIMELINE.md)",
    )
    emotions: dict[str, float] | None = Field(
        default=None,
        description="probability of each emotion class of the checkpoint's emotion head "
        "(the default: neutral, happy, sad, angry, fearful, disgust, surprised); null when "
        "the checkpoint has no emotion head",
    )

    @classmethod
    def from_prediction(cls, prediction: Prediction, request_id: str) -> PredictResponse:
        memory = prediction.gpu_memory
        return cls(
            sentiment=Sentiment(
                score=prediction.score,
                label=prediction.label,  # type: ignore[arg-type]
                probabilities=prediction.probabilities,
            ),
            modalities=Modalities(**prediction.modalities),
            timings_ms={k: round(v, 3) for k, v in prediction.timings_ms.items()},
            gpu_memory=GpuMemory(
                device=memory.device,
                allocated_bytes=memory.allocated_bytes,
                reserved_bytes=memory.reserved_bytes,
                peak_allocated_bytes=memory.peak_allocated_bytes,
                total_bytes=memory.total_bytes,
            ),
            model=ModelInfo.from_identity(prediction.model),
            batch=BatchInfo(size=prediction.batch_size, padded_length=prediction.padded_length),
            request_id=request_id,
            attribution=prediction.attribution,
            emotions=prediction.emotions,
        )


class FeaturesRequest(BaseModel):
    """Precomputed features of one clip, in the loaded checkpoint's feature profile."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "profile": "default-v1",
                    "features": {"text": [[0.1, -0.2, 0.3]]},
                    "masks": {"text": [True]},
                }
            ]
        },
    )

    profile: str = Field(description="feature profile of the features, e.g. default-v1")
    features: dict[str, list[list[FiniteFloat]]] = Field(
        description="{modality: steps x feature values}, one shared number of steps"
    )
    masks: dict[str, list[bool]] | None = Field(
        default=None, description="{modality: one flag per step, true = valid}; default all true"
    )
    transcript: str | None = Field(default=None, max_length=10_000)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """KServe-v2-style metadata plus the architecture, checkpoint facts and model card."""

    model_config = ConfigDict(extra="allow")

    name: str
    versions: list[str]
    platform: str
    device: str
    scan_backend: str
    feature_profile: str
    modalities: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    label_scale: list[float]
    classes: list[str]
    architecture: dict[str, Any]
    checkpoint: dict[str, Any]
    model_card: str | None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    descriptions = {
        401: "bearer token missing or wrong",
        404: "no such model",
        413: "request body over the upload limit",
        415: "unsupported media type",
        422: "invalid input, undecodable media, or features that do not match the model",
        501: "media input is disabled on this server",
        503: "not ready, draining, over capacity, or out of GPU memory (see Retry-After)",
        504: "request deadline passed",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions.get(status, "error")}
        for status in statuses
    }


class ProtocolError(BaseModel):
    """The Open Inference Protocol's error answer (every error on ``/v2``)."""

    error: str = Field(examples=["input 'text' must be FP32, got 'INT64'"])


def protocol_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of ``/v2`` error statuses."""
    descriptions = {
        400: "a bad request: bad JSON, or tensors of the wrong name, datatype, shape, size or "
        "values",
        401: "bearer token missing or wrong",
        404: "no such model or version",
        413: "request body over the upload limit",
        503: "not ready, draining, over capacity, or out of GPU memory (see Retry-After)",
        504: "request deadline passed",
    }
    retry_after = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return {
        status: {
            "model": ProtocolError,
            "description": descriptions[status],
            **({"headers": retry_after} if status == 503 else {}),
        }
        for status in statuses
    }
