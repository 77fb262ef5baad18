"""Training a three-modality checkpoint from separately labelled corpora.

No public corpus this project can use labels sentiment on video with voice, face and words
together. The default checkpoint is therefore trained on three corpora, each labelling one
modality (docs/TRAINING.md): rated sentences (text), RAVDESS (voice, with the neutral sentence
the actor speaks), FER2013 (faces). Each epoch mixes:

* ``text``: rated sentences, text only;
* ``voice``: a RAVDESS clip, audio with or without its (neutral) words; never its words alone,
  since the words do not carry the clip's emotion;
* ``face``: a FER2013 face held for a random 1-4 s, visual only;
* ``paired``: a RAVDESS clip with a FER2013 face **of the same emotion and split** held for the
  whole clip, a random non-empty subset of the modalities kept (never the words alone). This is
  a training device, not data of one person: the model card says so.

Modality dropout (the random subsets) teaches the network to score any subset of modalities.
Every sample has a sentiment target (missing for surprise) and, for the emotion corpora, an
emotion target; losses are masked where a target is missing.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor

from model.config import MODALITY_ORDER, CoupledMambaConfig
from model.mamba import CoupledMambaForSentiment
from model.ops import NonFiniteInputError
from model.training.data import Batch, Sample, collate, length_bucketed_batches
from model.training.emotions import auc
from model.training.metrics import rated_text_metrics
from model.training.trainer import lr_factor

NO_EMOTION = -1


@dataclass
class EmotionMedia:
    """Features of one emotion-labelled RAVDESS clip or FER2013 face.

    ``sample`` holds the grid features (a clip: audio and text; a face: one visual row, see
    ``face_sample``); ``sentiment`` is NaN where there is no target (surprise).
    """

    id: str
    split: str
    emotion: str
    emotion_index: int
    sentiment: float
    polarity: int  # +1 positive, -1 negative, 0 neither (AUC targets)
    sample: Sample
    # The clip under drawn recording conditions (``preprocessing.voice_augment``): training
    # draws one of ``sample`` and these for each item; evaluation reads ``sample`` only, and
    # ``variants[0]`` for the shifted-condition check.
    variants: tuple[Sample, ...] = ()

    def draw(self, rng: random.Random) -> Sample:
        """The clean sample or one of its variants, at random (no draw without variants)."""
        return rng.choice((self.sample, *self.variants)) if self.variants else self.sample


@dataclass
class MixedSample:
    """A training or evaluation item: grid features plus its targets and kind."""

    sample: Sample
    sentiment: float  # NaN: no sentiment target
    emotion: int  # NO_EMOTION: no emotion target
    kind: str  # "text", "voice", "face", "paired"
    source: str  # rated-text source, "ravdess" or "fer2013"


def _empty(length: int, dim: int) -> tuple[NDArray[Any], NDArray[np.int32]]:
    return np.zeros((0, dim), np.float16), np.full(length, -1, np.int32)


def compose(
    parts: dict[str, Sample | None], keep: Sequence[str], dims: dict[str, int], length: int
) -> Sample:
    """One Sample of ``length`` steps with the modalities in ``keep`` taken from ``parts``
    (each a Sample holding that modality, cut or padded to ``length``) and the others empty."""
    rows: dict[str, NDArray[Any]] = {}
    index: dict[str, NDArray[np.int32]] = {}
    for m, dim in dims.items():
        part = parts.get(m)
        if m not in keep or part is None:
            rows[m], index[m] = _empty(length, dim)
            continue
        idx = np.full(length, -1, np.int32)
        n = min(length, part.length)
        idx[:n] = part.index[m][:n]
        rows[m], index[m] = part.rows[m], idx
    ids = "+".join(p.id for m, p in parts.items() if p is not None and m in keep)
    return Sample(ids, 0.0, length, rows, index)


def face_sample(id: str, embedding: NDArray[Any]) -> Sample:
    """A face as a one-step visual Sample (``Mixer`` holds it for as many steps as needed)."""
    row = np.asarray(embedding, np.float16)[None, :]
    return Sample(id, 0.0, 1, {"visual": row}, {"visual": np.zeros(1, np.int32)})


def with_audio(clip: Sample, features: NDArray[Any], mask: NDArray[np.bool_], id: str) -> Sample:
    """``clip`` with its audio replaced by ``features`` (L', F) and ``mask`` (L',), e.g. the
    same clip under another recording condition; its other modalities (the words) are
    stretched or squeezed in time to the new length ``L'``."""
    audio = Sample.from_dense(id, 0.0, {"audio": features}, {"audio": mask})
    length = audio.length
    source = np.minimum((np.arange(length) * clip.length) // max(length, 1), clip.length - 1)
    rows, index = dict(clip.rows), {m: idx[source] for m, idx in clip.index.items()}
    rows["audio"], index["audio"] = audio.rows["audio"], audio.index["audio"]
    return Sample(id, clip.label, length, rows, index, clip.group)


def _held_face(face: Sample, length: int) -> Sample:
    return Sample(face.id, 0.0, length, face.rows, {"visual": np.zeros(length, np.int32)})


def _subsets(with_text: bool) -> list[tuple[str, ...]]:
    # Every non-empty subset of audio/visual/text except the words alone (RAVDESS's words are
    # the same neutral sentences for every emotion).
    out: list[tuple[str, ...]] = [("audio",), ("visual",), ("audio", "visual")]
    if with_text:
        out += [("text", "audio"), ("text", "visual"), ("text", "audio", "visual")]
    return out


@dataclass
class MixRecipe:
    """How many items of each kind one epoch draws (``None``: every item once)."""

    text_per_epoch: int | None = 4000
    voice_repeats: int = 1
    faces_per_epoch: int | None = 3000
    paired_repeats: int = 1
    face_steps: tuple[int, int] = (10, 40)  # a lone face is held this many steps (10 Hz)


class Mixer:
    """Draws an epoch's items from the corpora of one split."""

    def __init__(
        self,
        texts: Sequence[Sample],
        voices: Sequence[EmotionMedia],
        faces: Sequence[EmotionMedia],
        dims: dict[str, int],
    ) -> None:
        self.texts = list(texts)
        self.voices = list(voices)
        self.faces = list(faces)
        self.dims = dims
        self._faces_by_emotion: dict[int, list[EmotionMedia]] = {}
        for face in self.faces:
            self._faces_by_emotion.setdefault(face.emotion_index, []).append(face)

    def text_items(self, samples: Sequence[Sample]) -> list[MixedSample]:
        return [
            MixedSample(
                compose({"text": s}, ("text",), self.dims, s.length),
                s.label,
                NO_EMOTION,
                "text",
                s.group,
            )
            for s in samples
        ]

    def voice_item(
        self, voice: EmotionMedia, keep: Sequence[str], sample: Sample | None = None
    ) -> MixedSample:
        s = voice.sample if sample is None else sample
        return MixedSample(
            compose({"audio": s, "text": s}, keep, self.dims, s.length),
            voice.sentiment,
            voice.emotion_index,
            "voice",
            "ravdess",
        )

    def face_item(self, face: EmotionMedia, steps: int) -> MixedSample:
        return MixedSample(
            compose({"visual": _held_face(face.sample, steps)}, ("visual",), self.dims, steps),
            face.sentiment,
            face.emotion_index,
            "face",
            "fer2013",
        )

    def partner(self, voice: EmotionMedia, rng: random.Random) -> EmotionMedia | None:
        """A face of the voice's emotion class (calm pairs with a neutral face)."""
        faces = self._faces_by_emotion.get(voice.emotion_index)
        return rng.choice(faces) if faces else None

    def paired_item(
        self,
        voice: EmotionMedia,
        face: EmotionMedia,
        keep: Sequence[str],
        sample: Sample | None = None,
    ) -> MixedSample:
        s = voice.sample if sample is None else sample
        parts: dict[str, Sample | None] = {
            "audio": s,
            "text": s,
            "visual": _held_face(face.sample, s.length),
        }
        return MixedSample(
            compose(parts, keep, self.dims, s.length),
            voice.sentiment,
            voice.emotion_index,
            "paired",
            "ravdess+fer2013",
        )

    def epoch(self, recipe: MixRecipe, rng: random.Random) -> list[MixedSample]:
        """A shuffled epoch of every kind, modality subsets drawn at random."""
        items: list[MixedSample] = []
        texts = self.texts
        if recipe.text_per_epoch is not None and recipe.text_per_epoch < len(texts):
            texts = rng.sample(texts, recipe.text_per_epoch)
        items += self.text_items(texts)
        with_text = [("audio",), ("text", "audio")]
        for _ in range(recipe.voice_repeats):
            items += [self.voice_item(v, rng.choice(with_text), v.draw(rng)) for v in self.voices]
        faces = self.faces
        if recipe.faces_per_epoch is not None and recipe.faces_per_epoch < len(faces):
            faces = rng.sample(faces, recipe.faces_per_epoch)
        items += [self.face_item(f, rng.randint(*recipe.face_steps)) for f in faces]
        subsets = _subsets(with_text=True)
        for _ in range(recipe.paired_repeats):
            for voice in self.voices:
                face = self.partner(voice, rng)
                if face is not None:
                    keep = rng.choice(subsets)
                    items.append(self.paired_item(voice, face, keep, voice.draw(rng)))
        rng.shuffle(items)
        return items


# --------------------------------------------------------------------------- evaluation


@dataclass
class Predictions:
    score: NDArray[np.float64]
    emotion: NDArray[np.int64] | None


@torch.no_grad()
def predict(
    model: CoupledMambaForSentiment, items: Sequence[MixedSample], batch_size: int = 64
) -> Predictions:
    """Scores and most probable emotions of ``items`` in their order (eval mode)."""
    was_training = model.training
    model.eval()
    samples = [it.sample for it in items]
    position = {id(s): i for i, s in enumerate(samples)}
    scores = np.zeros(len(items))
    emotions = np.zeros(len(items), np.int64)
    has_emotions = model.emotion_head is not None
    for chunk in length_bucketed_batches(samples, batch_size, rng=None):
        batch = collate(chunk, model.config.modalities)
        out = model(batch.features, batch.masks)
        where = [position[id(s)] for s in chunk]
        scores[where] = out.score.double().numpy()
        if out.emotion_logits is not None:
            emotions[where] = out.emotion_logits.argmax(-1).numpy()
    model.train(was_training)
    return Predictions(scores, emotions if has_emotions else None)


def sentiment_class(values: Any, config: CoupledMambaConfig) -> NDArray[np.int64]:
    """Class indices (0 negative, 1 neutral, 2 positive) of scores, by the model's own rule
    (``CoupledMambaConfig.score_to_class``)."""
    return np.array([config.score_to_class(float(v)) for v in values], dtype=np.int64)


def emotion_metrics(
    items: Sequence[MixedSample],
    polarity: Sequence[int],
    predictions: Predictions,
    config: CoupledMambaConfig,
) -> dict[str, float]:
    """AUC of the score for positive vs negative emotions, 3-class sentiment accuracy (items
    with a sentiment target) and emotion accuracy."""
    score = predictions.score
    pol = np.asarray(polarity)
    signed = pol != 0
    target = np.array([it.sentiment for it in items])
    has_target = ~np.isnan(target)
    out = {
        "AUC": auc(score[signed].tolist(), (pol[signed] > 0).tolist()),
        "Acc_3": float(
            np.mean(
                sentiment_class(score[has_target], config)
                == sentiment_class(target[has_target], config)
            )
        )
        if has_target.any()
        else math.nan,
        "N": float(len(items)),
    }
    if predictions.emotion is not None:
        labels = np.array([it.emotion for it in items])
        out["Emotion_acc"] = float(np.mean(predictions.emotion == labels))
    return out


@dataclass
class EvalSets:
    """The fixed evaluation items of one split (valid or test)."""

    text: list[MixedSample]
    voice_audio: list[MixedSample]
    voice_words: list[MixedSample]
    face: list[MixedSample]
    paired: dict[str, list[MixedSample]]  # subset name -> items
    voice_polarity: list[int]
    face_polarity: list[int]
    paired_polarity: list[int]
    # Each clip's first recording-condition variant, audio alone (empty without variants).
    voice_shifted: list[MixedSample] = field(default_factory=list)
    voice_shifted_polarity: list[int] = field(default_factory=list)


PAIRED_SUBSETS = {
    "voice": ("audio",),
    "face": ("visual",),
    "voice+face": ("audio", "visual"),
    "all": MODALITY_ORDER,
}


def eval_sets(
    mixer: Mixer, seed: int = 0, face_steps: int = 20, max_faces: int | None = None
) -> EvalSets:
    """Deterministic evaluation items: every text, every clip (audio alone, and with its words),
    every face (held ``face_steps`` steps; a seeded sample of ``max_faces`` when given) and every
    clip paired with one seeded face of its emotion under each subset of ``PAIRED_SUBSETS``."""
    rng = random.Random(seed)
    faces = mixer.faces
    if max_faces is not None and max_faces < len(faces):
        faces = random.Random(seed).sample(faces, max_faces)
    pairs = [(v, mixer.partner(v, rng)) for v in mixer.voices]
    pairs = [(v, f) for v, f in pairs if f is not None]
    return EvalSets(
        text=mixer.text_items(mixer.texts),
        voice_audio=[mixer.voice_item(v, ("audio",)) for v in mixer.voices],
        voice_words=[mixer.voice_item(v, ("text", "audio")) for v in mixer.voices],
        face=[mixer.face_item(f, face_steps) for f in faces],
        paired={
            name: [mixer.paired_item(v, f, keep) for v, f in pairs if f is not None]
            for name, keep in PAIRED_SUBSETS.items()
        },
        voice_polarity=[v.polarity for v in mixer.voices],
        face_polarity=[f.polarity for f in faces],
        paired_polarity=[v.polarity for v, _ in pairs],
        voice_shifted=[
            mixer.voice_item(v, ("audio",), v.variants[0]) for v in mixer.voices if v.variants
        ],
        voice_shifted_polarity=[v.polarity for v in mixer.voices if v.variants],
    )


def evaluate(model: CoupledMambaForSentiment, sets: EvalSets) -> dict[str, Any]:
    """Every metric of the default checkpoint's report on one split."""
    out: dict[str, Any] = {}
    if sets.text:
        scores = predict(model, sets.text).score
        labels = np.array([it.sentiment for it in sets.text])
        sources = np.array([it.source for it in sets.text])
        out["text"] = {
            s: rated_text_metrics(scores[sources == s], labels[sources == s])
            for s in sorted(set(sources.tolist()))
        }
    if sets.voice_audio:
        out["voice"] = emotion_metrics(
            sets.voice_audio, sets.voice_polarity, predict(model, sets.voice_audio), model.config
        )
        out["voice_words"] = emotion_metrics(
            sets.voice_words, sets.voice_polarity, predict(model, sets.voice_words), model.config
        )
    if sets.voice_shifted:
        out["voice_shifted"] = emotion_metrics(
            sets.voice_shifted,
            sets.voice_shifted_polarity,
            predict(model, sets.voice_shifted),
            model.config,
        )
    if sets.face:
        out["face"] = emotion_metrics(
            sets.face, sets.face_polarity, predict(model, sets.face), model.config
        )
    for name, items in sets.paired.items():
        if items:
            out[f"paired:{name}"] = emotion_metrics(
                items, sets.paired_polarity, predict(model, items), model.config
            )
    return out


def selection_score(metrics: dict[str, Any]) -> float:
    """One number, higher is better, that picks the epoch: the mean of the mean per-source
    text r, the voice AUC, the face AUC and the fused (all modalities) paired AUC."""
    parts = []
    if "text" in metrics:
        parts.append(float(np.mean([v["Pearson_r"] for v in metrics["text"].values()])))
    for key in ("voice_words", "face", "paired:all"):
        if key in metrics:
            parts.append(metrics[key]["AUC"])
    if not parts or any(math.isnan(p) for p in parts):
        return -math.inf
    return float(np.mean(parts))


# --------------------------------------------------------------------------- training


@dataclass
class MultimodalTrainSettings:
    """The recipe of a multimodal run (see docs/TRAINING.md)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    class_loss_weight: float = 0.2
    emotion_loss_weight: float = 0.5
    seed: int = 0
    threads: int = 2
    mix: MixRecipe = field(default_factory=MixRecipe)
    # Extra factor on a source's loss weight (after the 1 / label-spread weighting).
    source_boost: dict[str, float] = field(default_factory=dict)
    # With a ``teacher`` passed to ``train_multimodal``: the weight of the squared distance
    # between the model's score and the teacher's on the same item (the teacher reads only its
    # own modalities; items holding none of them are not distilled).
    distill_weight: float = 0.0


@dataclass
class MultimodalResult:
    model: CoupledMambaForSentiment
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    diverged: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "history": self.history,
            "seconds": round(self.seconds, 1),
            "diverged": self.diverged,
        }


def source_weights(items: Sequence[MixedSample]) -> dict[str, float]:
    """Per source, 1 / spread of its sentiment targets (normalised to mean 1), so that a source
    with a narrow label range (NYT editorials) weighs as much as a wide one."""
    spreads: dict[str, float] = {}
    for source in sorted({it.source for it in items}):
        values = np.array([it.sentiment for it in items if it.source == source])
        values = values[~np.isnan(values)]
        spreads[source] = float(values.std()) if len(values) > 1 and values.std() > 0 else 1.0
    inverse = {s: 1.0 / v for s, v in spreads.items()}
    mean = float(np.mean(list(inverse.values())))
    return {s: v / mean for s, v in inverse.items()}


def _batches(
    items: Sequence[MixedSample], batch_size: int, rng: random.Random
) -> Iterator[list[MixedSample]]:
    by_sample = {id(it.sample): it for it in items}
    for chunk in length_bucketed_batches([it.sample for it in items], batch_size, rng):
        yield [by_sample[id(s)] for s in chunk]


def train_multimodal(
    model: CoupledMambaForSentiment,
    train: Mixer,
    valid: EvalSets,
    settings: MultimodalTrainSettings,
    log: Callable[[str], None] = print,
    select: Callable[[dict[str, Any]], float] = selection_score,
    teacher: CoupledMambaForSentiment | None = None,
) -> MultimodalResult:
    """Train ``model`` on epochs drawn from ``train``; the epoch with the best ``select``
    score (default ``selection_score``) on ``valid`` is kept (its weights are loaded back at
    the end). Only parameters that require gradients are updated. With a ``teacher`` and
    ``settings.distill_weight`` > 0, the model's scores are also pulled towards the teacher's
    (knowledge distillation; the teacher is not trained)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    config: CoupledMambaConfig = model.config
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    weights = source_weights(train.epoch(settings.mix, random.Random(settings.seed)))
    weights = {s: w * settings.source_boost.get(s, 1.0) for s, w in weights.items()}
    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -math.inf, -1, None
    step, start, diverged = 0, time.perf_counter(), False
    for epoch in range(settings.epochs):
        rng = random.Random(settings.seed * 1000 + epoch)
        items = train.epoch(settings.mix, rng)
        total_steps = settings.epochs * math.ceil(len(items) / settings.batch_size)
        model.train()
        losses = []
        for chunk in _batches(items, settings.batch_size, rng):
            batch = collate([it.sample for it in chunk], config.modalities)
            try:
                out = model(batch.features, batch.masks)
            except NonFiniteInputError:  # the scan refuses non-finite inputs: a diverged run
                diverged = True
                break
            target = torch.tensor([it.sentiment for it in chunk], dtype=torch.float32)
            w = torch.tensor([weights.get(it.source, 1.0) for it in chunk], dtype=torch.float32)
            has = ~torch.isnan(target)
            loss = out.score.new_zeros(())
            if has.any():
                err = (out.score[has] - target[has]) ** 2
                loss = loss + (w[has] * err).sum() / w[has].sum()
                classes = torch.from_numpy(sentiment_class(target[has].tolist(), config))
                ce = F.cross_entropy(out.logits[has], classes, reduction="none")
                loss = loss + settings.class_loss_weight * (w[has] * ce).sum() / w[has].sum()
            if teacher is not None and settings.distill_weight > 0:
                loss = loss + settings.distill_weight * distill_loss(out.score, batch, teacher)
            emotion = torch.tensor([it.emotion for it in chunk])
            labelled = emotion != NO_EMOTION
            if out.emotion_logits is not None and labelled.any():
                loss = loss + settings.emotion_loss_weight * F.cross_entropy(
                    out.emotion_logits[labelled], emotion[labelled]
                )
            if not torch.isfinite(loss):
                diverged = True
                break
            factor = lr_factor(step, total_steps, settings.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * factor
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        if diverged:
            log(f"epoch {epoch + 1}: loss is not finite: the run diverged")
            break
        try:
            metrics = evaluate(model, valid)
        except NonFiniteInputError:  # the states overflow on the longer validation inputs
            diverged = True
            log(f"epoch {epoch + 1}: validation inputs overflow the scan: the run diverged")
            break
        score = select(metrics)
        history.append(
            {"epoch": epoch + 1, "loss": float(np.mean(losses)), "select": score, "valid": metrics}
        )
        log(
            f"epoch {epoch + 1}/{settings.epochs}: loss {np.mean(losses):.3f}, select {score:.4f} "
            f"({_brief(metrics)}), {time.perf_counter() - start:.0f} s"
        )
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return MultimodalResult(model, best_epoch, history, time.perf_counter() - start, diverged)


def distill_loss(score: Tensor, batch: Batch, teacher: CoupledMambaForSentiment) -> Tensor:
    """Mean squared distance between ``score`` (b,) and the teacher's score on the same batch,
    over the items that hold at least one of the teacher's modalities (0 when none does)."""
    names = teacher.config.modalities
    with torch.no_grad():
        teacher.eval()
        target = teacher(
            {m: batch.features[m] for m in names}, {m: batch.masks[m] for m in names}
        ).score
    seen = torch.stack([batch.masks[m].any(dim=-1) for m in names]).any(dim=0)
    if not seen.any():
        return score.new_zeros(())
    return ((score[seen] - target[seen]) ** 2).mean()


def _brief(metrics: dict[str, Any]) -> str:
    parts = []
    if "text" in metrics:
        parts.append(
            "text r " + "/".join(f"{v['Pearson_r']:.3f}" for v in metrics["text"].values())
        )
    keys = ("voice", "voice_shifted", "voice_words", "face", "paired:voice+face", "paired:all")
    for key in keys:
        if key in metrics:
            parts.append(f"{key} AUC {metrics[key]['AUC']:.3f}")
    return ", ".join(parts)


def in_branch(name: str, modality: str) -> bool:
    """Whether parameter ``name`` belongs to ``modality``'s branch: its input projection, its
    norms and mixers in every layer, its final norm. With the modality absent from a request
    these take no part (a masked step neither writes nor decays a state)."""
    parts = name.split(".")
    return modality in parts and parts[0] in ("input_proj", "layers", "final_norms")


def warm_start(
    model: CoupledMambaForSentiment, source: CoupledMambaForSentiment, modality: str = "text"
) -> list[str]:
    """Copy one modality's branch (input projection, norms, mixers) and the heads from a
    trained ``source`` of the same widths; returns the parameter names copied."""
    target_state = model.state_dict()
    copied = []
    for name, value in source.state_dict().items():
        head = name.split(".")[0] in ("regression_head", "class_head")
        wanted = in_branch(name, modality) or head or name == "fusion.gate.weight"
        if wanted and name in target_state and target_state[name].shape == value.shape:
            target_state[name] = value.clone()
            copied.append(name)
    model.load_state_dict(target_state)
    return copied
