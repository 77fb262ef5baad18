"""Sentiment over time (``POST /v1/timeline``): segmentation, batching and attribution."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from preprocessing import FeatureBundle
from preprocessing.bundle import MediaSummary
from service.core.timeline import Segment, plan_segments, step_range
from service.main import create_app

RATE = 10.0
UTTERANCES = [(1.0, 4.0, "I love this."), (12.0, 15.5, "This is awful."), (16.0, 17.0, "Hm.")]


class BundleExtractor:
    """Stands in for the media extractor: a fixed, seeded bundle with ASR-like segments."""

    def __init__(self, steps: int, segments: list[tuple[float, float, str]], dims: dict[str, int]):
        rng = np.random.default_rng(3)
        self.steps = steps
        self.segments = segments
        self.features = {
            m: rng.standard_normal((steps, d)).astype(np.float32) for m, d in dims.items()
        }
        self.masks = {m: np.ones(steps, dtype=bool) for m in dims}
        # text only where somebody speaks, no face in the first two seconds
        self.masks["text"][:] = False
        for start, end, _ in segments:
            self.masks["text"][int(start * RATE) : int(end * RATE)] = True
        self.masks["visual"][:20] = False
        for m in dims:
            self.features[m][~self.masks[m]] = 0.0
        self.calls = 0

    def warmup(self) -> None:
        pass

    def extract(self, path: Path, transcript: str | None = None) -> FeatureBundle:
        self.calls += 1
        summary = MediaSummary(
            transcript=" ".join(s[2] for s in self.segments) or None,
            transcript_source="asr",
            audio_seconds=self.steps / RATE,
            frames=self.steps // 2,
            frames_with_face=self.steps // 2 - 10,
            duration_s=self.steps / RATE,
            container="mp4",
            has_audio=True,
            has_video=True,
        )
        return FeatureBundle(
            profile="default-v1",
            rate_hz=RATE,
            length=self.steps,
            features={m: a.copy() for m, a in self.features.items()},
            masks={m: a.copy() for m, a in self.masks.items()},
            summary=summary,
            timings_ms={"decode": 1.0, "asr": 2.0, "text": 1.0, "audio": 1.0, "visual": 1.0},
            segments=list(self.segments),
        )


@pytest.fixture
def timeline_app(
    checkpoint: Path, make_settings: Callable[..., Any], start_client: Callable[..., TestClient]
) -> Callable[..., tuple[TestClient, BundleExtractor]]:
    def build(
        steps: int = 240,
        segments: list[tuple[float, float, str]] | None = None,
        **overrides: Any,
    ) -> tuple[TestClient, BundleExtractor]:
        dims = {"text": 384, "audio": 33, "visual": 17}
        extractor = BundleExtractor(steps, UTTERANCES if segments is None else segments, dims)
        settings = make_settings(enable_media=True, **overrides)
        return start_client(create_app(settings, extractor=extractor)), extractor

    return build


def _post(client: TestClient, **params: Any) -> Any:
    files = {"file": ("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4")}
    return client.post("/v1/timeline", files=files, params=params)


def _features_score(
    client: TestClient, extractor: BundleExtractor, first: int, stop: int, drop: str | None = None
) -> float:
    body = {
        "profile": "default-v1",
        "features": {m: a[first:stop].tolist() for m, a in extractor.features.items() if m != drop},
        "masks": {m: a[first:stop].tolist() for m, a in extractor.masks.items() if m != drop},
    }
    answer = client.post("/v1/predict/features", json=body)
    assert answer.status_code == 200, answer.text
    return float(answer.json()["sentiment"]["score"])


# -- segmentation --------------------------------------------------------------------------------


def test_utterances_and_windows_cover_the_clip_in_order() -> None:
    segments = plan_segments(UTTERANCES, 24.0, window_s=5.0, min_gap_s=2.0)
    speech = [s for s in segments if s.source == "speech"]
    assert [(s.start_s, s.end_s, s.transcript) for s in speech] == UTTERANCES
    starts = [s.start_s for s in segments]
    assert starts == sorted(starts)
    # the 8 s between the first two utterances and the 7 s tail are windows; the 1 s at the
    # start and the 0.5 s between utterances two and three are too short to be segments
    windows = [(round(s.start_s, 3), round(s.end_s, 3)) for s in segments if s.source == "window"]
    assert windows == [(4.0, 8.0), (8.0, 12.0), (17.0, 24.0)]
    for a, b in itertools.pairwise(segments):
        assert a.end_s <= b.start_s + 1e-9


def test_no_speech_gives_fixed_windows_over_the_whole_clip() -> None:
    segments = plan_segments([], 23.0, window_s=5.0)
    assert segments[0].start_s == 0.0 and segments[-1].end_s == pytest.approx(23.0)
    assert len(segments) == 5 and all(s.transcript is None for s in segments)
    assert all(4.0 <= s.end_s - s.start_s <= 6.0 for s in segments)


def test_long_utterances_are_cut_and_keep_their_text() -> None:
    segments = plan_segments([(0.0, 70.0, "a long speech")], 70.0, max_segment_s=30.0)
    assert len(segments) == 3
    assert all(s.transcript == "a long speech" for s in segments)
    assert segments[-1].end_s == pytest.approx(70.0)


def test_step_range_is_never_empty() -> None:
    assert step_range(Segment(2.0, 2.02, None, "speech"), RATE, 100) == (20, 21)
    assert step_range(Segment(9.95, 10.0, None, "speech"), RATE, 100) == (99, 100)


# -- the endpoint ---------------------------------------------------------------------------------


def test_each_segment_scores_like_its_slice_alone(timeline_app: Callable[..., Any]) -> None:
    client, extractor = timeline_app()
    answer = _post(client)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["overall_method"] == "clip"
    assert [s["transcript"] for s in body["segments"] if s["source"] == "speech"] == [
        u[2] for u in UTTERANCES
    ]
    assert body["largest_batch"] > 1  # segments and ablations shared model calls
    for seg in body["segments"]:
        first, stop = step_range(Segment(seg["start"], seg["end"], None, "x"), RATE, 240)
        assert seg["score"] == pytest.approx(
            _features_score(client, extractor, first, stop), abs=1e-4
        )
        assert seg["label"] in ("negative", "neutral", "positive")
    whole = _features_score(client, extractor, 0, 240)
    assert body["sentiment"]["score"] == pytest.approx(whole, abs=1e-4)
    assert "Server-Timing" in answer.headers
    assert body["timings_ms"]["total"] > 0 and body["timings_ms"]["model"] > 0


def test_attribution_is_the_score_moved_by_masking_each_modality(
    timeline_app: Callable[..., Any],
) -> None:
    client, extractor = timeline_app()
    body = _post(client).json()
    seg = next(s for s in body["segments"] if s["transcript"] == "I love this.")
    first, stop = step_range(Segment(seg["start"], seg["end"], None, "x"), RATE, 240)
    full = _features_score(client, extractor, first, stop)
    for modality in ("text", "audio", "visual"):
        expected = full - _features_score(client, extractor, first, stop, drop=modality)
        assert seg["attribution"][modality] == pytest.approx(expected, abs=1e-4)
    assert any(abs(seg["attribution"][m]) > 1e-6 for m in ("text", "audio", "visual"))
    # a window with no speech has nothing to remove for text
    window = next(s for s in body["segments"] if s["source"] == "window")
    assert window["attribution"]["text"] == 0.0
    overall = body["attribution"]
    expected = body["sentiment"]["score"] - _features_score(client, extractor, 0, 240, "audio")
    assert overall["audio"] == pytest.approx(expected, abs=1e-4)


def test_modalities_the_checkpoint_lacks_are_null(
    tmp_path: Path,
    make_checkpoint: Callable[..., Path],
    make_settings: Callable[..., Any],
    start_client: Callable[..., TestClient],
) -> None:
    ckpt = make_checkpoint(tmp_path / "ta", ("text", "audio"))
    extractor = BundleExtractor(120, UTTERANCES[:1], {"text": 384, "audio": 33, "visual": 17})
    client = start_client(
        create_app(make_settings(model_path=ckpt, enable_media=True), extractor=extractor)
    )
    body = _post(client).json()
    assert body["attribution"]["visual"] is None
    assert body["attribution"]["text"] is not None and body["attribution"]["audio"] is not None
    assert all(s["attribution"]["visual"] is None for s in body["segments"])


def test_a_clip_longer_than_one_model_call_is_the_mean_of_its_segments(
    timeline_app: Callable[..., Any],
) -> None:
    client, _ = timeline_app(steps=400, segments=[], max_sequence_length=128)
    body = _post(client, window=10).json()
    assert body["overall_method"] == "segment_mean"
    segments = body["segments"]
    assert len(segments) == 4 and all(s["source"] == "window" for s in segments)
    weights = np.array([s["end"] - s["start"] for s in segments])
    scores = np.array([s["score"] for s in segments])
    assert body["sentiment"]["score"] == pytest.approx(
        float((weights * scores).sum() / weights.sum())
    )
    assert len({round(s["score"], 6) for s in segments}) > 1


def test_many_segments_pass_a_small_queue(timeline_app: Callable[..., Any]) -> None:
    # 60 windows x 4 inputs each is far more than the queue holds at once
    client, _ = timeline_app(steps=600, segments=[], max_queue_size=8, max_batch_size=4)
    answer = _post(client, window=1)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["segments"]) == 60
    assert answer.json()["largest_batch"] <= 4


# -- the page -------------------------------------------------------------------------------------


def test_the_page_is_public_and_self_contained(features_app: Callable[..., TestClient]) -> None:
    client = features_app(api_key="s3cret")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'src="/static/app.js"' in html and 'href="/static/style.css"' in html
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in asset.text
    assert "https://" not in html and "http://" not in html
    for bad in ("../main.py", "..%2Fmain.py", "index.py", ".hidden.js", "nope.js"):
        assert client.get(f"/static/{bad}").status_code == 404
    # the API behind it still wants the token
    files = {"file": ("clip.mp4", b"\x00" * 16, "video/mp4")}
    assert client.post("/v1/timeline", files=files).status_code == 401


# -- attribution on /v1/predict -------------------------------------------------------------------


def test_predict_answers_attribution_when_asked(timeline_app: Callable[..., Any]) -> None:
    client, extractor = timeline_app()
    plain = _post_predict(client, attribution=False)
    assert plain["attribution"] is None
    answer = _post_predict(client, attribution=True)
    assert answer["sentiment"]["score"] == pytest.approx(plain["sentiment"]["score"], abs=1e-5)
    full = _features_score(client, extractor, 0, 240)
    for modality in ("text", "audio", "visual"):
        expected = full - _features_score(client, extractor, 0, 240, drop=modality)
        assert answer["attribution"][modality] == pytest.approx(expected, abs=1e-4)
    features = {
        "profile": "default-v1",
        "features": {"text": extractor.features["text"][:50].tolist()},
        "masks": {"text": extractor.masks["text"][:50].tolist()},
    }
    only_text = client.post("/v1/predict/features?attribution=true", json=features).json()
    assert only_text["attribution"]["audio"] == 0.0 and only_text["attribution"]["visual"] == 0.0
    assert only_text["attribution"]["text"] != 0.0


def _post_predict(client: TestClient, attribution: bool) -> Any:
    files = {"file": ("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4")}
    answer = client.post(f"/v1/predict?attribution={str(attribution).lower()}", files=files)
    assert answer.status_code == 200, answer.text
    return answer.json()
