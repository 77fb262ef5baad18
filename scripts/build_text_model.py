"""Build the text-only checkpoint (``model/checkpoints/text-only``) from the human-rated snippets.

It was the embedded default before the multimodal checkpoint; ``scripts/build_default_model.py``
reuses its steps 0 and 1 (text encoder, sentence features) and warm-starts from its weights.

Steps, each resumable (rerunning skips what is done):

0. text encoder: the top two layers of MiniLM-L6 fine-tuned on the train split's sentences
   (``preprocessing.text_tuning``; the valid split picks the epoch), saved as
   ``<work>/text_encoder.safetensors``.
1. features: every sentence of ``../shared/data/sentiment-snippets`` through the service's text
   path with those layers (token embeddings placed at the nominal speaking rate on the 10 Hz
   grid, profile tuned-text-v1), ratings rescaled from [-4, 4] to [-3, 3], the fixed split of
   ``model.training.rated_texts``; cached as ``<work>/snippets-tuned-text-v1.npz``.
2. train: ``cmamba train`` on that cache with the recipe below (run folder ``<work>/run``); the
   checkpoint ships the text encoder layers.
3. report: test-split metrics per source beside VADER's on the same sentences; the model card,
   ``config.json`` metrics, the copy to ``model/checkpoints/default`` and both sha256 pinned in
   ``model/checkpoints/__init__.py``.

Usage::

    python scripts/build_text_model.py [--data DIR] [--work DIR] [--out DIR] [--workers N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.training.data import FeatureDataset, Sample, load_feature_cache, save_feature_cache  # noqa: E402
from model.training.rated_texts import (  # noqa: E402
    SNIPPET_FILES,
    SNIPPET_SCALE,
    RatedText,
    read_snippet_folder,
    rescale,
    split_of,
)

LABEL_SCALE = (-3.0, 3.0)
PROFILE = "tuned-text-v1"  # model.checkpoint.TEXT_ENCODER_PROFILE
CHUNK = 1000
NAME = "coupled-mamba-snippets-text"
VERSION = "1"

# The recipe of the default checkpoint (see docs/TRAINING.md for how it was chosen).
MODEL_ARGS = [
    "--modalities", "text",
    "--d-model", "128",
    "--d-state", "16",
    "--layers", "2",
    "--dropout", "0.2",
    "--pooling", "mean",
]  # fmt: skip
TRAIN_ARGS = [
    "--epochs", "6",
    "--batch-size", "32",
    "--lr", "1e-3",
    "--lr-schedule", "cosine",
    "--warmup-steps", "200",
    "--weight-decay", "5e-4",
    "--loss", "mse",
    "--class-loss-weight", "0.2",
    "--group-weighting", "std",
    "--select", "group_corr",
    "--seed", "1111",
    "--quiet",
]  # fmt: skip


def log(message: str) -> None:
    print(f"[default-model] {message}", flush=True)


# --------------------------------------------------------------------------- step 0: text encoder

TUNING_FILE = "text_encoder.safetensors"


def tune_text(data_dir: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Step 0: fine-tune MiniLM's top layers on the train split (valid picks the epoch)."""
    from preprocessing.models import TEXT_MODEL_SHA256
    from preprocessing.text_tuning import (
        TextTuningConfig,
        TuningExample,
        save_text_tuning,
        tune_text_encoder,
    )

    target = work / TUNING_FILE
    info_file = work / "text_tuning.json"
    recipe = TextTuningConfig(threads=2)
    files = {n: hashlib.sha256((data_dir / n).read_bytes()).hexdigest() for n in SNIPPET_FILES}
    stamp = {"base_sha256": TEXT_MODEL_SHA256, "files": files, "recipe": repr(recipe)}
    if target.exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("stamp") == stamp:
            log(f"text encoder: reusing {target}")
            return target, info
    splits: dict[str, list[TuningExample]] = {"train": [], "valid": [], "test": []}
    for item in read_snippet_folder(data_dir):
        label = rescale(item.rating, SNIPPET_SCALE, LABEL_SCALE)
        splits[split_of(item.source, item.id)].append(TuningExample(item.text, label, item.source))
    result = tune_text_encoder(splits["train"], splits["valid"], config=recipe, log=log)
    digest = save_text_tuning(result.state, target)
    info = {"stamp": stamp, "sha256": digest, **result.summary()}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    log(f"text encoder: layers {result.tuned_layers} -> {target}, sha256 {digest}")
    return target, info


# --------------------------------------------------------------------------- step 1: features


