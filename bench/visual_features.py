"""Visual feature choice: the 17 face-mesh features against the FER2013-trained face CNN.

    nice .venv/bin/python bench/visual_features.py [--data DIR] [--weights FILE] [--write-docs]

Both candidates are judged as FER2013 expression readers on the same held-out faces:

- **mesh-17**: the 17 landmark features (``preprocessing.visual``; face_present and face_size
  left out, they say nothing of the expression) of FER images where face mesh finds a face,
  standardised, multinomial logistic regression fitted on FER Training;
- **cnn**: the trained face encoder (``build/face_encoder/face_encoder.safetensors``), its own
  class head, as served (one crop, no flip averaging).

Scores: AUC of P(happy) separating happy from negative (angry, disgust, fear, sad) faces, and
7-class accuracy, on PublicTest (``validation/``, used to pick the CNN's epoch) and PrivateTest
(``test/``, held out), on the faces face mesh finds (both candidates) and, for the CNN, on all
faces (the FER image itself where face mesh finds none). Cost per frame on the shared CREMA-D
clip's frames (2 shared cores). The CREMA-D check: the same actor's happy and angry clips
(5 fps), each frame's P(happy) from both candidates; the AUC of happy-clip frames over
angry-clip frames, and the clip means.

With ``--write-docs`` the result replaces the section "Visual feature choice (measured)" of
docs/FEATURES.md (between its markers; added before "## Long clips" the first time).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from bench.doc_sections import DOCS, MEDIA, ROOT, data_dir, write_section
from preprocessing.face_expression import (
    CLASSES,
    FACE_EMBED_DIM,
    FaceExpressionEncoder,
    sha256_of,
)
from preprocessing.face_training import load_split, pos_neg_auc

DOC = DOCS / "FEATURES.md"
MESH_COLUMNS = list(range(1, 16))  # head pose + expression; not face_present, face_size
HAPPY = CLASSES.index("happy")
CLIPS = {
    "happy": "cremad_1001_DFA_HAP_XX.mp4",
    "angry": "cremad_1001_DFA_ANG_XX.mp4",
    "grid": "grid_bbaf2n.mp4",
}


def _timed(fn: Any, count: int) -> tuple[float, float]:
    """(wall ms, CPU ms of this process) per item of ``fn()`` doing ``count`` items."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (
        (time.perf_counter() - wall) * 1000 / count,
        (time.process_time() - cpu) * 1000 / count,
    )


def _fit_mesh(train: dict[str, np.ndarray]) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    found = train["found"]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(train["mesh_features"][found][:, MESH_COLUMNS], train["labels"][found])
    return model


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "auc": pos_neg_auc(probs[:, HAPPY], labels),
        "acc": float((probs.argmax(axis=1) == labels).mean()),
    }


def _clip_frames(path: Path) -> tuple[list[np.ndarray], float]:
    from preprocessing import ExtractorSettings
    from preprocessing.media import decode_media

    decoded = decode_media(path, ExtractorSettings(), audio=False, video=True)
    return decoded.frames, decoded.duration_s


def _clip_observations(
    frames: list[np.ndarray],
) -> tuple[list[Any], tuple[float, float], tuple[float, float]]:
    """Mesh observations of a clip's frames (video mode), with mesh ms/frame and the extra
    ms/frame of the crop."""
    from preprocessing.visual import FaceMeshRunner

    with FaceMeshRunner() as runner:
        mesh_ms = _timed(lambda: [runner.landmarks(frame) for frame in frames], len(frames))
    with FaceMeshRunner() as runner:
        seen = [runner.observe(frame, crop=False) for frame in frames]
    from preprocessing.face_expression import face_crop

    pairs = [(f, o) for f, o in zip(frames, seen, strict=True) if o is not None]
    crop_ms = _timed(lambda: [face_crop(f, o.landmarks) for f, o in pairs], max(1, len(pairs)))
    with FaceMeshRunner() as runner:
        seen = [runner.observe(frame, crop=True) for frame in frames]
    return seen, mesh_ms, crop_ms


