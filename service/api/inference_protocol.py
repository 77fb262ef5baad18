"""The Open Inference Protocol's HTTP side (KServe v2, Triton): server and model metadata,
model readiness, and inference with JSON tensors or the binary tensor data extension.

Health (``/v2/health/*``) is :mod:`service.api.health`. Inference takes the checkpoint's
modalities as FP32 ``[batch, steps, features]`` tensors and their optional BOOL masks
``[batch, steps]`` (names and shapes: :func:`service.core.assembly.tensor_inputs`); each clip of
the batch goes through the same admission, micro-batcher, limits and metrics as
``/v1/predict/features``, through the core's ``clip_from_features`` and ``predict_features``.

Errors on ``/v2`` and its model routes are the protocol's ``{"error": "<message>"}`` (health keeps
the service's shape; the protocol asks only its status codes): 400 for a bad request (bad
tensors included, where ``/v1`` says 422), 404 for an unknown model or version, 503 with
``Retry-After`` when not ready, draining or over capacity; the other statuses are ``/v1``'s.

Binary tensor data: a request with an ``Inference-Header-Content-Length: N`` header holds N bytes
of JSON, then the raw little-endian data of each input whose ``parameters`` give a
``binary_data_size``, in the order of ``inputs`` (BOOL: one byte per element). Outputs asked for
with ``"binary_data": true`` (or all, with the request parameter ``binary_data_output``) come
back the same way after the JSON header, which the answer's own
``Inference-Header-Content-Length`` measures.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import simdjson
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.answers import server_timing
from service.api.auth import BearerRoute
from service.api.dependencies import CoreDep, app_parts
from service.api.errors import error_headers, http_status
from service.api.health import ready as server_ready
from service.api.schemas import ModelMetadata, protocol_errors
from service.api.uploads import read_body
from service.core.assembly import MASK_SUFFIX, tensor_outputs
from service.core.engine import InferenceCore
from service.core.types import CLASS_NAMES, ClipFeatures, Prediction
from service.errors import (
    MAX_MESSAGE_CHARS,
    InvalidInputError,
    ModelNotFoundError,
    ServiceError,
    echo,
    echo_names,
)
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from model import CoupledMambaConfig

SERVER_NAME = "cmamba"
EXTENSIONS = ("binary_tensor_data", "parameters")
"""The protocol extensions this server implements (``GET /v2``)."""
HEADER_LENGTH = "Inference-Header-Content-Length"
ATTRIBUTION = "attribution"
"""The optional output (FP32 ``[batch, modalities]``, the checkpoint's modality order) and
request parameter that ask for the per-modality attribution."""
_BYTES_PER_ELEMENT = {"FP32": 4, "BOOL": 1}
_MAX_INPUTS = 64
_MAX_RANK = 8


# -- schemas (OpenAPI) -------------------------------------------------------------------------


class ServerMetadata(BaseModel):
    name: str = Field(examples=[SERVER_NAME])
    version: str = Field(examples=["1.0.0"])
    extensions: list[str] = Field(examples=[list(EXTENSIONS)])


class ModelReady(BaseModel):
    name: str
    ready: bool


Parameters = dict[str, bool | int | float | str]


class RequestInput(BaseModel):
    name: str = Field(examples=["text"])
    shape: list[int] = Field(examples=[[1, 2, 3]])
    datatype: Literal["FP32", "BOOL"]
    parameters: Parameters | None = Field(
        None, description="``binary_data_size``: the input's bytes after the JSON header"
    )
    data: list[Any] | None = Field(
        None, description="the values, flat or nested, row-major; absent with binary data"
    )


class RequestOutput(BaseModel):
    name: Literal["score", "probabilities", "emotions", "attribution"]
    parameters: Parameters | None = Field(
        None, description="``binary_data``: answer this output as binary data"
    )


class InferenceRequest(BaseModel):
    """An inference request (its JSON part, when binary data follows)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "clip-42",
                    "parameters": {"attribution": True},
                    "inputs": [
                        {
                            "name": "audio",
                            "datatype": "FP32",
                            "shape": [1, 2, 3],
                            "data": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                        },
                        {
                            "name": "audio_mask",
                            "datatype": "BOOL",
                            "shape": [1, 2],
                            "data": [True, False],
                        },
                    ],
                    "outputs": [{"name": "score"}, {"name": "probabilities"}],
                }
            ]
        }
    )

    id: str | None = None
    parameters: Parameters | None = Field(
        None,
        description="``attribution`` (bool): also answer the ``attribution`` output; "
        "``feature_profile`` (str): the profile the features are in, checked against the "
        "model's; ``binary_data_output`` (bool): every output as binary data",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    """An inference answer (its JSON part, when binary data follows)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters = Field(
        description="``request_id``, the stages' ``<stage>_ms`` (``queue_ms``, ``model_ms``, "
        "``total_ms``), ``batch_size`` and ``padded_length`` of the model call, ``device``, "
        "``scan_backend``, and on a GPU host ``gpu_allocated_bytes``, ``gpu_reserved_bytes``, "
        "``gpu_peak_allocated_bytes``, ``gpu_total_bytes``"
    )
    outputs: list[ResponseOutput]


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the JSON request (as many bytes as the "
                f"{HEADER_LENGTH} header says), then the inputs' binary data",
            },
        },
    },
}
_INFER_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs; with binary outputs, the JSON answer (as many bytes as "
        f"the {HEADER_LENGTH} header says), then their data",
        "headers": {
            HEADER_LENGTH: {
                "description": "bytes of JSON before the binary data (binary outputs only)",
                "schema": {"type": "integer"},
            },
        },
        "content": {"application/octet-stream": {"schema": {"type": "string"}}},
    },
}


# -- routes --------------------------------------------------------------------------------------

server_router = APIRouter(tags=["inference protocol"])
router = APIRouter(tags=["inference protocol"], route_class=BearerRoute)


@server_router.get(
    "/v2", response_model=ServerMetadata, operation_id="server_metadata", responses={}
)
async def server_metadata(request: Request) -> ServerMetadata:
    """The server's name, version and protocol extensions."""
    return ServerMetadata(
        name=SERVER_NAME, version=request.app.version, extensions=list(EXTENSIONS)
    )


_MODEL_ERRORS = protocol_errors(401, 404, 503)
_INFER_ERRORS = {**_INFER_ANSWER, **protocol_errors(400, 401, 404, 413, 503, 504)}


@router.get(
    "/v2/models/{name}",
    response_model=ModelMetadata,
    responses=_MODEL_ERRORS,
    operation_id="model_metadata",
)
async def model_metadata(name: str, core: CoreDep) -> dict[str, Any]:
    """The served model's inputs, outputs, architecture, checkpoint facts and model card."""
    _check_model(core, name, None)
    return core.metadata()


@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    responses=_MODEL_ERRORS,
    operation_id="model_version_metadata",
)
async def model_version_metadata(name: str, version: str, core: CoreDep) -> dict[str, Any]:
    """``GET /v2/models/{name}`` for one version of the model."""
    _check_model(core, name, version)
    return core.metadata()


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReady,
    responses=_MODEL_ERRORS,
    operation_id="model_ready",
)
async def model_ready(name: str, core: CoreDep) -> ModelReady:
    """200 once the model is loaded and warmed; 503 before that and while draining."""
    return await _ready(core, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses=_MODEL_ERRORS,
    operation_id="model_version_ready",
)
async def model_version_ready(name: str, version: str, core: CoreDep) -> ModelReady:
    """``GET /v2/models/{name}/ready`` for one version of the model."""
    return await _ready(core, name, version)


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferenceResponse,
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
    operation_id="model_infer",
)
async def model_infer(request: Request, name: str) -> Response:
    """Score a batch of clips sent as tensors (JSON, or the binary tensor data extension)."""
    return await _infer(request, name, None)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=_INFER_ERRORS,
    openapi_extra=_INFER_BODY,
    operation_id="model_version_infer",
)
async def model_version_infer(request: Request, name: str, version: str) -> Response:
    """``POST /v2/models/{name}/infer`` for one version of the model."""
    return await _infer(request, name, version)