def _fingerprint(data_dir: Path, tuning_sha256: str) -> dict[str, Any]:
    from preprocessing.models import TEXT_MODEL_SHA256
    from preprocessing.profiles import DEFAULT_RATE_HZ
    from preprocessing.settings import NOMINAL_WORDS_PER_S

    files = {
        name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in SNIPPET_FILES
    }
    return {
        "profile": PROFILE,
        "text_tuning_sha256": tuning_sha256,
        "rate_hz": DEFAULT_RATE_HZ,
        "words_per_s": NOMINAL_WORDS_PER_S,
        "text_model_sha256": TEXT_MODEL_SHA256,
        "files": files,
        "label_scale": list(LABEL_SCALE),
    }


def _chunk_dataset(items: list[RatedText], encoded: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    samples = [
        Sample.from_dense(
            item.id,
            rescale(item.rating, SNIPPET_SCALE, LABEL_SCALE),
            {"text": feats},
            {"text": mask},
            group=item.source,
        )
        for item, (feats, mask) in zip(items, encoded, strict=True)
    ]
    return FeatureDataset({"all": samples}, ("text",), {"text": 384}, LABEL_SCALE, "rated")


def build_features(data_dir: Path, work: Path, tuning: Path, tuning_sha256: str) -> Path:
    """Step 1: encode every snippet once (resumable by chunks of 1000 sentences)."""
    from tqdm.auto import tqdm

    from preprocessing.dataset import encode_texts_on_grid
    from preprocessing.text import TextEncoder

    target = work / f"snippets-{PROFILE}.npz"
    chunks = work / "chunks"
    stamp = _fingerprint(data_dir, tuning_sha256)
    stamp_file = work / "features.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) != stamp:
        log("inputs changed since the last build: re-encoding")
        shutil.rmtree(chunks, ignore_errors=True)
        target.unlink(missing_ok=True)
    if target.exists():
        log(f"features: reusing {target}")
        return target
    chunks.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp, indent=2))

    items = read_snippet_folder(data_dir)
    encoder = TextEncoder(
        torch_threads=2, batch_size=64, tuning=tuning, tuning_sha256=tuning_sha256
    )
    parts: list[Path] = []
    with tqdm(total=len(items), desc="encode", unit="sent", dynamic_ncols=True) as bar:
        for start in range(0, len(items), CHUNK):
            part = chunks / f"{start // CHUNK:03d}.npz"
            parts.append(part)
            batch = items[start : start + CHUNK]
            if not part.exists():
                encoded = encode_texts_on_grid([i.text for i in batch], encoder)
                save_feature_cache(_chunk_dataset(batch, encoded), part)
            bar.update(len(batch))

    splits: dict[str, list[Sample]] = {"train": [], "valid": [], "test": []}
    for part in parts:
        for sample in load_feature_cache(part).splits["all"]:
            splits[split_of(sample.group, sample.id)].append(sample)
    description = {
        "name": "sentiment-snippets (Hutto & Gilbert, ICWSM 2014)",
        "feature_profile": PROFILE,
        "text_path": "preprocessing.text: TextEncoder with the tuned layers + "
        "align_text(words at 2.5/s, 10 Hz grid)",
        "labels": "mean human rating rescaled linearly from [-4, 4] to [-3, 3]",
        "split": "sha256('<source>:<group>') % 100: <80 train, <90 valid, else test "
        "(group = NYT article, else sentence id)",
        "sources": sorted(set(SNIPPET_FILES.values())),
        "fingerprint": stamp,
    }
    dataset = FeatureDataset(splits, ("text",), {"text": 384}, LABEL_SCALE, "rated", description)
    save_feature_cache(dataset, target)
    sizes = {k: len(v) for k, v in splits.items()}
    log(f"features: {sizes} -> {target} ({target.stat().st_size / 1e6:.0f} MB)")
    return target


# --------------------------------------------------------------------------- step 2: train


def train(cache: Path, work: Path, tuning: Path, extra: list[str]) -> Path:
    """Step 2: ``cmamba train`` with the fixed recipe; resumes an interrupted run."""
    from service.cli import build_parser
    from service.commands import train as train_command

    out = work / "checkpoint"
    args = [
        "train",
        str(cache),
        "--out", str(out),
        "--run-dir", str(work / "run"),
        "--name", NAME,
        "--version", VERSION,
        "--profile", PROFILE,
        "--text-encoder", str(tuning),
        *MODEL_ARGS,
        *TRAIN_ARGS,
        *extra,
    ]  # fmt: skip
    log("cmamba " + " ".join(args))
    parsed = build_parser("train").parse_args(args)
    code = train_command.run(parsed)
    if code != 0:
        raise SystemExit(code)
    return out


