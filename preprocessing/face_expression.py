"""Facial-expression features: a FER2013-framed face crop and a small CNN encoder over it.

The crop is cut from the face-mesh landmarks the visual stage already computes (one mesh pass per
frame gives the 17 landmark features and the crop). It is a square, rotated upright by the eye
line, centred and sized relative to the extent of the 468 landmarks, resampled to 48x48 grey.
The framing constants (:data:`CROP_PARAMS`) were fitted so that the crop of a FER2013 image
reproduces that image's own framing (``preprocessing.face_training.fit_crop_params``). The same
:func:`face_crop` makes the training crops of FER2013 images and the crops of served frames.

The per-frame visual feature (:data:`FACE_EMBED_DIM` values) is laid out as
``[face_present, 7 centred class logits (CLASSES order), 56-d embedding]``; see docs/FEATURES.md.

torch is imported inside the functions and classes that need it, so importing this module for
its constants and the crop stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

CROP_SIZE = 48  # FER2013's image side
CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
POSITIVE_CLASSES: tuple[str, ...] = ("happy",)
NEGATIVE_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "sad")
EMBEDDING_DIM = 56  # the CNN's penultimate layer
FACE_EMBED_DIM = 1 + len(CLASSES) + EMBEDDING_DIM  # 64: face_present, 7 logits, embedding
CROP_VERSION = "fer-crop-v1"

# Face-mesh landmark indices used for the crop's orientation ("right"/"left" are the subject's).
_RIGHT_EYE_OUTER, _LEFT_EYE_OUTER = 33, 263
_EYE_CORNERS = (33, 133, 263, 362)


@dataclass(frozen=True)
class CropParams:
    """Framing of the crop relative to the landmarks, in units of the landmark extent.

    ``size`` is the square's side; ``dx``, ``dy`` move its centre from the centre of the
    landmarks' bounding box (in the upright face frame: x along the eye line, y down).
    """

    size: float
    dx: float
    dy: float
    version: str = CROP_VERSION


# Fitted on FER2013 Training images where face mesh finds a face (medians; see
# docs/FEATURES.md "Visual feature choice (measured)").
CROP_PARAMS = CropParams(size=1.195, dx=-0.002, dy=-0.059)


def _frame_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of the upright face frame in image pixels: u along the eye line (the
    subject's right eye to left eye, i.e. image left to right for an upright face), v = u
    turned 90 degrees (image down for an upright face)."""
    line = points[_LEFT_EYE_OUTER] - points[_RIGHT_EYE_OUTER]
    norm = float(np.hypot(line[0], line[1]))
    u = np.array([1.0, 0.0]) if norm < 1e-9 else line / norm
    v = np.array([-u[1], u[0]])
    return u, v