async def _ready(core: InferenceCore, name: str, version: str | None) -> ModelReady:
    _check_model(core, name, version)
    await server_ready(core)  # raises the server's reason when not ready
    return ModelReady(name=name, ready=True)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    core, settings = app_parts(request)
    async with core.admit():
        deadline = time.monotonic() + settings.request_timeout_s
        _check_model(core, name, version)
        header_length = _header_length(request.headers.get(HEADER_LENGTH))
        body = await read_body(request, max_bytes=settings.max_upload_bytes)
        if len(body) <= settings.offloop_body_bytes:
            call, clips = _parse(body, header_length, core, settings)
        else:  # one large body at a time, on the body thread
            call, clips = await asyncio.get_running_loop().run_in_executor(
                request.app.state.body_executor, _parse, body, header_length, core, settings
            )
        started = request.state.start_time
        predictions = await asyncio.gather(
            *(
                core.predict_features(
                    clip, started=started, deadline=deadline, attribution=call.attribution
                )
                for clip in clips
            )
        )
    return render_answer(call, list(predictions), core, request.state.request_id)


def _parse(
    body: bytes, header_length: int | None, core: InferenceCore, settings: ServiceSettings
) -> tuple[InferCall, list[ClipFeatures]]:
    call = parse_infer_request(body, header_length)
    return call, clips_of(call, core, settings)


