"""Face crop and facial-expression encoder: real face-mesh landmarks, a tiny seeded encoder."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from preprocessing import ExtractorSettings
from preprocessing.face_expression import (
    CLASSES,
    CROP_SIZE,
    FACE_EMBED_DIM,
    FaceEncoderError,
    FaceExpressionEncoder,
    build_network,
    crop_box,
    fer_canvas,
    save_encoder,
    valence,
)
from preprocessing.media import decode_media
from preprocessing.visual import FaceMeshRunner, frame_embeddings, visual_on_grid

ROOT = Path(__file__).resolve().parents[2]
# The trained encoder as the embedded default checkpoint ships it.
SHIPPED_WEIGHTS = ROOT / "model" / "checkpoints" / "default" / "face_encoder.safetensors"
FER_DIR = Path(os.environ.get("CMAMBA_DATA_DIR") or ROOT / "data") / "fer2013"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    x = a.astype(np.float64).ravel() - a.mean()
    y = b.astype(np.float64).ravel() - b.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def frames(clip) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return decode_media(clip("hap_mp4"), ExtractorSettings(), audio=False, video=True).frames


@pytest.fixture(scope="module")
def frame(frames: list[np.ndarray]) -> np.ndarray:
    return frames[len(frames) // 2]


@pytest.fixture(scope="module")
def runner() -> Iterator[FaceMeshRunner]:
    with FaceMeshRunner(static_image_mode=True) as mesh:
        yield mesh


@pytest.fixture()
def tiny_weights(tmp_path: Path) -> tuple[Path, str]:
    import torch

    torch.manual_seed(0)
    net = build_network()
    # Non-trivial batch-norm statistics, so a wrong load would show.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "face_encoder.safetensors"
    return path, save_encoder(net.eval(), path)


def test_crop_is_deterministic_and_upright(frame: np.ndarray, runner: FaceMeshRunner) -> None:
    seen = runner.observe(frame, crop=True)
    again = runner.observe(frame, crop=True)
    assert seen is not None and again is not None
    assert seen.crop is not None and again.crop is not None
    assert seen.crop.shape == (CROP_SIZE, CROP_SIZE) and seen.crop.dtype == np.uint8
    assert np.array_equal(seen.crop, again.crop)
    # The 17 features come from the same pass.
    assert seen.features.shape == (17,) and seen.features[0] == 1.0
    for degrees in (25.0, -30.0):
        turned = runner.observe(_rotate(frame, degrees), crop=True)
        assert turned is not None and turned.crop is not None
        upright = _corr(seen.crop, turned.crop)
        # A crop that kept the rotation would match the upright one much worse.
        kept = _corr(seen.crop, _rotate(seen.crop, degrees))
        assert upright > 0.8, upright
        assert upright > kept + 0.25, (upright, kept)


def test_crop_geometry_follows_the_landmarks(frame: np.ndarray, runner: FaceMeshRunner) -> None:
    marks = runner.landmarks(frame)
    assert marks is not None
    h, w = frame.shape[:2]
    centre, u, v, side = crop_box(marks, w, h)
    assert abs(float(u @ v)) < 1e-9 and abs(u[0]) > 0.95  # a frontal, upright face
    # Landmarks moved, scaled and turned in the image: the box follows exactly.
    pix = marks[:, :2] * [w, h]
    angle = 0.4
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = (pix - pix.mean(0)) @ rot.T * 0.5 + [100.0, 80.0]
    c2, u2, _, side2 = crop_box(moved / [w, h], w, h)
    assert side2 == pytest.approx(0.5 * side, rel=1e-9)
    assert np.allclose(u2, rot @ u, atol=1e-9)
    assert np.allclose(c2, (centre - pix.mean(0)) @ rot.T * 0.5 + [100.0, 80.0], atol=1e-6)


def test_fer_like_image_crop_reproduces_its_framing(
    frame: np.ndarray, runner: FaceMeshRunner
) -> None:
    seen = runner.observe(frame, crop=True)
    assert seen is not None and seen.crop is not None
    fer_like = seen.crop  # 48x48 grey, framed as the fitted FER framing
    canvas = fer_canvas(fer_like)
    assert canvas.shape == (192, 192)
    again = runner.observe(canvas, crop=True)
    assert again is not None and again.crop is not None
    assert _corr(fer_like, again.crop) > 0.65
    # A shifted framing matches clearly worse.
    shifted = np.roll(fer_like, 8, axis=0)
    assert _corr(fer_like, again.crop) > _corr(shifted, again.crop) + 0.1


@pytest.mark.skipif(not FER_DIR.is_dir(), reason="FER2013 images not on this machine")
def test_fer_images_crops_resemble_the_originals(runner: FaceMeshRunner) -> None:
    import cv2

    files = sorted((FER_DIR / "validation" / "happy").glob("*.jpg"))[:60]
    scores = []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        seen = runner.observe(fer_canvas(image), crop=True)
        if seen is not None and seen.crop is not None:
            scores.append(_corr(image, seen.crop))
    assert len(scores) > 40
    assert float(np.median(scores)) > 0.55


def test_encoder_loads_checks_and_encodes(tiny_weights: tuple[Path, str]) -> None:
    path, sha = tiny_weights
    encoder = FaceExpressionEncoder(path, sha256=sha).load()
    assert encoder.metadata["classes"] == list(CLASSES)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, size=(5, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    out = encoder.encode_crops(crops)
    assert out.shape == (5, FACE_EMBED_DIM) and out.dtype == np.float32
    assert np.all(out[:, 0] == 1.0)
    logits = out[:, 1 : 1 + len(CLASSES)]
    assert np.allclose(logits.sum(axis=1), 0.0, atol=1e-4)  # centred logits
    assert np.all(out[:, 1 + len(CLASSES) :] >= 0.0)  # embedding after ReLU
    assert np.ptp(out[:, 1:], axis=0).max() > 1e-3  # different crops, different features
    # One frame alone gives its row of the batch; no face gives None.
    single = encoder.frame_feature(crops[2])
    assert single is not None and np.allclose(single, out[2], atol=1e-5)
    assert encoder.frame_feature(None) is None
    probs = encoder.probabilities(crops)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(np.abs(valence(probs)) <= 1.0)
    # Pickles without its network and loads again.
    copy = pickle.loads(pickle.dumps(encoder))
    assert not copy.loaded
    assert np.allclose(copy.encode_crops(crops), out, atol=1e-6)


def test_encoder_rejects_a_wrong_file(tiny_weights: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = tiny_weights
    with pytest.raises(FaceEncoderError, match="sha256"):
        FaceExpressionEncoder(path, sha256="0" * 64).load()
    with pytest.raises(FaceEncoderError, match="not found"):
        FaceExpressionEncoder(tmp_path / "missing.safetensors").load()


def test_encoder_is_thread_safe(tiny_weights: tuple[Path, str]) -> None:
    path, sha = tiny_weights
    encoder = FaceExpressionEncoder(path, sha256=sha)  # loaded by the first thread to need it
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, size=(8, 6, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = encoder.encode_crops(crops[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert np.allclose(results[i], encoder.encode_crops(crops[i]), atol=1e-6)


def test_frame_embeddings_on_the_grid(
    frames: list[np.ndarray], tiny_weights: tuple[Path, str]
) -> None:
    path, sha = tiny_weights
    encoder = FaceExpressionEncoder(path, sha256=sha).load()
    some = list(frames[:6])
    some[2] = np.zeros_like(some[2])  # no face in this frame
    values, found = frame_embeddings(some, encoder)
    with FaceMeshRunner() as mesh:  # one frame at a time, as the streaming path does
        for i, image in enumerate(some):
            seen = mesh.observe(image, crop=True)
            one = encoder.frame_feature(seen)
            assert (one is not None) == found[i]
            if one is not None:
                assert np.allclose(one, values[i], atol=1e-5)
    assert values.shape == (6, FACE_EMBED_DIM)
    assert found.tolist() == [True, True, False, True, True, True]
    assert np.all(values[~found] == 0.0)
    times = np.arange(6) / 5.0
    grid, mask = visual_on_grid(values, found, times, 12, 10.0, 5.0)
    assert grid.shape == (12, FACE_EMBED_DIM) and grid.dtype == np.float32
    # Frame 2 (0.4 s) owns cell 4 and is the nearest frame of cell 3: both masked.
    assert mask.tolist() == [True] * 3 + [False, False] + [True] * 7
    assert np.allclose(grid[0], values[0]) and np.allclose(grid[6], values[3])


def test_trained_encoder_file_loads() -> None:
    encoder = FaceExpressionEncoder(SHIPPED_WEIGHTS).load()
    assert encoder.metadata["trained_on"] == "FER2013 Training"
    assert SHIPPED_WEIGHTS.stat().st_size < 2_000_000


@pytest.mark.skipif(
    not hasattr(ExtractorSettings, "face_encoder_path"),
    reason="ExtractorSettings has no face_encoder_path yet",
)
def test_extractor_visual_branch_with_the_encoder(
    clip: Callable[[str], Path],
    tiny_weights: tuple[Path, str],
) -> None:
    from dataclasses import replace

    from preprocessing import Extractor

    path, sha = tiny_weights
    settings = replace(
        ExtractorSettings(),
        face_encoder_path=path,
        face_encoder_sha256=sha,
    )
    whole = Extractor(settings, modalities=("visual",)).extract(clip("hap_mp4"))
    feats, mask = whole.features["visual"], whole.masks["visual"]
    assert feats.shape == (whole.length, FACE_EMBED_DIM) and mask.mean() > 0.8
    assert np.allclose(feats[mask, 0], 1.0) and np.all(feats[~mask] == 0.0)
    # Frames streamed through face mesh while decoding give the same features.
    streamed_settings = replace(settings, stream_frames_after_s=0.0)
    streamed = Extractor(streamed_settings, modalities=("visual",)).extract(clip("hap_mp4"))
    assert np.array_equal(streamed.masks["visual"], mask)
    assert np.allclose(streamed.features["visual"], feats, atol=1e-5)
