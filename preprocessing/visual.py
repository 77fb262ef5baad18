"""Visual modality: mediapipe face mesh -> compact pose- and scale-normalised expression features.

For each sampled frame the face mesh gives 468 landmarks. They are moved into a head frame (x
along the eye line, y from chin to forehead, z out of the face), centred and divided by the
distance between the outer eye corners, so the expression features do not change with head
pose, distance to the camera or image size. Head pose angles and face size are kept as separate
features. The 17 features are listed in ``preprocessing.profiles.VISUAL_FEATURE_NAMES`` and
documented in docs/FEATURES.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from preprocessing.profiles import VISUAL_FEATURE_NAMES

VISUAL_DIM = len(VISUAL_FEATURE_NAMES)  # 17

# Face mesh landmark indices ("right"/"left" are the subject's).
RIGHT_EYE_OUTER, RIGHT_EYE_INNER, RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM = 33, 133, 159, 145
LEFT_EYE_OUTER, LEFT_EYE_INNER, LEFT_EYE_TOP, LEFT_EYE_BOTTOM = 263, 362, 386, 374
RIGHT_BROW = (70, 63, 105, 66, 107)
LEFT_BROW = (300, 293, 334, 296, 336)
RIGHT_BROW_INNER, LEFT_BROW_INNER = 107, 336
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
UPPER_LIP_OUTER, LOWER_LIP_OUTER = 0, 17
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
NOSE_TIP, NOSE_BASE = 1, 2
CHIN, FOREHEAD = 152, 10


def face_features(landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """Expression and pose features of one face.

    ``landmarks`` (468, 3) as mediapipe returns them (x, y normalised to the image, z on the
    x scale). Returns (17,) float32 in the order of ``VISUAL_FEATURE_NAMES`` (face_present = 1).
    """
    pts = np.asarray(landmarks, dtype=np.float64)[:, :3] * np.array([width, height, width])
    eye_line = pts[LEFT_EYE_OUTER] - pts[RIGHT_EYE_OUTER]
    iod = float(np.linalg.norm(eye_line))
    if iod < 1e-6:
        return np.zeros((VISUAL_DIM,), np.float32)
    # Head frame: x along the eye line, y towards the forehead, z = x × y (out of the face).
    ex = eye_line / iod
    up = pts[FOREHEAD] - pts[CHIN]
    ez = np.cross(ex, up)
    ez /= max(float(np.linalg.norm(ez)), 1e-9)
    ey = np.cross(ez, ex)
    rotation = np.stack([ex, ey, ez])  # (3, 3), rows are head axes in image coordinates
    centre = 0.5 * (pts[LEFT_EYE_OUTER] + pts[RIGHT_EYE_OUTER])
    q = (pts - centre) @ rotation.T / iod  # (468, 3) head-frame coordinates, eye-corner units

    def dist(a: int, b: int) -> float:
        return float(np.linalg.norm(q[a] - q[b]))

    # Image axes: x right, y down, z away from the camera. An upright frontal face has
    # ex = (1, 0, 0), ey = (0, -1, 0).
    yaw = np.arctan2(ex[2], np.hypot(ex[0], ex[1]))
    pitch = np.arctan2(ey[2], np.hypot(ey[0], ey[1]))
    roll = np.arctan2(ex[1], ex[0])

    upper_lip_y = q[UPPER_LIP_INNER, 1]
    corners_y = 0.5 * (q[MOUTH_RIGHT, 1] + q[MOUTH_LEFT, 1])
    right_eye_y = 0.5 * (q[RIGHT_EYE_OUTER, 1] + q[RIGHT_EYE_INNER, 1])
    left_eye_y = 0.5 * (q[LEFT_EYE_OUTER, 1] + q[LEFT_EYE_INNER, 1])
    values = [
        1.0,  # face_present
        yaw,
        pitch,
        roll,
        dist(UPPER_LIP_INNER, LOWER_LIP_INNER),  # mouth_open
        dist(MOUTH_RIGHT, MOUTH_LEFT),  # mouth_width
        corners_y - upper_lip_y,  # lip_corner_raise: corners relative to the upper lip
        dist(NOSE_BASE, UPPER_LIP_OUTER),  # upper_lip_raise (smaller = raised)
        dist(NOSE_TIP, CHIN),  # jaw_drop
        dist(UPPER_LIP_OUTER, LOWER_LIP_OUTER),  # outer_lip_height
        dist(RIGHT_EYE_TOP, RIGHT_EYE_BOTTOM),  # eye_open_right
        dist(LEFT_EYE_TOP, LEFT_EYE_BOTTOM),  # eye_open_left
        float(q[list(RIGHT_BROW), 1].mean()) - right_eye_y,  # brow_raise_right
        float(q[list(LEFT_BROW), 1].mean()) - left_eye_y,  # brow_raise_left
        dist(RIGHT_BROW_INNER, LEFT_BROW_INNER),  # brow_inner_gap
        0.5 * (dist(RIGHT_EYE_BOTTOM, MOUTH_RIGHT) + dist(LEFT_EYE_BOTTOM, MOUTH_LEFT)),
        iod / float(np.hypot(width, height)),  # face_size: eye-corner distance / image diagonal
    ]
    return np.asarray(values, dtype=np.float32)


@dataclass(frozen=True)
class FaceObservation:
    """What one face-mesh pass gives for one frame: the landmarks (468, 3) normalised as
    mediapipe returns them, the 17 features, and (when asked for) the 48x48 grey face crop of
    ``preprocessing.face_expression.face_crop``."""

    landmarks: np.ndarray
    features: np.ndarray
    crop: np.ndarray | None = None


class FaceMeshRunner:
    """One mediapipe FaceMesh graph in video (tracking) mode, for the frames of one clip.

    Not thread-safe: create one per clip (construction takes ~10 ms). A fresh graph per clip keeps
    a clip's features independent of the clips processed before it. ``static_image_mode`` runs
    the detector on every image instead of tracking (for unrelated still images).
    """

    def __init__(self, min_confidence: float = 0.5, static_image_mode: bool = False) -> None:
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_image_mode,
            max_num_faces=1,
            refine_landmarks=False,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def __enter__(self) -> FaceMeshRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the graph."""
        self._mesh.close()

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """Landmarks (468, 3) of the most prominent face in an RGB frame, or None."""
        result: Any = self._mesh.process(np.ascontiguousarray(rgb))
        faces = result.multi_face_landmarks
        if not faces:
            return None
        return np.array([(p.x, p.y, p.z) for p in faces[0].landmark], dtype=np.float64)

    def observe(self, rgb: np.ndarray, crop: bool = False) -> FaceObservation | None:
        """Landmarks, the 17 features and optionally the face crop of the most prominent face in
        an RGB (or grey) frame, from one face-mesh pass; None without a face."""
        image = np.asarray(rgb)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        marks = self.landmarks(image)
        if marks is None:
            return None
        feats = face_features(marks, image.shape[1], image.shape[0])
        face = None
        if crop:
            from preprocessing.face_expression import face_crop

            face = face_crop(image, marks)
        return FaceObservation(landmarks=marks, features=feats, crop=face)

    def features(self, rgb: np.ndarray) -> np.ndarray | None:
        """Features (17,) of the most prominent face in an RGB frame, or None without a face."""
        marks = self.landmarks(rgb)
        if marks is None:
            return None
        return face_features(marks, rgb.shape[1], rgb.shape[0])


