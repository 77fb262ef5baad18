"""Visual features: invariance to pose and scale on real landmarks, and grid placement."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing import ExtractorSettings
from preprocessing.media import decode_media
from preprocessing.profiles import VISUAL_FEATURE_NAMES
from preprocessing.visual import (
    LOWER_LIP_INNER,
    VISUAL_DIM,
    FaceMeshRunner,
    face_features,
    visual_on_grid,
)

EXPRESSION = slice(4, 16)  # mouth_open .. cheek_raise: pose- and scale-free features
NAME = {n: i for i, n in enumerate(VISUAL_FEATURE_NAMES)}


@pytest.fixture(scope="module")
def landmarks(clip) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Face-mesh landmarks of a real frame, in pixel units (x, y, z on the x scale)."""
    frames = decode_media(clip("hap_mp4"), ExtractorSettings(), audio=False, video=True).frames
    frame = frames[len(frames) // 2]
    with FaceMeshRunner() as runner:
        marks = runner.landmarks(frame)
    assert marks is not None and marks.shape == (468, 3)
    h, w = frame.shape[:2]
    return marks * np.array([w, h, w])


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (
        np.cos(yaw),
        np.sin(yaw),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(roll),
        np.sin(roll),
    )
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return r_roll @ r_pitch @ r_yaw


def test_expression_features_ignore_pose_scale_and_position(landmarks: np.ndarray) -> None:
    base = face_features(landmarks, 1, 1)
    assert base.shape == (VISUAL_DIM,) and base[NAME["face_present"]] == 1.0
    centre = landmarks.mean(axis=0)
    moved = (landmarks - centre) @ _rotation(0.3, -0.2, 0.25).T * 1.7 + centre + [40, -25, 3]
    other = face_features(moved, 1, 1)
    assert np.allclose(other[EXPRESSION], base[EXPRESSION], atol=1e-4)
    assert other[NAME["face_size"]] == pytest.approx(1.7 * base[NAME["face_size"]], rel=1e-4)
    # A pure in-plane rotation changes roll by exactly its angle, and nothing else.
    rolled = face_features((landmarks - centre) @ _rotation(0, 0, 0.25).T + centre, 1, 1)
    assert rolled[NAME["head_roll"]] - base[NAME["head_roll"]] == pytest.approx(0.25, abs=1e-4)
    assert rolled[NAME["head_yaw"]] == pytest.approx(base[NAME["head_yaw"]], abs=1e-4)


def test_turning_the_head_changes_yaw_and_pitch(landmarks: np.ndarray) -> None:
    centre = landmarks.mean(axis=0)
    base = face_features(landmarks, 1, 1)
    turned = face_features((landmarks - centre) @ _rotation(0.4, 0, 0).T + centre, 1, 1)
    nodded = face_features((landmarks - centre) @ _rotation(0, 0.3, 0).T + centre, 1, 1)
    assert abs(turned[NAME["head_yaw"]] - base[NAME["head_yaw"]]) > 0.3
    assert abs(nodded[NAME["head_pitch"]] - base[NAME["head_pitch"]]) > 0.2
    assert abs(nodded[NAME["head_yaw"]] - base[NAME["head_yaw"]]) < 0.05


def test_opening_the_mouth_raises_mouth_open(landmarks: np.ndarray) -> None:
    base = face_features(landmarks, 1, 1)
    opened = landmarks.copy()
    eye_corner_distance = np.linalg.norm(landmarks[263] - landmarks[33])
    opened[LOWER_LIP_INNER, 1] += 0.2 * eye_corner_distance  # image y grows downwards
    after = face_features(opened, 1, 1)
    assert after[NAME["mouth_open"]] > base[NAME["mouth_open"]] + 0.15
    changed = np.flatnonzero(~np.isclose(after, base, atol=1e-6))
    assert set(changed.tolist()) <= {NAME["mouth_open"]}


def test_no_face_in_a_blank_frame() -> None:
    with FaceMeshRunner() as runner:
        assert runner.features(np.zeros((120, 160, 3), np.uint8)) is None


def test_grid_fills_cells_between_sparse_frames_and_masks_missing_faces() -> None:
    times = np.arange(10) * 0.2  # 5 frames per second, grid at 10 Hz, 2 s
    values = np.tile(np.arange(10, dtype=np.float32)[:, None], (1, VISUAL_DIM))
    found = np.ones(10, bool)
    found[4] = False  # no face at 0.8 s
    feats, mask = visual_on_grid(values, found, times, 20, 10.0, 5.0)
    assert feats.shape == (20, VISUAL_DIM) and feats.dtype == np.float32
    # Frame k lands in cell 2k; cell 2k+1 (centre 0.2k + 0.15 s) borrows the nearer frame k+1.
    assert np.flatnonzero(~mask).tolist() == [7, 8]  # the cells of the faceless frame 4
    assert feats[6, 5] == 3.0 and feats[5, 5] == 3.0 and feats[9, 5] == 5.0
    assert feats[mask, 0].min() == 1.0 and (feats[~mask] == 0).all()


def test_grid_averages_dense_frames_and_counts_faces() -> None:
    times = np.arange(20) * 0.05  # 20 frames per second over 1 s, grid at 10 Hz
    values = np.tile(np.arange(20, dtype=np.float32)[:, None], (1, VISUAL_DIM))
    found = np.ones(20, bool)
    found[1] = False
    feats, mask = visual_on_grid(values, found, times, 10, 10.0, 20.0)
    assert mask.all()
    assert feats[0, 0] == 0.5  # face_present: one of the cell's two frames
    assert feats[0, 5] == 0.0 and feats[3, 5] == 6.5