def crop_box(
    landmarks: np.ndarray, width: int, height: int, params: CropParams = CROP_PARAMS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Geometry of the crop in image pixels: (centre (2,), u (2,), v (2,), side).

    ``landmarks`` (468, 2+) as mediapipe returns them (x, y normalised to the image).
    """
    pts = np.asarray(landmarks, dtype=np.float64)[:, :2] * np.array([width, height])
    u, v = _frame_axes(pts)
    rel = pts - pts[list(_EYE_CORNERS)].mean(axis=0)
    pu, pv = rel @ u, rel @ v
    lo_u, hi_u, lo_v, hi_v = pu.min(), pu.max(), pv.min(), pv.max()
    extent = float(np.sqrt(max(hi_u - lo_u, 1e-6) * max(hi_v - lo_v, 1e-6)))
    origin = pts[list(_EYE_CORNERS)].mean(axis=0)
    box_centre = origin + 0.5 * (lo_u + hi_u) * u + 0.5 * (lo_v + hi_v) * v
    centre = box_centre + params.dx * extent * u + params.dy * extent * v
    return centre, u, v, params.size * extent


def to_grey(image: np.ndarray) -> np.ndarray:
    """uint8 grey (H, W) of an RGB (H, W, 3) or grey (H, W) image."""
    import cv2

    img = np.asarray(image)
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(img, dtype=np.uint8)


def face_crop(
    image: np.ndarray,
    landmarks: np.ndarray,
    params: CropParams = CROP_PARAMS,
    out_size: int = CROP_SIZE,
) -> np.ndarray:
    """The (out_size, out_size) uint8 grey crop of the face with these landmarks.

    ``image``: RGB (H, W, 3) or grey (H, W) uint8, the frame the landmarks were found in;
    ``landmarks``: (468, 2+) normalised as mediapipe returns them. Outside the image the border
    pixels are repeated. Large faces are sampled at up to 4x the output size and then area-
    averaged down, so the crop is not aliased.
    """
    import cv2

    grey = to_grey(image)
    h, w = grey.shape
    centre, u, v, side = crop_box(landmarks, w, h, params)
    over = int(np.clip(np.floor(side / out_size), 1, 4))
    n = out_size * over
    step = side / n
    # Output pixel (j, i) (column, row) samples the source at
    # centre + ((j + 0.5) * step - side / 2) u + ((i + 0.5) * step - side / 2) v,
    # in continuous coordinates (pixel k covers [k, k + 1)); cv2 indexes pixel centres at k.
    origin = centre - 0.5 * side * (u + v) + 0.5 * step * (u + v) - 0.5
    matrix = np.array(
        [[step * u[0], step * v[0], origin[0]], [step * u[1], step * v[1], origin[1]]],
        dtype=np.float64,
    )
    warped = cv2.warpAffine(
        grey,
        matrix,
        (n, n),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if over > 1:
        warped = cv2.resize(warped, (out_size, out_size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(warped, dtype=np.uint8)


def fer_canvas(image: np.ndarray, inner: int = 128, total: int = 192) -> np.ndarray:
    """A 48x48 FER image upscaled to ``inner`` px and padded (border repeated) to ``total`` px:
    face mesh finds faces in that, not in the tight 48 px original. Returns uint8 grey."""
    import cv2

    grey = to_grey(image)
    up = cv2.resize(grey, (inner, inner), interpolation=cv2.INTER_CUBIC)
    pad = (total - inner) // 2
    return cv2.copyMakeBorder(
        up, pad, total - inner - pad, pad, total - inner - pad, cv2.BORDER_REPLICATE
    )


# -- the encoder -------------------------------------------------------------------------------


def build_network(embedding_dim: int = EMBEDDING_DIM, classes: int = len(CLASSES)) -> Any:
    """A fresh :class:`FaceExpressionNet` (torch imported here)."""
    return _net_class()(embedding_dim, classes)


_NET_CLASS: Any = None


def _net_class() -> Any:
    """The nn.Module class, defined on first use so this module imports without torch."""
    global _NET_CLASS
    if _NET_CLASS is not None:
        return _NET_CLASS
    import torch  # noqa: F401  (annotations below)
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class FaceExpressionNet(nn.Module):
        """48x48 grey crop -> embedding and 7 class logits (~14 M multiply-adds per crop).

        Input: float (N, 1, 48, 48), pixel values / 255. The crop is standardised per image
        (mean 0, std 1) inside the network, so brightness and contrast shifts matter less.
        """

        def __init__(self, embedding_dim: int, classes: int) -> None:
            super().__init__()
            self.features = nn.Sequential(
                block(1, 16),
                nn.MaxPool2d(2),  # 24
                block(16, 32),
                nn.MaxPool2d(2),  # 12
                block(32, 64),
                block(64, 64),
                nn.MaxPool2d(2),  # 6
                block(64, 128),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.embed = nn.Sequential(
                nn.Dropout(0.3),
                nn.Linear(128, embedding_dim, bias=False),
                nn.BatchNorm1d(embedding_dim),
                nn.ReLU(inplace=True),
            )
            self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(embedding_dim, classes))

        def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            emb = self.embed(self.features((x - mean) / std))
            return emb, self.head(emb)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_both(x)[1]

    _NET_CLASS = FaceExpressionNet
    return _NET_CLASS


def save_encoder(net: Any, path: Path | str, extra: dict[str, Any] | None = None) -> str:
    """Write the network's weights as float16 safetensors with a JSON metadata header (classes,
    embedding size, crop parameters). Returns the file's sha256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").half().contiguous() for k, v in net.state_dict().items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
    meta = {
        "classes": list(CLASSES),
        "embedding_dim": int(net.head[1].in_features),
        "face_embed_dim": FACE_EMBED_DIM,
        "crop": asdict(CROP_PARAMS),
        "crop_size": CROP_SIZE,
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"face_encoder": json.dumps(meta, sort_keys=True)})
    return sha256_of(path)


def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FaceEncoderError(RuntimeError):
    """The face encoder file is missing, differs from its pinned sha256, or does not fit."""