def run(data_dir: Path, weights: Path, media: Path) -> tuple[str, dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    splits = {s: load_split(data_dir, s) for s in ("train", "validation", "test")}
    mesh_model = _fit_mesh(splits["train"])
    encoder = FaceExpressionEncoder(weights, torch_threads=1).load()
    results: dict[str, Any] = {"detection": {}, "fer": {}}
    for split in ("train", "validation", "test"):
        results["detection"][split] = float(splits[split]["found"].mean())
    for split in ("validation", "test"):
        data = splits[split]
        found, labels = data["found"], data["labels"]
        mesh_probs = mesh_model.predict_proba(data["mesh_features"][found][:, MESH_COLUMNS])
        cnn_probs = encoder.probabilities(data["crops"])
        results["fer"][split] = {
            "mesh-17 (face found)": _scores(mesh_probs, labels[found]),
            "cnn (face found)": _scores(cnn_probs[found], labels[found]),
            "cnn (all faces)": _scores(cnn_probs, labels),
        }

    # Cost per frame and the CREMA-D check.
    clips: dict[str, Any] = {}
    for name, file in CLIPS.items():
        frames, _ = _clip_frames(media / file)
        seen, mesh_ms, crop_ms = _clip_observations(frames)
        crops = np.stack([s.crop for s in seen if s is not None])
        feats = np.stack([s.features for s in seen if s is not None])
        clips[name] = {
            "frames": len(frames),
            "found": sum(s is not None for s in seen),
            "mesh_ms": mesh_ms,
            "crop_ms": crop_ms,
            "crops": crops,
            "seen": seen,
            "shape": frames[0].shape[:2],
            "mesh_p_happy": mesh_model.predict_proba(feats[:, MESH_COLUMNS])[:, HAPPY],
            "cnn_p_happy": encoder.probabilities(crops)[:, HAPPY],
        }
    happy = clips["happy"]
    crops = happy["crops"]
    encoder.encode_crops(crops)
    reps = 20

    def singles() -> None:
        for _ in range(reps):
            for crop in crops:
                encoder.frame_feature(crop)

    single_ms = _timed(singles, reps * len(crops))
    batch50 = np.resize(crops, (50, *crops.shape[1:]))
    batch_ms = _timed(lambda: [encoder.encode_crops(batch50) for _ in range(reps)], reps)
    from preprocessing.visual import face_features

    marks = [s.landmarks for s in happy["seen"] if s is not None]
    h, w = happy["shape"]
    features_ms = _timed(
        lambda: [face_features(m, w, h) for _ in range(reps) for m in marks], reps * len(marks)
    )

    def mean_of(key: str) -> tuple[float, float]:
        return (
            float(np.mean([clips[c][key][0] for c in clips])),
            float(np.mean([clips[c][key][1] for c in clips])),
        )

    mesh_ms, crop_ms = mean_of("mesh_ms"), mean_of("crop_ms")
    results["cost"] = {
        "mesh_ms": mesh_ms,
        "features_ms": features_ms,
        "crop_ms": crop_ms,
        "cnn_single_ms": single_ms,
        "cnn_batch50_ms": batch_ms,
        "clip_10s_5fps_ms": tuple(50 * c + b for c, b in zip(crop_ms, batch_ms, strict=True)),
    }
    results["cremad"] = {
        cand: {
            "auc": pos_neg_auc(
                np.concatenate([clips["happy"][key], clips["angry"][key]]),
                np.concatenate(
                    [
                        np.full(len(clips["happy"][key]), HAPPY),
                        np.full(len(clips["angry"][key]), CLASSES.index("angry")),
                    ]
                ),
            ),
            "happy_mean": float(np.mean(clips["happy"][key])),
            "angry_mean": float(np.mean(clips["angry"][key])),
        }
        for cand, key in (("mesh-17", "mesh_p_happy"), ("cnn", "cnn_p_happy"))
    }
    results["clips"] = {n: (c["found"], c["frames"]) for n, c in clips.items()}
    results["load"] = os.getloadavg()[0]
    results["weights"] = {"path": str(weights), "sha256": sha256_of(weights)}
    results["metadata"] = encoder.metadata
    return render(results), results


def render(r: dict[str, Any]) -> str:
    det = r["detection"]
    fer = r["fer"]
    cost = r["cost"]
    cre = r["cremad"]
    crop = r["metadata"].get("crop", {})
    lines = [
        "## Visual feature choice (measured)",
        "",
        "With `ExtractorSettings.face_encoder_path` set, the visual feature per frame is "
        f"{FACE_EMBED_DIM} values from a small CNN trained on FER2013 "
        "(`preprocessing/face_expression.py`, trained by `scripts/train_face_encoder.py`): "
        "`face_present` (1), the 7 class logits centred to mean 0 (angry, disgust, fear, happy, "
        "neutral, sad, surprise), then the 56-d embedding of the penultimate layer. The same "
        "face-mesh pass that gives the 17 landmark features gives the crop: a square rotated "
        "upright by the outer-eye-corner line, its side "
        f"{crop.get('size')} x the landmark extent (geometric mean of the width and height of "
        "the 468 landmarks in the upright frame), its centre moved "
        f"{crop.get('dy')} x the extent along the face's vertical axis from the landmarks' box "
        "centre, area-resampled to 48x48 grey. These two numbers are the medians over FER "
        "Training images where face mesh finds a face of the framing that reproduces each "
        "image (the image is upscaled to 128 px and padded to 192 px by repeating its border, "
        "and the FER square's side and centre are measured in the same units); FER2013's own "
        "framing varies by about 20 % in size (interquartile range), so a crop matches its "
        "FER original with a median pixel correlation of about 0.6. Training crops of FER "
        "images and crops of served frames come from the same `face_crop` function. FER images "
        "where face mesh finds no face are trained on as they are (they are already framed the "
        "way FER frames faces; dropping them would lose 12 % of the training faces, the harder "
        "ones); at serving, a frame without a face is masked.",
        "",
        "Written by `bench/visual_features.py` (FER2013 from the folders of Training, "
        "PublicTest, PrivateTest; "
        f"{platform.machine()}, 2 shared cores, torch 1 thread). Face mesh in static image mode "
        "on each FER image upscaled to 128 px and padded to 192 px found a face in "
        f"**{det['train']:.1%}** of Training, **{det['validation']:.1%}** of PublicTest and "
        f"**{det['test']:.1%}** of PrivateTest; in video mode in "
        + ", ".join(f"{f}/{n} frames of {name}" for name, (f, n) in r["clips"].items())
        + ".",
        "",
        "| candidate | PublicTest AUC happy vs neg | PublicTest 7-class acc "
        "| PrivateTest AUC happy vs neg | PrivateTest 7-class acc |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for cand in fer["validation"]:
        v, t = fer["validation"][cand], fer["test"][cand]
        lines.append(
            f"| {cand} | {v['auc']:.3f} | {v['acc']:.3f} | {t['auc']:.3f} | {t['acc']:.3f} |"
        )
    lines += [
        "",
        "mesh-17: standardised multinomial logistic regression on 15 of the 17 features "
        "(without face_present and face_size) fitted on Training faces with a face found. "
        "cnn: the trained encoder's own class head on one crop, as served. "
        '"all faces" scores the FER image itself where face mesh finds no face. '
        "Chance is 0.5 AUC and 0.25 accuracy (the majority class, happy).",
        "",
        "| cost per frame | wall ms | CPU ms |",
        "| --- | ---: | ---: |",
        "| face mesh (shared by both; video mode, shared clips) | {:.2f} | {:.2f} |".format(
            *cost["mesh_ms"]
        ),
        "| 17 features from the landmarks | {:.2f} | {:.2f} |".format(*cost["features_ms"]),
        "| crop (warp + area resample) | {:.2f} | {:.2f} |".format(*cost["crop_ms"]),
        "| CNN, one crop alone | {:.2f} | {:.2f} |".format(*cost["cnn_single_ms"]),
        "| CNN, 50 crops in one batch, per crop | {:.2f} | {:.2f} |".format(
            *(x / 50 for x in cost["cnn_batch50_ms"])
        ),
        "| **10 s clip at 5 fps: 50 crops + one CNN batch, on top of face mesh** "
        "| **{:.0f}** | **{:.0f}** |".format(*cost["clip_10s_5fps_ms"]),
        "",
        "Wall times were taken with the other cores' work running (load average "
        f"{r['load']:.1f} on 2 cores); CPU ms is this process's own CPU time.",
        "",
        "CREMA-D, actor 1001, the same sentence said happy and angry (5 fps, every frame "
        "with a face): P(happy) per frame.",
        "",
        "| candidate | AUC happy-clip frames over angry-clip frames | mean P(happy), happy clip "
        "| mean P(happy), angry clip |",
        "| --- | ---: | ---: | ---: |",
    ]
    for cand, c in cre.items():
        lines.append(f"| {cand} | {c['auc']:.3f} | {c['happy_mean']:.3f} | {c['angry_mean']:.3f} |")
    meta = r["metadata"]
    lines += [
        "",
        f"Weights: `{Path(r['weights']['path']).name}` sha256 `{r['weights']['sha256']}` "
        f"(epoch {meta.get('best_epoch')} picked on PublicTest, seed {meta.get('seed')}; "
        f"crop {meta.get('crop')}). The per-frame feature is {FACE_EMBED_DIM} values: "
        "face_present, the 7 centred class logits, the 56-d embedding.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_dir() / "fer2013")
    parser.add_argument(
        "--weights", type=Path, default=ROOT / "build" / "face_encoder" / "face_encoder.safetensors"
    )
    parser.add_argument("--media", type=Path, default=MEDIA)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        raise SystemExit(f"{args.weights} not found: run scripts/train_face_encoder.py")
    text, _ = run(args.data, args.weights, args.media)
    print(text)
    if args.write_docs:
        write_section(DOC, "visual-choice", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