# --------------------------------------------------------------------------- step 3: report


def report(
    cache: Path, checkpoint: Path, data_dir: Path, out: Path, tuning: dict[str, Any]
) -> None:
    """Step 3: per-source test metrics beside VADER's, model card, copy, pinned sha256."""
    import torch

    from model import load_checkpoint
    from model.checkpoint import CONFIG_FILE, TEXT_ENCODER_FILE, WEIGHTS_FILE, sha256_file
    from model.training.baselines import vader_compound
    from model.training.metrics import rated_text_metrics
    from model.training.trainer import predict_scores

    torch.set_num_threads(1)
    dataset = load_feature_cache(cache)
    test = dataset.splits["test"]
    model = load_checkpoint(checkpoint)
    scores = predict_scores(model, test, batch_size=64)
    texts = {(i.source, i.id): i.text for i in read_snippet_folder(data_dir)}
    vader = np.array(vader_compound([texts[(s.group, s.id)] for s in test])) * 3.0
    labels = np.array([s.label for s in test])
    groups = np.array([s.group for s in test])

    rows = []
    for source in [*sorted(set(groups)), "all"]:
        pick = np.ones(len(test), bool) if source == "all" else groups == source
        ours = rated_text_metrics(scores[pick], labels[pick])
        base = rated_text_metrics(vader[pick], labels[pick])
        rows.append((source, ours, base))

    config_path = checkpoint / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["metrics"]["test_by_source"] = {s: o for s, o, _ in rows}
    config["metrics"]["vader_test_by_source"] = {s: b for s, _, b in rows}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    card = model_card(config, rows, tuning)
    (checkpoint / "MODEL_CARD.md").write_text(card)
    print(card)

    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, "MODEL_CARD.md", TEXT_ENCODER_FILE):
        shutil.copy2(checkpoint / name, out / name)
    digest = sha256_file(out / WEIGHTS_FILE)
    encoder_digest = sha256_file(out / TEXT_ENCODER_FILE)
    pin_hashes(
        {"TEXT_ONLY_CHECKPOINT_SHA256": digest, "TEXT_ONLY_TEXT_ENCODER_SHA256": encoder_digest}
    )
    log(f"checkpoint: {out} ({(out / WEIGHTS_FILE).stat().st_size / 1e6:.1f} MB), sha256 {digest}")


def pin_hashes(values: dict[str, str]) -> None:
    """Rewrite ``NAME = "<hex>"`` lines of model/checkpoints/__init__.py."""
    init = ROOT / "model" / "checkpoints" / "__init__.py"
    text = init.read_text()
    pinned = text
    for name, digest in values.items():
        pinned = re.sub(rf'^{name} = "[0-9a-f]*"', f'{name} = "{digest}"', pinned, flags=re.M)
    if pinned != text:
        init.write_text(pinned)


