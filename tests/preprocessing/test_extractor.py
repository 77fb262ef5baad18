"""The whole extractor on real clips (real models: ASR, MiniLM, face mesh)."""

from __future__ import annotations

import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from preprocessing import PROFILES, Extractor, ExtractorSettings, FeatureBundle
from preprocessing.errors import NoUsableStreamError

pytestmark = pytest.mark.slow

DIMS = {"text": 384, "audio": 33, "visual": 17}
_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}


def _words(text: str) -> list[str]:
    """Lower-case words, digits spelled out and split from letters ("F2" -> "f two")."""
    text = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", text.lower())
    text = re.sub(r"\d", lambda m: f" {_NUMBERS.get(m.group(), m.group())} ", text)
    return re.findall(r"[a-z']+", text)


def _check_shapes(bundle: FeatureBundle, modalities: tuple[str, ...]) -> None:
    assert bundle.profile == "default-v1" and bundle.rate_hz == PROFILES["default-v1"].rate_hz
    assert tuple(bundle.features) == modalities and tuple(bundle.masks) == modalities
    for m in modalities:
        assert bundle.features[m].shape == (bundle.length, DIMS[m])
        assert bundle.features[m].dtype == np.float32 and np.isfinite(bundle.features[m]).all()
        assert bundle.masks[m].shape == (bundle.length,) and bundle.masks[m].dtype == np.bool_
        assert not bundle.features[m][~bundle.masks[m]].any()  # masked steps are zeros
    assert bundle.length == int(np.ceil(bundle.summary.duration_s * bundle.rate_hz - 1e-6))


def test_jfk_transcript_audio_and_no_visual(bundle_of) -> None:
    bundle = bundle_of("jfk")
    _check_shapes(bundle, ("text", "audio", "visual"))
    text = bundle.summary.transcript.lower()
    assert "fellow americans" in text and "your country" in text
    assert bundle.summary.transcript_source == "asr"
    assert bundle.summary.has_audio and not bundle.summary.has_video
    assert bundle.summary.audio_seconds == pytest.approx(11.0, abs=0.05)
    assert bundle.present("audio") and bundle.present("text") and not bundle.present("visual")
    assert bundle.summary.frames == 0 and bundle.summary.present == ("text", "audio")
    assert len(bundle.segments) >= 1 and bundle.segments[0][0] < 1.0
    # Speech fills most of the clip; the text sits where the words were said.
    assert 0.7 < bundle.masks["text"].mean() <= 1.0
    assert set(bundle.timings_ms) == {"decode", "asr", "text", "audio", "visual"}


@pytest.mark.parametrize(
    "name", ["hap_mp4", "hap_flv", "ang_mp4", "ang_flv", "grid_mp4", "grid_mpg"]
)
def test_talking_heads_have_faces_and_audio(bundle_of, name: str) -> None:
    bundle = bundle_of(name)
    _check_shapes(bundle, ("text", "audio", "visual"))
    summary = bundle.summary
    assert summary.has_audio and summary.has_video and summary.frames >= 9
    assert summary.frames_with_face >= 0.9 * summary.frames
    assert bundle.masks["visual"].mean() >= 0.9
    assert bundle.present("audio") and bundle.masks["audio"].mean() > 0.5
    # Pose and expression values in plausible ranges for a frontal talking head.
    visual = bundle.features["visual"][bundle.masks["visual"]]
    assert np.abs(visual[:, 1:4]).max() < 0.8  # yaw, pitch, roll under ~45 degrees
    assert (visual[:, 5] > 0.5).all() and (visual[:, 5] < 1.5).all()  # mouth width


@pytest.mark.parametrize("name", ["grid_mp4", "grid_mpg"])
def test_grid_transcript_has_at_least_three_of_six_words(bundle_of, name: str) -> None:
    said = ["bin", "blue", "at", "f", "two", "now"]
    heard = _words(bundle_of(name).summary.transcript or "")
    assert sum(w in heard for w in said) >= 3, heard


def test_cremad_transcript(bundle_of) -> None:
    heard = _words(bundle_of("ang_mp4").summary.transcript or "")
    assert {"don't", "forget"} <= set(heard)


def test_client_transcript_skips_asr(extractor, clip) -> None:
    bundle = extractor.extract(clip("grid_mp4"), transcript="  bin blue at f two now ")
    assert "asr" not in bundle.timings_ms and bundle.segments == []
    assert bundle.summary.transcript == "bin blue at f two now"
    assert bundle.summary.transcript_source == "client"
    # Six words at 2.5 words per second: the first 2.4 s carry text.
    assert np.flatnonzero(bundle.masks["text"]).tolist() == list(range(24))


