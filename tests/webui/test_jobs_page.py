"""The page's Jobs panel in a real browser (Debian's Chromium through Playwright) against a real
server: a recording sent as a job shows up with a progress bar, is polled to its end, and opens
as the timeline view with the job's result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess
from jobmedia import audio_checkpoint, write_tone_wav

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "webui"

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("webui-jobs")
    server = ServerProcess(
        {
            "CMAMBA_MODEL_PATH": str(audio_checkpoint(folder / "ckpt")),
            "CMAMBA_JOBS_DIR": str(folder / "jobs"),
            "CMAMBA_JOBS_PART_S": "10",
            "CMAMBA_JOBS_POLL_S": "0.2",
        }
    )
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page_context(launch_chromium: Any) -> Iterator[object]:
    with launch_chromium(height=1300) as context:
        yield context


def test_a_job_is_listed_with_its_progress_and_opens_as_a_timeline(
    jobs_server: str, page_context: object, tmp_path: Path
) -> None:
    from playwright.sync_api import BrowserContext, expect

    assert isinstance(page_context, BrowserContext)
    recording = write_tone_wav(tmp_path / "meeting.wav", 45.0)
    page = page_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(jobs_server + "/")
    expect(page.locator("#jobs-note")).to_contain_text("No jobs yet")

    page.check("#as-job")
    page.set_input_files("#file-input", str(recording))
    expect(page.locator("#status")).to_contain_text("queued as job", timeout=30_000)
    row = page.locator("#jobs tbody tr").first
    expect(row).to_contain_text("meeting.wav", timeout=10_000)
    expect(row).to_have_attribute("data-state", "succeeded", timeout=120_000)
    expect(row.locator(".progress")).to_have_attribute("aria-valuenow", "100")
    expect(row.locator(".note")).to_contain_text("0:45.0 of 0:45.0")
    job_id = row.get_attribute("data-id")

    # A job queued elsewhere (through the API) appears by polling.
    with recording.open("rb") as fh:
        other = httpx.post(f"{jobs_server}/v1/jobs", files={"file": ("other.wav", fh)})
    assert other.status_code == 202
    expect(page.locator("#jobs tbody tr")).to_have_count(2, timeout=20_000)
    expect(page.locator("#jobs tbody tr").first).to_contain_text("other.wav")

    result = httpx.get(f"{jobs_server}/v1/jobs/{job_id}/result", timeout=30).json()
    page.locator(f'#jobs tbody tr[data-id="{job_id}"] button.open-job').click()
    expect(page.locator("#status")).to_contain_text("job result", timeout=30_000)
    bars = page.locator("#plot svg rect.seg")
    assert bars.count() == len(result["segments"]) >= 9
    assert page.locator("#segments tbody tr").count() == len(result["segments"])
    shown = float(page.locator("#overall-score").inner_text())
    assert shown == pytest.approx(result["sentiment"]["score"], abs=0.006)
    expect(page.locator("#overall-method")).to_contain_text("mean of the segments")
    # The recording came from this page: the video plays it beside the plot.
    duration = page.evaluate(
        "() => new Promise(r => { const v = document.querySelector('#video');"
        " if (v.readyState >= 1) r(v.duration); else { v.onloadedmetadata = () => r(v.duration);"
        " v.onerror = () => r(-1); setTimeout(() => r(-2), 20000); } })"
    )
    assert duration == pytest.approx(45.0, abs=0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
    assert not errors, errors