def model_card(
    config: dict[str, Any], rows: list[tuple[str, dict, dict]], tuning: dict[str, Any]
) -> str:
    """The default checkpoint's MODEL_CARD.md."""
    training = config["training"]
    sizes = training["data"]["sizes"]
    table = [
        "| source | n | Pearson r | VADER r | MAE | VADER MAE* | Acc-2 | VADER Acc-2 | F1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for source, ours, base in rows:
        table.append(
            f"| {source} | {int(ours['N'])} | {ours['Pearson_r']:.3f} | {base['Pearson_r']:.3f} "
            f"| {ours['MAE']:.3f} | {base['MAE']:.3f} | {ours['Acc_2']:.3f} "
            f"| {base['Acc_2']:.3f} | {ours['F1_score']:.3f} |"
        )
    arch = (
        f"d_model {config['d_model']}, d_state {config['d_state']}, {config['n_layers']} layers, "
        f"expand {config['expand']}, {config['pooling']} pooling, "
        f"{config['checkpoint']['parameters']:,} parameters"
    )
    settings = training["settings"]
    return f"""# {config["checkpoint"]["name"]} (version {config["checkpoint"]["version"]})

The text-only checkpoint (`model/checkpoints/text-only`; the default before the multimodal
one). A Coupled Mamba network (arXiv 2405.18014) with a
**text branch only**, trained on real human ratings of English sentences.

## What it was trained on

- Data: the three human-rated snippet sets of the VADER study (Hutto & Gilbert, ICWSM 2014):
  movie-review sentences, NYT editorial sentences, tweet-like texts. Each rating is the mean of
  at least 20 raters on [-4, 4], rescaled linearly to this model's scale [-3, 3].
- Split: fixed, by hash (`sha256("<source>:<group>") % 100`: < 80 train, < 90 valid, else
  test; the sentences of one NYT editorial share a split). Sizes: train {sizes["train"]},
  valid {sizes["valid"]}, test {sizes["test"]}.
- Text encoder: all-MiniLM-L6-v2 whose top {len(tuning["tuned_layers"])} layers
  ({", ".join(str(n) for n in tuning["tuned_layers"])}) were fine-tuned on the train split with
  a throw-away regression head (mean of the word-piece embeddings -> linear; AdamW lr
  {tuning["recipe"]["lr"]}, {tuning["recipe"]["epochs"]} epochs, squared error weighted per
  source; the epoch with the best mean per-source validation r, epoch {tuning["best_epoch"] + 1}).
  Only those layers ship, as `text_encoder.safetensors` (float16, sha256 in `config.json` and
  pinned in the package); the service applies them over the bundled base model. Validation r
  of the head per epoch: {"; ".join(_history_line(h) for h in tuning["history"])}.
- Features: the service's own text path for a typed transcript with that encoder (profile
  `tuned-text-v1`): token embeddings, words placed at 2.5 words/s on the 10 Hz grid. Features
  made with the plain encoder (`default-v1`) do not fit this checkpoint.
- Recipe: `cmamba train`, Adam lr {settings["lr"]} ({settings["lr_schedule"]} schedule,
  {settings["warmup_steps"]} warm-up steps), weight decay {settings["weight_decay"]},
  {settings["loss"]} loss weighted per source by label spread ({settings["group_weighting"]})
  + {settings["class_loss_weight"]} x cross-entropy on the 3-class head, batch
  {settings["batch_size"]}; the best of {settings["epochs"]} epochs on the mean of the
  per-source validation Pearson r (epoch {training["best_epoch"]}); seed {settings["seed"]}.
  Architecture: {arch}.
- Rebuild: `python scripts/build_text_model.py` (about an hour on 2 CPU cores).

## Modalities

- `modalities: ["text"]`. Only text carries learned signal; audio and visual carry none.
  The network has no audio or visual branch: audio and visual features sent to the service
  are ignored by this checkpoint, and a clip without speech (or a transcript) gives it no
  input to score.
- Full multimodal accuracy needs training on a multimodal corpus such as CMU-MOSEI or CH-SIMS
  with these same tools (`cmamba extract`, `cmamba train`, `cmamba evaluate`; see
  docs/TRAINING.md).

## Held-out test results (never seen in training or model selection)

{chr(10).join(table)}

VADER: `vaderSentiment` 3.3.2 compound score on the same test sentences (*its MAE after
multiplying the compound score by 3, a rough mapping; Pearson r does not depend on the scale).
Acc-2 and F1 are over sentences with a non-zero rating (sign agreement).

## Limitations

- English sentences of the three domains above; long texts are read at the nominal speaking
  rate, so a long monologue becomes a long sequence.
- The ratings are crowd means of short written texts; spoken sentiment, irony and
  speaker-specific cues are not modelled.
- Scores describe the sentiment of the words, not a judgement of a person.
"""


def _history_line(entry: dict[str, Any]) -> str:
    values = ", ".join(f"{k} {v:.3f}" for k, v in sorted(entry["valid_r"].items()))
    return f"epoch {entry['epoch'] + 1}: {values}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "sentiment-snippets"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "text-model")
    parser.add_argument("--out", type=Path, default=ROOT / "model" / "checkpoints" / "text-only")
    parser.add_argument(
        "--step", choices=("all", "text", "features", "train", "report"), default="all"
    )
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="extra `cmamba train` args")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"snippet folder {args.data} not found (pass --data)")
    start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    tuning, tuning_info = tune_text(args.data, args.work)
    if args.step == "text":
        return 0
    cache = build_features(args.data, args.work, tuning, tuning_info["sha256"])
    if args.step == "features":
        return 0
    checkpoint = args.work / "checkpoint"
    if args.step in ("all", "train"):
        extra = [a for a in args.train_args if a != "--"]
        checkpoint = train(cache, args.work, tuning, extra)
    if args.step in ("all", "report"):
        report(cache, checkpoint, args.data, args.out, tuning_info)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
