"""The embedded checkpoints: pinned hashes, declared modalities, and each branch at work on real
clips (the default reads text, voice and face; the text-only one stays available by name)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import CheckpointError, load_checkpoint, load_checkpoint_with_info
from model.checkpoints import (
    DEFAULT_CHECKPOINT_SHA256,
    DEFAULT_FACE_ENCODER_SHA256,
    DEFAULT_TEXT_ENCODER_SHA256,
    TEXT_ONLY_CHECKPOINT_SHA256,
    default_checkpoint_path,
    load_default_checkpoint,
    pinned_hashes,
    text_only_checkpoint_path,
)
from model.training.data import Sample
from model.training.trainer import predict_scores

HAPPY, ANGRY = "cremad_1001_DFA_HAP_XX.mp4", "cremad_1001_DFA_ANG_XX.mp4"
WORDS = "Don't forget a jacket"  # what the actor says in both clips


def test_default_checkpoint_is_small_coupled_and_declares_three_modalities() -> None:
    folder = default_checkpoint_path()
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 1024 * 1024
    config = json.loads((folder / "config.json").read_text())
    assert config["modalities"] == ["text", "audio", "visual"]
    assert config["feature_profile"] == "multimodal-v1"
    assert config["state_coupling"] in ("learned", "mean")  # the coupling is active
    assert config["emotion_classes"][:2] == ["neutral", "happy"]
    assert config["text_encoder"]["sha256"] == DEFAULT_TEXT_ENCODER_SHA256
    assert config["face_encoder"]["sha256"] == DEFAULT_FACE_ENCODER_SHA256
    assert len(DEFAULT_CHECKPOINT_SHA256) == 64
    card = (folder / "MODEL_CARD.md").read_text()
    for source in ("RAVDESS", "FER2013", "Hutto & Gilbert", "CC BY-NC-SA 4.0"):
        assert source in card
    model = load_default_checkpoint()
    coupling = np.array(model.coupling_matrices())  # (layers, 3, 3)
    assert np.allclose(coupling.sum(-1), 1.0) and (coupling[:, 0, 1:] > 1e-3).all()


@pytest.mark.parametrize("name", ["model.safetensors", "face_encoder.safetensors"])
def test_tampered_default_files_are_refused(tmp_path: Path, name: str) -> None:
    copy = tmp_path / "default"
    shutil.copytree(default_checkpoint_path(), copy)
    target = copy / name
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    target.write_bytes(bytes(data))
    if name != "model.safetensors":  # make the config agree, so only the pin can tell
        config = json.loads((copy / "config.json").read_text())
        config["face_encoder"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(copy, **pinned_hashes(default_checkpoint_path()))


def test_text_only_checkpoint_stays_available_and_orders_clear_sentiment() -> None:
    from preprocessing.dataset import encode_texts_on_grid
    from preprocessing.text import TextEncoder
    from service.settings import ServiceSettings

    folder = text_only_checkpoint_path()
    assert ServiceSettings(model_path="text-only").model_path == folder
    model, info = load_checkpoint_with_info(folder, **pinned_hashes(folder))
    assert model.config.modalities == ("text",)
    assert info.sha256 == TEXT_ONLY_CHECKPOINT_SHA256
    tuning = info.text_encoder
    assert tuning is not None
    encoder = TextEncoder(tuning=tuning["path"], tuning_sha256=tuning["sha256"])
    texts = [
        "This is a wonderful, beautiful film and I loved every minute of it.",
        "What a terrible, boring waste of time; I hated it.",
        "The meeting is at three o'clock in room B.",
    ]
    samples = [
        Sample.from_dense(str(i), 0.0, {"text": f}, {"text": m}, dtype=np.float32)
        for i, (f, m) in enumerate(encode_texts_on_grid(texts, encoder))
    ]
    positive, negative, neutral = predict_scores(model, samples)
    assert positive > 1.0 and negative < -1.0
    assert negative < neutral < positive


# The text-only checkpoint's held-out test r per source (movie / NYT / tweets), the issue's
# bar: the default must stay within 0.02 of each. The text-only checkpoint is pinned by hash,
# so these are its answers, not a tolerance fitted to the default's.
TEXT_ONLY_TEST_R = {"movie_reviews": 0.728, "nyt_editorials": 0.687, "tweets": 0.876}


def test_the_default_reads_text_within_0_02_of_the_text_only_checkpoint() -> None:
    """Pearson r of the default's text-only answers on the snippets' held-out test split (the
    fixed hash split the build trains and selects around), per source, as the service encodes
    a typed transcript."""
    from conftest import SHARED

    from model.training.rated_texts import read_snippet_folder, split_rated_texts
    from preprocessing.dataset import encode_texts_on_grid
    from preprocessing.text import TextEncoder

    folder = SHARED / "data" / "sentiment-snippets"
    if not folder.is_dir():
        pytest.skip(f"shared sentiment snippets not found at {folder}")
    test = split_rated_texts(read_snippet_folder(folder))["test"]
    model, info = load_checkpoint_with_info(
        default_checkpoint_path(), **pinned_hashes(default_checkpoint_path())
    )
    tuning = info.text_encoder
    assert tuning is not None
    encoder = TextEncoder(tuning=tuning["path"], tuning_sha256=tuning["sha256"])
    samples = [
        Sample.from_dense(str(i), 0.0, {"text": f}, {"text": m}, dtype=np.float32)
        for i, (f, m) in enumerate(encode_texts_on_grid([t.text for t in test], encoder))
    ]
    scores = predict_scores(model, samples, batch_size=128, modalities=("text",))
    for source, floor in TEXT_ONLY_TEST_R.items():
        rows = [i for i, t in enumerate(test) if t.source == source]
        assert len(rows) > 400
        r = float(np.corrcoef(scores[rows], [test[i].rating for i in rows])[0, 1])
        assert r >= floor - 0.02, (source, r)


# -- each branch on real clips, through the service ------------------------------------------


@pytest.fixture(scope="module")
def served(shared_media: Path, tmp_path_factory: pytest.TempPathFactory, remux) -> Any:
    """The app serving the default checkpoint (real extractor), and the test clips: the two
    CREMA-D clips (same actor and sentence, happy and angry) whole, face only (silent video) and
    voice only (no video stream)."""
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("clips")
    clips = {}
    for emotion, name in (("happy", HAPPY), ("angry", ANGRY)):
        source = shared_media / name
        clips[emotion] = source
        clips[f"{emotion}_face"] = remux(source, root / f"{emotion}_face.mp4", "mp4", ("video",))
        clips[f"{emotion}_voice"] = remux(source, root / f"{emotion}_voice.mp4", "mp4", ("audio",))
    app = create_app(ServiceSettings(torch_threads=1, max_batch_delay_ms=1.0))
    with TestClient(app) as client:
        assert app.state.core.wait_started(300)
        yield client, clips


def _predict(client: Any, path: Path, transcript: str | None = WORDS) -> dict[str, Any]:
    data = {"transcript": transcript} if transcript else {}
    response = client.post(
        "/v1/predict", files={"file": (path.name, path.read_bytes(), "video/mp4")}, data=data
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_happy_clip_scores_above_angry_with_the_words_held_fixed(served) -> None:
    client, clips = served
    happy, angry = _predict(client, clips["happy"]), _predict(client, clips["angry"])
    assert happy["modalities"]["used"] == angry["modalities"]["used"] == [
        "text", "audio", "visual"
    ]  # fmt: skip
    assert happy["sentiment"]["score"] > angry["sentiment"]["score"]
    assert angry["emotions"]["angry"] > happy["emotions"]["angry"]
    assert abs(sum(happy["emotions"].values()) - 1.0) < 1e-4


def test_a_silent_face_is_scored_and_the_face_alone_orders_the_clips(served) -> None:
    """A silent video of a face (no audio stream, no words) answers, and the face branch alone
    puts the happy clip above the angry one."""
    client, clips = served
    happy = _predict(client, clips["happy_face"], transcript=None)
    angry = _predict(client, clips["angry_face"], transcript=None)
    assert happy["modalities"]["used"] == ["visual"] == angry["modalities"]["used"]
    assert happy["sentiment"]["score"] > angry["sentiment"]["score"] + 0.5
    assert happy["emotions"]["happy"] > angry["emotions"]["happy"]


def test_a_voice_without_a_picture_or_words_is_scored(served) -> None:
    """A voice alone answers (ASR may find words in it; the audio must be used, no face)."""
    client, clips = served
    for emotion in ("happy", "angry"):
        body = _predict(client, clips[f"{emotion}_voice"], transcript=None)
        assert "audio" in body["modalities"]["used"]
        assert "visual" not in body["modalities"]["used"]
        assert body["modalities"]["frames"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="known miss, in the model card: trained on RAVDESS alone, the voice branch ranks "
    "this CREMA-D actor's angry clip above the happy one",
)
def test_the_voice_alone_orders_the_clips(served) -> None:
    client, clips = served
    happy = _predict(client, clips["happy_voice"], transcript=WORDS)
    angry = _predict(client, clips["angry_voice"], transcript=WORDS)
    assert happy["sentiment"]["score"] > angry["sentiment"]["score"]


def test_removing_a_modality_changes_the_answer_and_absent_ones_are_handled(
    served, shared_media: Path
) -> None:
    """The same clip's features with and without the face: different answers; with the face
    alone (text and audio absent from the request): still an answer."""
    from preprocessing import Extractor, ExtractorSettings

    client, _ = served
    model, info = load_checkpoint_with_info(
        default_checkpoint_path(), **pinned_hashes(default_checkpoint_path())
    )
    assert info.text_encoder and info.face_encoder
    settings = ExtractorSettings(
        audio_features="whisper",
        text_tuning_path=Path(info.text_encoder["path"]),
        face_encoder_path=Path(info.face_encoder["path"]),
    )
    bundle = Extractor(settings).extract(shared_media / HAPPY, transcript=WORDS)

    def score(modalities: tuple[str, ...]) -> float:
        body = {
            "profile": "multimodal-v1",
            "features": {m: bundle.features[m].tolist() for m in modalities},
            "masks": {m: bundle.masks[m].tolist() for m in modalities},
        }
        response = client.post("/v1/predict/features", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["modalities"]["used"] == list(modalities)
        return float(response.json()["sentiment"]["score"])

    everything = score(("text", "audio", "visual"))
    assert abs(everything - score(("text", "audio"))) > 1e-3
    assert abs(everything - score(("audio", "visual"))) > 1e-3
    face_only = score(("visual",))
    features = {"visual": torch.from_numpy(bundle.features["visual"])[None]}
    masks = {"visual": torch.from_numpy(bundle.masks["visual"])[None]}
    with torch.no_grad():
        assert face_only == pytest.approx(float(model(features, masks).score[0]), abs=1e-4)
