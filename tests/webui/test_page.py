"""The web page at ``/`` in a real browser: Debian's headless Chromium driven by Playwright,
against a real server (``cmamba serve`` on a free port, the real extractor, a tiny checkpoint).

The browser is the system's ``/usr/bin/chromium`` (``apt-get install chromium``), started by
tests/webui/conftest.py; without it or Playwright, the test is skipped. A screenshot of the
page with its answer is saved under ``artifacts/webui/`` (git-ignored) for people to look at.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "webui"

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server on a free port serving a tiny random checkpoint with the real extractor."""
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("webui") / "tiny")
    server = ServerProcess({"CMAMBA_MODEL_PATH": str(ckpt)})
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(launch_chromium: Any) -> Iterator[object]:
    with launch_chromium() as context:
        yield context


def test_the_page_shows_sentiment_over_time_of_an_uploaded_clip(
    server: str, browser: object, shared_media: Path
) -> None:
    from playwright.sync_api import BrowserContext, expect

    assert isinstance(browser, BrowserContext)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    outside: list[str] = []
    page.on(
        "request",
        lambda req: None if req.url.startswith(server) or req.url.startswith("blob:")
        else outside.append(req.url),
    )  # fmt: skip
    page.goto(server + "/")
    expect(page.locator("h1")).to_have_text("Sentiment over time")
    expect(page.locator("#result")).to_be_hidden()

    clip = shared_media / "grid_bbaf2n.mp4"  # "bin blue at f two now", a face throughout
    page.set_input_files("#file-input", str(clip))

    # the plot: one bar per segment, drawn once the answer is in
    bars = page.locator("#plot svg rect.seg")
    expect(bars.first).to_be_visible(timeout=120_000)
    answer = page.evaluate(
        "async () => { const f = await fetch('/static/app.js'); return f.status; }"
    )
    assert answer == 200
    n_segments = bars.count()
    assert n_segments >= 1
    assert page.locator("#segments tbody tr").count() == n_segments

    # what is shown agrees with what the server says for the same clip
    with clip.open("rb") as fh:
        expected = httpx.post(
            server + "/v1/timeline", files={"file": (clip.name, fh, "video/mp4")}, timeout=120
        ).json()
    assert n_segments == len(expected["segments"])
    shown_score = float(page.locator("#overall-score").inner_text())
    assert shown_score == pytest.approx(expected["sentiment"]["score"], abs=0.006)
    expect(page.locator("#overall-label")).to_have_text(expected["sentiment"]["label"])
    transcripts = page.locator("#segments tbody").inner_text().lower()
    assert "blue" in transcripts  # the ASR's words are listed
    for modality in ("text", "audio", "visual"):
        row = page.locator(f"#attribution .bar[data-name={modality}] .value")
        value = float(row.inner_text())
        assert value == pytest.approx(expected["attribution"][modality], abs=0.0006)
    timings = page.locator("#timings").inner_text()
    for stage in ("decode", "asr", "model", "total"):
        assert stage in timings
    status = page.locator("#status").inner_text()
    assert "segment" in status and "grid_bbaf2n.mp4" in status

    # the video is beside the plot, and clicking a segment moves the playhead there
    video_ok = page.evaluate(
        "() => new Promise(r => { const v = document.querySelector('#video');"
        " if (v.readyState >= 1) r(v.duration); else { v.onloadedmetadata = () => r(v.duration);"
        " v.onerror = () => r(-1); setTimeout(() => r(-2), 20000); } })"
    )
    assert video_ok == pytest.approx(3.0, abs=0.3)
    before = page.locator("#playhead").get_attribute("x1")
    bars.last.click()
    assert expected["segments"][-1]["start"] > 0.1
    assert page.locator("#playhead").get_attribute("x1") != before

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "timeline.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # a second clip, dropped on the page: audio only, several utterances
    speech = shared_media / "jfk.flac"
    payload = base64.b64encode(speech.read_bytes()).decode()
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "audio/flac" }));
            const zone = document.querySelector("#drop-zone");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        [speech.name, payload],
    )
    expect(page.locator("#status")).to_contain_text("jfk.flac:", timeout=120_000)
    assert bars.count() >= 2
    assert page.locator("#segments tbody tr").count() == bars.count()
    assert "your country" in page.locator("#segments tbody").inner_text().lower()
    assert page.locator("#attribution .bar[data-name=visual] .value").inner_text() == "+0.000"
    page.screenshot(path=str(ARTIFACTS / "timeline-audio.png"), full_page=True)
    assert not errors, errors
    assert not outside, f"the page fetched from elsewhere: {outside}"