def test_only_requested_modalities_run(extractor, clip) -> None:
    text_only = Extractor(
        extractor.settings, ("text",), text_encoder=extractor.text_encoder,
        recognizer=extractor.recognizer,
    )  # fmt: skip
    bundle = text_only.extract(clip("hap_mp4"), transcript="don't forget a jacket")
    _check_shapes(bundle, ("text",))
    assert set(bundle.timings_ms) == {"decode", "text"}
    assert bundle.summary.frames == 0 and bundle.summary.audio_seconds == 0.0
    # Without a transcript the audio is decoded for ASR, but no audio features are made.
    bundle = text_only.extract(clip("hap_mp4"))
    assert set(bundle.timings_ms) == {"decode", "asr", "text"}
    assert bundle.summary.audio_seconds > 1.5 and bundle.present("text")

    visual_only = Extractor(extractor.settings, ("visual",))
    bundle = visual_only.extract(clip("grid_mp4"))
    _check_shapes(bundle, ("visual",))
    assert bundle.summary.audio_seconds == 0.0 and bundle.present("visual")
    with pytest.raises(NoUsableStreamError, match="no stream"):
        visual_only.extract(clip("jfk"))


def test_video_without_audio_track(extractor, generated) -> None:
    bundle = extractor.extract(generated["video_only"])
    _check_shapes(bundle, ("text", "audio", "visual"))
    assert not bundle.summary.has_audio and bundle.summary.transcript is None
    assert bundle.summary.present == ("visual",)


def test_audio_without_video_track(extractor, generated) -> None:
    bundle = extractor.extract(generated["audio_only"])
    _check_shapes(bundle, ("text", "audio", "visual"))
    assert not bundle.summary.has_video and bundle.summary.container == "mp4"
    assert bundle.summary.present == ("text", "audio")


def test_silence_gives_absent_text_not_an_error(extractor, generated) -> None:
    bundle = extractor.extract(generated["silence"])
    assert bundle.length == 30 and bundle.summary.transcript is None
    assert bundle.segments == [] and not bundle.present("text") and not bundle.present("audio")


def test_same_clip_same_features_across_threads(extractor, clip, bundle_of) -> None:
    names = ["hap_mp4", "grid_mp4", "ang_mp4", "hap_mp4"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda n: extractor.extract(clip(n)), names))
    for name, got in zip(names, results, strict=True):
        expected = bundle_of(name)
        assert got.summary.transcript == expected.summary.transcript
        for m in expected.features:
            assert np.array_equal(got.masks[m], expected.masks[m])
            assert np.allclose(got.features[m], expected.features[m], atol=1e-4)


def test_asr_overlap_does_not_change_results(extractor, clip, bundle_of) -> None:
    sequential = Extractor(
        replace(extractor.settings, overlap_asr=False),
        text_encoder=extractor.text_encoder,
        recognizer=extractor.recognizer,
    )
    got = sequential.extract(clip("ang_flv"))
    expected = bundle_of("ang_flv")
    assert got.summary == expected.summary and got.segments == expected.segments
    for m in expected.features:
        assert np.array_equal(got.masks[m], expected.masks[m])
        assert np.allclose(got.features[m], expected.features[m], atol=1e-4)


def test_extractor_pickles_without_models(extractor) -> None:
    copy = pickle.loads(pickle.dumps(extractor))
    assert copy.modalities == extractor.modalities and copy.settings == extractor.settings
    assert copy._text_encoder is None and copy._recognizer is None


def test_frame_rate_setting(extractor, clip) -> None:
    dense = Extractor(ExtractorSettings(frame_rate_hz=10.0), ("visual",))
    bundle = dense.extract(clip("grid_mp4"))
    assert bundle.summary.frames == 30 and bundle.masks["visual"].all()


def test_unknown_modality_is_rejected() -> None:
    with pytest.raises(ValueError, match="modalities"):
        Extractor(ExtractorSettings(), ("text", "smell"))


def test_no_temporary_files_on_success(extractor, clip, tmp_path, monkeypatch) -> None:
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bundle = extractor.extract(clip("grid_mpg"))
    assert bundle.present("visual")
    assert list(scratch.iterdir()) == []