def _check_model(core: InferenceCore, name: str, version: str | None) -> None:
    identity = core.identity
    if name != identity.name:
        raise ModelNotFoundError(
            f"no model {echo(name)} here; this server serves {identity.name!r}"
        )
    if version is not None and version != identity.version:
        raise ModelNotFoundError(
            f"model {identity.name!r} has no version {echo(version)}; it has [{identity.version!r}]"
        )


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit():
        raise InvalidInputError(f"{HEADER_LENGTH} must be a byte count, got {echo(value)}")
    return int(value)


# -- requests ------------------------------------------------------------------------------------


@dataclass
class InputTensor:
    """One input of a request: its values as a numpy array of its shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray


@dataclass
class InferCall:
    """A parsed inference request."""

    request_id: str | None
    inputs: dict[str, InputTensor]
    outputs: list[str] | None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False
    attribution: bool = False
    feature_profile: str | None = None


def parse_infer_request(body: bytes, header_length: int | None) -> InferCall:
    """Read an inference request: its JSON part, and the binary data after it when
    ``header_length`` (the ``Inference-Header-Content-Length`` header) is given.

    Raises:
        InvalidInputError: bad JSON, a field of the wrong type, an input without data or with
            both kinds, a byte count or element count that does not match its shape, a value
            of the wrong type.
    """
    if header_length is not None and header_length > len(body):
        raise InvalidInputError(
            f"{HEADER_LENGTH} is {header_length}, but the body has only {len(body)} bytes"
        )
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head) :]
    try:
        doc = simdjson.Parser().parse(head)
    except (ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"the request is not valid JSON ({_short(exc)})") from None
    if not isinstance(doc, simdjson.Object):
        raise InvalidInputError("the request must be a JSON object")
    unknown = sorted(set(doc.keys()) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise InvalidInputError(f"unknown request fields {echo_names(unknown)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("id must be a string")
    parameters = _parameters(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, simdjson.Array) or len(raw_inputs) == 0:
        raise InvalidInputError("inputs must be a non-empty list of tensors")
    if len(raw_inputs) > _MAX_INPUTS:
        raise InvalidInputError(f"at most {_MAX_INPUTS} inputs, got {len(raw_inputs)}")
    inputs: dict[str, InputTensor] = {}
    offset = 0
    for index in range(len(raw_inputs)):
        tensor, used = _input(raw_inputs[index], index, binary[offset:])
        if tensor.name in inputs:
            raise InvalidInputError(f"input {echo(tensor.name)} is given twice")
        inputs[tensor.name] = tensor
        offset += used
    if offset != len(binary):
        raise InvalidInputError(
            f"the body holds {len(binary)} bytes of binary data after the JSON, and the inputs' "
            f"binary_data_size add up to {offset}"
        )
    outputs, binary_outputs = _requested_outputs(doc.get("outputs"))
    binary_default = _flag(parameters, "binary_data_output", "parameters")
    attribution = _flag(parameters, ATTRIBUTION, "parameters")
    profile = parameters.get("feature_profile")
    if profile is not None and not isinstance(profile, str):
        raise InvalidInputError("parameters.feature_profile must be a string")
    return InferCall(
        request_id=request_id,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
        attribution=attribution or (outputs is not None and ATTRIBUTION in outputs),
        feature_profile=profile,
    )


def _input(raw: object, index: int, binary: memoryview) -> tuple[InputTensor, int]:
    """One input tensor, and the bytes of binary data it used."""
    where = f"inputs[{index}]"
    if not isinstance(raw, simdjson.Object):
        raise InvalidInputError(f"{where} must be an object")
    unknown = sorted(set(raw.keys()) - {"name", "shape", "datatype", "parameters", "data"})
    if unknown:
        raise InvalidInputError(f"{where} has unknown fields {echo_names(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise InvalidInputError(f"{where}.name must be a string")
    where = f"input {echo(name)}"
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInputError(f"{where} needs a datatype")
    if datatype not in _BYTES_PER_ELEMENT:
        raise InvalidInputError(
            f"{where} has datatype {echo(datatype)}; inputs are FP32 (features) or BOOL (masks)"
        )
    raw_shape = raw.get("shape")
    shape_items = raw_shape.as_list() if isinstance(raw_shape, simdjson.Array) else None
    if (
        shape_items is None
        or len(shape_items) > _MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape_items)
    ):
        raise InvalidInputError(f"{where}.shape must be a list of non-negative integers")
    shape = tuple(d for d in shape_items if isinstance(d, int))  # all of them (checked above)
    count = math.prod(shape)
    parameters = _parameters(raw.get("parameters"), f"{where}.parameters")
    size = parameters.get("binary_data_size")
    data = raw.get("data")
    if size is not None:
        if type(size) is not int or size < 0:
            raise InvalidInputError(f"{where}: binary_data_size must be a byte count")
        if data is not None:
            raise InvalidInputError(f"{where} has both data and binary_data_size")
        expected = count * _BYTES_PER_ELEMENT[datatype]
        if size != expected:
            raise InvalidInputError(
                f"{where}: binary_data_size is {size} bytes, but a {datatype} tensor of shape "
                f"{list(shape)} takes {expected}"
            )
        if size > len(binary):
            raise InvalidInputError(
                f"{where}: binary_data_size is {size} bytes, and only {len(binary)} remain"
            )
        chunk = binary[:size]
        if datatype == "FP32":
            values = np.frombuffer(chunk, dtype="<f4").astype(np.float32)
        else:
            flags = np.frombuffer(chunk, dtype=np.uint8)
            if (flags > 1).any():
                raise InvalidInputError(f"{where}: BOOL bytes must be 0 or 1")
            values = flags.astype(np.bool_)
        return InputTensor(name, datatype, shape, values.reshape(shape)), size
    if not isinstance(data, simdjson.Array):
        raise InvalidInputError(f"{where} needs data (or binary_data_size)")
    values = _json_values(data, datatype, where)
    if values.size != count:
        raise InvalidInputError(
            f"{where} has {values.size} values, and its shape {list(shape)} takes {count}"
        )
    return InputTensor(name, datatype, shape, values.reshape(shape)), 0


def _json_values(data: simdjson.Array, datatype: str, where: str) -> np.ndarray:
    """The flattened values of a JSON tensor (flat or nested lists)."""
    if datatype == "FP32":
        try:
            flat = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{where}: FP32 data must hold numbers only") from exc
        with np.errstate(over="ignore"):  # out of float32 range: inf, refused with the clip
            return flat.astype(np.float32)
    values = _flatten(data.as_list())
    if not all(type(v) is bool for v in values):
        raise InvalidInputError(f"{where}: BOOL data must hold true and false only")
    return np.array(values, dtype=np.bool_)


def _flatten(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(items)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > _MAX_RANK:
                    raise InvalidInputError("tensor data nests deeper than its shape can")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _parameters(raw: object, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, simdjson.Object):
        raise InvalidInputError(f"{where} must be an object")
    values = raw.as_dict()
    if not all(isinstance(v, bool | int | float | str) for v in values.values()):
        raise InvalidInputError(f"{where}: each value must be a boolean, a number or a string")
    return values


def _flag(parameters: Mapping[str, Any], name: str, where: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}.{name} must be true or false")
    return value


def _requested_outputs(raw: object) -> tuple[list[str] | None, set[str]]:
    if raw is None:
        return None, set()
    if not isinstance(raw, simdjson.Array):
        raise InvalidInputError("outputs must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for index in range(len(raw)):
        item = raw[index]
        if not isinstance(item, simdjson.Object) or not isinstance(item.get("name"), str):
            raise InvalidInputError(f"outputs[{index}] must be an object with a name")
        name = item.get("name")
        parameters = _parameters(item.get("parameters"), f"output {echo(name)}.parameters")
        if name in names:
            raise InvalidInputError(f"output {echo(name)} is asked for twice")
        names.append(name)
        if parameters.get("binary_data", False) is True:
            binary.add(name)
    return names, binary


def clips_of(call: InferCall, core: InferenceCore, settings: ServiceSettings) -> list[ClipFeatures]:
    """The request's tensors as one validated clip per batch row.

    Raises:
        InvalidInputError: an input the model does not take, a tensor of the wrong datatype
            or rank, inputs of different batch or step counts, a batch over ``max_batch_size``,
            or a clip ``clip_from_features`` refuses (its errors are the same as ``/v1``'s).
    """
    config = core.config
    _output_names(call, config)  # unknown outputs are refused before any model call
    masks_of = {m + MASK_SUFFIX: m for m in config.modalities}
    unknown = [n for n in call.inputs if n not in config.modalities and n not in masks_of]
    if unknown:
        taken = list(config.modalities) + list(masks_of)
        raise InvalidInputError(
            f"inputs {echo_names(unknown)} are not inputs of the model (it takes {taken})"
        )
    features: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for tensor in call.inputs.values():
        if tensor.name in masks_of:
            _expect(tensor, "BOOL", 2, "[batch, steps]")
            masks[masks_of[tensor.name]] = tensor.values
        else:
            _expect(tensor, "FP32", 3, "[batch, steps, features]")
            features[tensor.name] = tensor.values
    if not features:
        raise InvalidInputError(f"send at least one of the inputs {list(config.modalities)}")
    without = sorted(set(masks) - set(features))
    if without:
        raise InvalidInputError(f"masks given for modalities without features: {without}")
    batches = {t.name: t.shape[0] for t in call.inputs.values()}
    batch = next(iter(batches.values()))
    if any(b != batch for b in batches.values()):
        raise InvalidInputError(f"every input must have the same batch size, got {batches}")
    if not 1 <= batch <= settings.max_batch_size:
        raise InvalidInputError(
            f"the batch size is {batch}; this server takes 1 to {settings.max_batch_size}"
        )
    profile = call.feature_profile or config.feature_profile
    return [
        core.clip_from_features(
            profile,
            {m: values[row] for m, values in features.items()},
            {m: values[row] for m, values in masks.items()} or None,
        )
        for row in range(batch)
    ]


def _expect(tensor: InputTensor, datatype: str, rank: int, layout: str) -> None:
    if tensor.datatype != datatype:
        raise InvalidInputError(
            f"input {echo(tensor.name)} must be {datatype}, got {echo(tensor.datatype)}"
        )
    if len(tensor.shape) != rank:
        raise InvalidInputError(
            f"input {echo(tensor.name)} must have shape {layout}, got {list(tensor.shape)}"
        )


# -- answers -------------------------------------------------------------------------------------


def render_answer(
    call: InferCall, predictions: Sequence[Prediction], core: InferenceCore, request_id: str
) -> Response:
    """The protocol's answer for a batch's predictions: JSON, or JSON then binary outputs."""
    config = core.config
    tensors = _output_tensors(predictions, list(config.emotion_classes), list(config.modalities))
    names = _output_names(call, config)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        values = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if call.binary_default or name in call.binary_outputs:
            raw = values.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = values.ravel().tolist()
        outputs.append(out)
    identity = predictions[0].model
    answer: dict[str, Any] = {"model_name": identity.name, "model_version": identity.version}
    if call.request_id is not None:
        answer["id"] = call.request_id
    timings = _batch_timings(predictions)
    answer["parameters"] = _answer_parameters(predictions, timings, request_id)
    answer["outputs"] = outputs
    headers = {"Server-Timing": server_timing(timings)}
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return Response(head, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(head))
    return Response(
        b"".join([head, *chunks]), media_type="application/octet-stream", headers=headers
    )


def _output_names(call: InferCall, config: CoupledMambaConfig) -> list[str]:
    """The outputs to answer, in order.

    Raises:
        InvalidInputError: an output the model does not have.
    """
    available = [o["name"] for o in tensor_outputs(config)]
    if call.attribution:
        available.append(ATTRIBUTION)
    names = call.outputs if call.outputs is not None else available
    missing = [n for n in names if n not in available]
    if missing:
        raise InvalidInputError(
            f"outputs {echo_names(missing)} are not outputs of the model (it has {available})"
        )
    return names


def _output_tensors(
    predictions: Sequence[Prediction], emotions: list[str], modalities: list[str]
) -> dict[str, np.ndarray]:
    tensors = {
        "score": np.array([p.score for p in predictions], dtype=np.float32),
        "probabilities": np.array(
            [[p.probabilities[c] for c in CLASS_NAMES] for p in predictions], dtype=np.float32
        ),
    }
    if emotions:
        tensors["emotions"] = np.array(
            [[(p.emotions or {}).get(e, 0.0) for e in emotions] for p in predictions],
            dtype=np.float32,
        )
    if all(p.attribution is not None for p in predictions):
        tensors[ATTRIBUTION] = np.array(
            [[(p.attribution or {}).get(m) or 0.0 for m in modalities] for p in predictions],
            dtype=np.float32,
        )
    return tensors


def _batch_timings(predictions: Sequence[Prediction]) -> dict[str, float]:
    """The request's stages: each the longest of its clips' (they ran side by side)."""
    stages = predictions[0].timings_ms.keys()
    return {s: max(p.timings_ms[s] for p in predictions) for s in stages}


def _answer_parameters(
    predictions: Sequence[Prediction], timings: Mapping[str, float], request_id: str
) -> dict[str, Any]:
    first = predictions[0]
    memory = first.gpu_memory
    parameters: dict[str, Any] = {"request_id": request_id}
    parameters.update({f"{stage}_ms": round(ms, 3) for stage, ms in timings.items() if ms})
    parameters["total_ms"] = round(timings.get("total", 0.0), 3)
    parameters["batch_size"] = max(p.batch_size for p in predictions)
    parameters["padded_length"] = max(p.padded_length for p in predictions)
    parameters["device"] = memory.device
    parameters["scan_backend"] = first.model.scan_backend
    figures = {
        "gpu_allocated_bytes": memory.allocated_bytes,
        "gpu_reserved_bytes": memory.reserved_bytes,
        "gpu_peak_allocated_bytes": memory.peak_allocated_bytes,
        "gpu_total_bytes": memory.total_bytes,
    }
    parameters.update({k: v for k, v in figures.items() if v is not None})
    return parameters


# -- errors --------------------------------------------------------------------------------------

_PROTOCOL_STATUS = {422: 400, 415: 400}
"""``/v1`` statuses said otherwise on ``/v2``: the protocol answers a bad request with 400."""


def is_protocol_path(path: str) -> bool:
    """Whether errors on ``path`` take the protocol's shape: ``/v2`` and its model routes. The
    health routes keep the service's error shape (docs: DESIGN's error contract); the protocol
    asks only their status codes of them."""
    return path == "/v2" or (path.startswith("/v2/") and not path.startswith("/v2/health/"))


def protocol_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    """The protocol's error answer."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return JSONResponse(
        {"error": message},
        status_code=_PROTOCOL_STATUS.get(status, status),
        headers=dict(headers or {}),
    )