def frame_features(
    frames: Sequence[np.ndarray], min_confidence: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame features (F, 17) float32 and face flags (F,) bool for RGB frames of one clip."""
    values = np.zeros((len(frames), VISUAL_DIM), dtype=np.float32)
    found = np.zeros((len(frames),), dtype=bool)
    if not frames:
        return values, found
    with FaceMeshRunner(min_confidence) as runner:
        for i, frame in enumerate(frames):
            feats = runner.features(frame)
            if feats is not None:
                values[i] = feats
                found[i] = True
    return values, found


def frame_embeddings(
    frames: Sequence[np.ndarray], encoder: Any, min_confidence: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Face-encoder features (F, FACE_EMBED_DIM) float32 and face flags (F,) bool for the RGB
    frames of one clip: one face-mesh pass per frame gives the crop; the crops with a face go
    through ``encoder`` (a loaded ``FaceExpressionEncoder``) in one batch."""
    from preprocessing.face_expression import FACE_EMBED_DIM

    found = np.zeros((len(frames),), dtype=bool)
    crops: list[np.ndarray] = []
    if frames:
        with FaceMeshRunner(min_confidence) as runner:
            for i, frame in enumerate(frames):
                seen = runner.observe(frame, crop=True)
                if seen is not None and seen.crop is not None:
                    crops.append(seen.crop)
                    found[i] = True
    values = np.zeros((len(frames), FACE_EMBED_DIM), dtype=np.float32)
    if crops:
        values[found] = encoder.encode_crops(np.stack(crops))
    return values, found


def visual_on_grid(
    values: np.ndarray,
    found: np.ndarray,
    times_s: np.ndarray,
    length: int,
    rate_hz: float,
    frame_rate_hz: float,
    *,
    first_step: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame features averaged into grid cells.

    A cell takes the mean of its frames that show a face; ``face_present`` is the fraction of its
    frames that do. When frames are sampled more sparsely than the grid, a cell without a frame
    takes the nearest frame within half a sampling period of its centre. Cells without a face
    are masked. Column 0 of ``values`` must be the per-frame face flag (``face_present``); the
    other columns are averaged whatever their number (the 17 landmark features, or the face
    encoder's features). Returns (length, D) float32 and (length,) bool.

    ``first_step``: the cells are grid steps ``[first_step, first_step + length)`` (times stay
    absolute); each equals the same step of a grid from 0 given the same frames around it.
    """
    dim = int(values.shape[1]) if np.ndim(values) == 2 else VISUAL_DIM
    features = np.zeros((length, dim), dtype=np.float32)
    mask = np.zeros((length,), dtype=bool)
    if len(times_s) == 0:
        return features, mask
    times = np.asarray(times_s, dtype=np.float64)
    cells = np.floor(times * rate_hz + 1e-9).astype(np.int64) - first_step
    # Cells without a frame of their own borrow the nearest frame in time.
    centres = (np.arange(length) + first_step + 0.5) / rate_hz
    nearest = np.clip(np.searchsorted(times, centres), 1, len(times) - 1)
    left_closer = np.abs(centres - times[nearest - 1]) <= np.abs(times[nearest] - centres)
    nearest = np.where(left_closer, nearest - 1, nearest)
    if len(times) == 1:
        nearest = np.zeros(length, dtype=np.int64)
    own = np.bincount(cells[(cells >= 0) & (cells < length)], minlength=length) > 0
    reach = 0.5 / frame_rate_hz + 0.5 / rate_hz
    borrow = ~own & (np.abs(times[nearest] - centres) <= reach)

    frame_idx = np.concatenate([np.arange(len(times)), nearest[borrow]])
    cell_idx = np.concatenate([cells, np.flatnonzero(borrow)])
    keep = (cell_idx >= 0) & (cell_idx < length)
    frame_idx, cell_idx = frame_idx[keep], cell_idx[keep]

    frames_per_cell = np.bincount(cell_idx, minlength=length)
    face = found[frame_idx]
    faces_per_cell = np.bincount(cell_idx[face], minlength=length)
    sums = np.zeros((length, dim), dtype=np.float64)
    np.add.at(sums, cell_idx[face], values[frame_idx[face]])
    mask = faces_per_cell > 0
    features[mask] = (sums[mask] / faces_per_cell[mask, None]).astype(np.float32)
    features[:, 0] = np.divide(
        faces_per_cell, frames_per_cell, out=np.zeros(length), where=frames_per_cell > 0
    )
    features[~mask, 0] = 0.0
    return features, mask


def warmup_visual(min_confidence: float = 0.5) -> None:
    """Import mediapipe and run one graph on a blank frame (loads its bundled models)."""
    frame_features([np.zeros((64, 64, 3), dtype=np.uint8)], min_confidence)