class FaceExpressionEncoder:
    """The trained CNN over face crops, for serving.

    ``load()`` reads the safetensors file (checking ``sha256`` when given) once; it is safe to
    call from several threads. :meth:`frame_feature` and :meth:`encode_crops` only read the
    network (torch inference mode), so one instance serves a pool of threads. ``torch_threads``,
    when given, is applied with ``torch.set_num_threads`` at load (process-wide).
    """

    def __init__(
        self,
        weights_path: Path | str,
        sha256: str | None = None,
        torch_threads: int | None = 1,
    ) -> None:
        self.weights_path = Path(weights_path)
        self.sha256 = sha256
        self.torch_threads = torch_threads
        self.metadata: dict[str, Any] = {}
        self._net: Any = None
        self._lock = threading.Lock()

    def load(self) -> FaceExpressionEncoder:
        with self._lock:
            if self._net is not None:
                return self
            import torch
            from safetensors import safe_open

            if not self.weights_path.is_file():
                raise FaceEncoderError(f"face encoder weights not found: {self.weights_path}")
            if self.sha256 is not None:
                actual = sha256_of(self.weights_path)
                if actual != self.sha256:
                    raise FaceEncoderError(
                        f"{self.weights_path} has sha256 {actual}, expected {self.sha256}"
                    )
            with safe_open(str(self.weights_path), framework="pt") as handle:
                raw_meta = (handle.metadata() or {}).get("face_encoder")
                state = {k: handle.get_tensor(k).float() for k in handle.keys()}  # noqa: SIM118
            if raw_meta is None:
                raise FaceEncoderError(f"{self.weights_path} has no face_encoder metadata")
            meta = json.loads(raw_meta)
            if tuple(meta.get("classes", ())) != CLASSES:
                raise FaceEncoderError(f"unexpected classes {meta.get('classes')}")
            if meta.get("crop", {}).get("version") != CROP_PARAMS.version:
                raise FaceEncoderError(
                    f"crop version {meta.get('crop')} differs from {CROP_PARAMS.version}"
                )
            if int(meta["embedding_dim"]) + 1 + len(CLASSES) != FACE_EMBED_DIM:
                raise FaceEncoderError(f"embedding_dim {meta['embedding_dim']} does not fit")
            if self.torch_threads is not None:
                torch.set_num_threads(self.torch_threads)
            net = build_network(int(meta["embedding_dim"]))
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if not m.endswith("num_batches_tracked")]:
                raise FaceEncoderError(f"weights do not fit: {missing} {unexpected}")
            net.eval()
            self.metadata = meta
            self._net = net
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_net"] = None  # each process loads its own copy
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._net is not None

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """(N, FACE_EMBED_DIM) float32 features of (N, 48, 48) uint8 crops (all with a face)."""
        import torch

        if self._net is None:
            self.load()
        batch = np.asarray(crops, dtype=np.uint8).reshape(-1, 1, CROP_SIZE, CROP_SIZE)
        out = np.zeros((len(batch), FACE_EMBED_DIM), np.float32)
        if len(batch) == 0:
            return out
        with torch.inference_mode():
            emb, logits = self._net.forward_both(torch.from_numpy(batch).float() / 255.0)
        logits = logits - logits.mean(dim=1, keepdim=True)
        out[:, 0] = 1.0
        out[:, 1 : 1 + len(CLASSES)] = logits.numpy()
        out[:, 1 + len(CLASSES) :] = emb.numpy()
        return out

    def frame_feature(self, face: Any) -> np.ndarray | None:
        """(FACE_EMBED_DIM,) float32 feature of one frame, or None when it has no face.

        ``face``: what ``FaceMeshRunner.observe(rgb, crop=True)`` gave for the frame (a
        ``FaceObservation``, or None without a face), or its (48, 48) uint8 crop.
        """
        if face is None:
            return None
        crop = face.crop if hasattr(face, "crop") else face
        if crop is None:
            raise ValueError("the observation has no crop: call observe(rgb, crop=True)")
        return self.encode_crops(np.asarray(crop)[None])[0]

    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """(N, 7) class probabilities of crops (CLASSES order)."""
        logits = self.encode_crops(crops)[:, 1 : 1 + len(CLASSES)]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def warmup(self) -> None:
        self.load()
        self.encode_crops(np.full((1, CROP_SIZE, CROP_SIZE), 128, np.uint8))


def valence(probabilities: np.ndarray) -> np.ndarray:
    """P(positive) - P(negative) from (N, 7) class probabilities: a score in [-1, 1]."""
    p = np.asarray(probabilities)
    pos = p[:, [CLASSES.index(c) for c in POSITIVE_CLASSES]].sum(axis=1)
    neg = p[:, [CLASSES.index(c) for c in NEGATIVE_CLASSES]].sum(axis=1)
    return (pos - neg).astype(np.float32)