Handler = Callable[[Request, Exception], Awaitable[Response]]


def install(app: FastAPI) -> None:
    """Route the protocol and answer errors on ``/v2`` in its shape (other paths keep the
    handlers :func:`service.api.errors.install_handlers` set, which must run first)."""
    app.include_router(server_router)
    app.include_router(router)
    retry_after_s = app.state.settings.retry_after_s

    def on_service_error(exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return protocol_error(exc.message, http_status(exc), error_headers(exc, retry_after_s))

    def on_validation_error(exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p)[:64] for p in first.get("loc", ()))
        return protocol_error(f"{where}: {str(first.get('msg', 'invalid'))[:200]}", 400)

    def on_http_error(exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return protocol_error(str(exc.detail), exc.status_code, exc.headers)

    for kind, answer in (
        (ServiceError, on_service_error),
        (RequestValidationError, on_validation_error),
        (StarletteHTTPException, on_http_error),
    ):
        app.add_exception_handler(kind, _on_protocol_path(answer, app.exception_handlers[kind]))


def _on_protocol_path(answer: Callable[[Exception], Response], otherwise: Any) -> Handler:
    async def handle(request: Request, exc: Exception) -> Response:
        if is_protocol_path(request.url.path):
            return answer(exc)
        response: Response = await otherwise(request, exc)
        return response

    return handle


def _short(exc: Exception) -> str:
    return str(exc).split(":")[0][:80]
