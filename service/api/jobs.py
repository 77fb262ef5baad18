"""``/v1/jobs``: long recordings analysed in the background (submit, poll, fetch, cancel).

The routes translate HTTP only: the use cases are :class:`service.jobs.service.JobService`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.api.auth import BearerRoute
from service.api.schemas import ErrorResponse
from service.api.timeline import TimelineResponse, timeline_response
from service.api.uploads import MEDIA_UPLOAD_BODY, Upload, read_body, receive_upload
from service.core.types import CLASS_NAMES
from service.errors import InvalidInputError, JobsDisabledError
from service.jobs.service import JobService, job_status
from service.jobs.store import JobState

router = APIRouter(tags=["jobs"], route_class=BearerRoute)

MAX_PATH_BODY_BYTES = 16 * 1024
JobId = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]

_DESCRIPTIONS = {
    400: "a path outside the import folder, or a callback_url that is not allowed",
    401: "bearer token missing or wrong",
    404: "no such job",
    409: "the job has no result: queued, running, failed or cancelled",
    413: "upload over jobs_max_upload_bytes",
    415: "unsupported media type",
    422: "invalid options, undecodable media, or a recording over jobs_max_media_hours",
    429: "jobs_max_queued jobs are queued (see Retry-After)",
    501: "this server runs no jobs",
    503: "not ready or draining (see Retry-After)",
    507: "the uploads kept for jobs would pass jobs_disk_quota_bytes",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


class JobProgress(BaseModel):
    done_seconds: float = Field(description="media seconds analysed")
    media_seconds: float | None = Field(description="the recording's length, once known")
    fraction: float | None = Field(description="done_seconds / media_seconds")
    stage: str | None = Field(description='"planning", "part 3/60"...')


class JobTimings(BaseModel):
    queue_wait_s: float | None = Field(description="from submission to the first start")
    run_s: float | None = Field(description="from the first start to the end")
    total_s: float | None


class JobCallback(BaseModel):
    url: str | None
    state: str | None = Field(description="null, pending, delivered or failed")


class JobOptionsOut(BaseModel):
    window: float


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    progress: JobProgress
    timings: JobTimings
    error: dict[str, Any] | None = Field(description="{type, message} of a failed job")
    attempts: int = Field(description="starts of the job (a restart resumes it)")
    filename: str | None
    options: JobOptionsOut
    callback: JobCallback
    result_url: str | None


class JobList(BaseModel):
    jobs: list[JobStatus]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page")


def _jobs(request: Request) -> JobService:
    jobs: JobService | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        reason = getattr(request.app.state, "jobs_unavailable", None)
        raise JobsDisabledError(reason or "this server runs no jobs")
    return jobs


def _location(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def _status(record: Any) -> dict[str, Any]:
    return job_status(record, _location(record.id))


@router.post(
    "/v1/jobs",
    status_code=202,
    response_model=JobStatus,
    responses=_errors(400, 401, 413, 415, 422, 429, 501, 503, 507),
    openapi_extra={
        "requestBody": {
            "content": {
                **MEDIA_UPLOAD_BODY["requestBody"]["content"],
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["path"],
                        "properties": {
                            "path": {
                                "type": "string",
                                "description": "a file in the server's import folder",
                            }
                        },
                    }
                },
            },
            "required": True,
        }
    },
)
async def submit_job(
    request: Request,
    window: Annotated[
        float, Query(ge=1.0, le=30.0, description="fixed window (s) where nobody speaks")
    ] = 5.0,
    callback_url: Annotated[
        str | None,
        Query(max_length=2048, description="POSTed once the job ends (allow-listed targets)"),
    ] = None,
) -> JSONResponse:
    """Queue a long recording: multipart ``file`` (as ``/v1/timeline``), or JSON
    ``{"path": ...}`` naming a file in the server's import folder. Answers 202 with the job
    and its ``Location``; poll it, or get called back at ``callback_url``."""
    jobs = _jobs(request)
    settings = jobs.settings
    options = await jobs.options(window, callback_url)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() == "application/json":
        body = await read_body(request, max_bytes=MAX_PATH_BODY_BYTES)
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInputError(f"the body is not JSON: {exc}") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("path"), str):
            raise InvalidInputError('send {"path": "<file in the import folder>"}')
        media = jobs.import_path(parsed["path"])
        record = await jobs.submit(media, owns_media=False, options=options, filename=media.name)
    else:
        declared = request.headers.get("content-length")
        await jobs.check_capacity(int(declared) if declared and declared.isdigit() else None)
        upload = await receive_upload(
            request,
            max_bytes=settings.jobs_max_upload_bytes,
            upload_dir=jobs.uploads_dir,
            max_transcript_chars=settings.max_transcript_chars,
            max_parts=settings.max_form_parts,
            max_header_bytes=settings.max_part_header_bytes,
        )
        assert isinstance(upload, Upload)  # a form without a file is refused
        try:
            await jobs.check_quota(upload.size, kept=upload.path)
        except BaseException:
            upload.path.unlink(missing_ok=True)
            raise
        record = await jobs.submit(
            upload.path, owns_media=True, options=options, filename=upload.filename
        )
    location = _location(record.id)
    return JSONResponse(
        job_status(record, location), status_code=202, headers={"Location": location}
    )


@router.get("/v1/jobs", response_model=JobList, responses=_errors(401, 422, 501))
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
    state: Annotated[JobState | None, Query()] = None,
) -> JobList:
    """The jobs, newest first, a page at a time."""
    records, next_cursor = await _jobs(request).list(limit=limit, cursor=cursor, state=state)
    return JobList(jobs=[JobStatus(**_status(r)) for r in records], next_cursor=next_cursor)


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, responses=_errors(401, 404, 501))
async def get_job(request: Request, job_id: JobId) -> JobStatus:
    """A job's state, progress (media seconds done of total, stage), timings and error."""
    return JobStatus(**_status(await _jobs(request).get(job_id)))


@router.get(
    "/v1/jobs/{job_id}/result",
    response_model=TimelineResponse,
    responses={
        **_errors(401, 404, 409, 501),
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
async def get_job_result(
    request: Request,
    job_id: JobId,
    format: Annotated[Literal["json", "csv"], Query(description="json or csv")] = "json",
) -> Response:
    """A finished job's timeline, in ``/v1/timeline``'s shape (``overall_method`` is
    ``segment_mean``), or its segments as CSV."""
    record, answer = await _jobs(request).result(job_id)
    body = timeline_response(answer, request.state.request_id)
    if format == "csv":
        return Response(
            _csv(body),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="job-{record.id}.csv"'},
        )
    return JSONResponse(body.model_dump(mode="json"))


@router.delete("/v1/jobs/{job_id}", status_code=204, responses=_errors(401, 404, 501))
async def delete_job(request: Request, job_id: JobId) -> Response:
    """Cancel the job (a running one stops after its current step) and remove it, its
    result and its uploaded file."""
    await _jobs(request).delete(job_id)
    return Response(status_code=204)


def _csv(body: TimelineResponse) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["start", "end", "source", "score", "label"]
        + [f"p_{name}" for name in CLASS_NAMES]
        + ["attribution_text", "attribution_audio", "attribution_visual", "transcript"]
    )
    for s in body.segments:
        writer.writerow(
            [s.start, s.end, s.source, round(s.score, 6), s.label]
            + [round(s.probabilities.get(name, 0.0), 6) for name in CLASS_NAMES]
            + [s.attribution.text, s.attribution.audio, s.attribution.visual]
            + [_cell(s.transcript or "")]
        )
    return out.getvalue()


def _cell(text: str) -> str:
    """A text cell that a spreadsheet will not read as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
