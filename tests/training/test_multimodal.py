"""Multimodal training from separately labelled corpora: mixing, dropout, targets, warm start."""

from __future__ import annotations

import random

import numpy as np
import torch

from model import CoupledMambaConfig, CoupledMambaForSentiment
from model.config import EMOTION_NAMES
from model.training.data import Sample, collate
from model.training.multimodal import (
    NO_EMOTION,
    EmotionMedia,
    Mixer,
    MixRecipe,
    MultimodalTrainSettings,
    distill_loss,
    eval_sets,
    evaluate,
    face_sample,
    predict,
    train_multimodal,
    warm_start,
    with_audio,
)

DIMS = {"text": 6, "audio": 5, "visual": 4}
HAPPY, SAD = EMOTION_NAMES.index("happy"), EMOTION_NAMES.index("sad")


def _voice(rng: np.random.Generator, i: int, happy: bool, split: str = "train") -> EmotionMedia:
    length = int(rng.integers(8, 14))
    audio = rng.normal(size=(length, DIMS["audio"])).astype(np.float32)
    audio[:, 0] = 1.5 if happy else -1.5  # the voice carries the emotion
    words = np.zeros((length, DIMS["text"]), np.float32)  # the same neutral words
    words[: length // 2, 1] = 1.0
    mask_words = np.zeros(length, bool)
    mask_words[: length // 2] = True
    sample = Sample.from_dense(
        f"v{i}",
        0.0,
        {"audio": audio, "text": words},
        {"audio": np.ones(length, bool), "text": mask_words},
    )
    emotion = "happy" if happy else "sad"
    return EmotionMedia(
        f"v{i}", split, emotion, EMOTION_NAMES.index(emotion), 2.0 if happy else -2.0,
        1 if happy else -1, sample,
    )  # fmt: skip


def _face(rng: np.random.Generator, i: int, happy: bool, split: str = "train") -> EmotionMedia:
    vec = rng.normal(size=DIMS["visual"]).astype(np.float32)
    vec[0] = 1.5 if happy else -1.5
    emotion = "happy" if happy else "sad"
    return EmotionMedia(
        f"f{i}", split, emotion, EMOTION_NAMES.index(emotion), 2.0 if happy else -2.0,
        1 if happy else -1, face_sample(f"f{i}", vec),
    )  # fmt: skip


def _text(rng: np.random.Generator, i: int) -> Sample:
    length = int(rng.integers(4, 10))
    feats = rng.normal(size=(length, DIMS["text"])).astype(np.float32)
    label = float(np.clip(2 * feats[:, 0].mean(), -3, 3))
    return Sample.from_dense(
        f"t{i}", label, {"text": feats}, {"text": np.ones(length, bool)}, group="movie"
    )


def _mixer(seed: int, n: int, split: str = "train") -> Mixer:
    rng = np.random.default_rng(seed)
    return Mixer(
        [_text(rng, i) for i in range(n)],
        [_voice(rng, i, i % 2 == 0, split) for i in range(n)],
        [_face(rng, i, i % 2 == 0, split) for i in range(n)],
        DIMS,
    )


def _model(coupling: str = "learned", modalities=("text", "audio", "visual"), seed: int = 0):
    torch.manual_seed(seed)
    config = CoupledMambaConfig(
        modalities=modalities, feature_dims=DIMS, d_model=16, d_state=4, n_layers=2,
        dropout=0.0, state_coupling=coupling, emotion_classes=EMOTION_NAMES,
    )  # fmt: skip
    return CoupledMambaForSentiment(config)


def test_an_epoch_never_scores_the_words_of_an_emotion_clip_alone() -> None:
    mixer = _mixer(0, 40)
    items = mixer.epoch(MixRecipe(text_per_epoch=10, faces_per_epoch=12), random.Random(0))
    kinds = [it.kind for it in items]
    assert kinds.count("text") == 10 and kinds.count("face") == 12
    assert kinds.count("voice") == 40 and kinds.count("paired") == 40
    for item in items:
        present = {m for m, idx in item.sample.index.items() if (idx >= 0).any()}
        assert present, item.kind
        if item.kind == "text":
            assert present == {"text"} and item.emotion == NO_EMOTION
        else:
            assert present != {"text"}, item.kind  # the neutral words never stand alone
            assert item.emotion in (HAPPY, SAD)
        if item.kind == "face":
            assert present == {"visual"}
    # A pair's face shows the voice's emotion.
    for voice in mixer.voices:
        face = mixer.partner(voice, random.Random(1))
        assert face is not None and face.emotion == voice.emotion


def test_composed_samples_collate_with_absent_modalities_masked() -> None:
    mixer = _mixer(1, 6)
    item = mixer.paired_item(mixer.voices[0], mixer.faces[0], ("visual",))
    batch = collate([item.sample], ("text", "audio", "visual"))
    assert batch.masks["visual"].all() and not batch.masks["audio"].any()
    assert not batch.masks["text"].any() and not batch.features["audio"].any()
    assert batch.features["visual"].shape == (1, mixer.voices[0].sample.length, DIMS["visual"])


def test_training_learns_every_modality_and_the_emotion_head() -> None:
    train, valid = _mixer(2, 64), _mixer(3, 24, "valid")
    sets = eval_sets(valid)
    model = _model()
    before = evaluate(model, sets)
    settings = MultimodalTrainSettings(
        epochs=4, batch_size=16, lr=3e-3, warmup_steps=5, threads=1,
        mix=MixRecipe(text_per_epoch=None, faces_per_epoch=None),
    )  # fmt: skip
    result = train_multimodal(model, train, sets, settings, log=lambda _: None)
    after = evaluate(result.model, sets)
    assert result.best_epoch >= 1 and not result.diverged
    assert after["voice"]["AUC"] > 0.9 and after["face"]["AUC"] > 0.9
    assert after["paired:voice+face"]["AUC"] > 0.9
    assert after["text"]["movie"]["Pearson_r"] > before["text"]["movie"]["Pearson_r"]
    assert after["face"]["Emotion_acc"] > 0.8


def test_a_non_finite_loss_ends_the_run_as_diverged_instead_of_raising() -> None:
    """What the ``sum`` coupling does on long inputs: the run stops and says so."""
    train, valid = _mixer(4, 16), _mixer(5, 8, "valid")
    for face in train.faces:
        face.sample.rows["visual"][:] = np.inf
    settings = MultimodalTrainSettings(
        epochs=2, batch_size=8, threads=1, mix=MixRecipe(faces_per_epoch=None)
    )
    result = train_multimodal(_model("sum"), train, eval_sets(valid), settings, log=lambda _: None)
    assert result.diverged and result.history == []


def test_warm_start_keeps_the_text_answers_of_an_uncoupled_text_model() -> None:
    source = _model("none", modalities=("text",), seed=7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    target = _model("none", seed=8)
    copied = warm_start(target, source)
    assert any(n.startswith("layers.0.mixers.text") for n in copied)
    assert not any(".audio" in n or ".visual" in n for n in copied)
    rng = np.random.default_rng(0)
    feats = {"text": torch.from_numpy(rng.normal(size=(2, 7, DIMS["text"])).astype(np.float32))}
    masks = {"text": torch.ones(2, 7, dtype=torch.bool)}
    with torch.no_grad():
        torch.testing.assert_close(target(feats, masks).score, source.eval()(feats, masks).score)


def test_distillation_pulls_the_text_answers_towards_the_teacher() -> None:
    """Step 5d's device: with a teacher and a distillation weight, the scores move towards the
    teacher's; items holding none of the teacher's modalities contribute nothing."""
    teacher = _model("learned", modalities=("text",), seed=11)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    train, valid = _mixer(6, 96), _mixer(7, 32, "valid")
    sets = eval_sets(valid)
    items = sets.text
    batch = collate([it.sample for it in items], ("text",))
    with torch.no_grad():
        wanted = teacher.eval()(batch.features, batch.masks).score.numpy()

    def distance(distill_weight: float) -> float:
        settings = MultimodalTrainSettings(
            epochs=6, batch_size=16, lr=3e-3, warmup_steps=5, threads=1, seed=3,
            mix=MixRecipe(text_per_epoch=None, voice_repeats=0, faces_per_epoch=0,
                          paired_repeats=0),
            distill_weight=distill_weight,
        )  # fmt: skip
        result = train_multimodal(
            _model(seed=12), train, sets, settings, log=lambda _: None, teacher=teacher
        )
        return float(np.abs(predict(result.model, items).score - wanted).mean())

    assert distance(20.0) < 0.7 * distance(0.0)
    faces = collate([valid.face_item(f, 5).sample for f in valid.faces[:4]], tuple(DIMS))
    assert float(distill_loss(torch.ones(4), faces, teacher)) == 0.0


def test_with_audio_swaps_the_audio_and_stretches_the_words_to_the_new_length() -> None:
    clip = _voice(np.random.default_rng(3), 0, happy=True).sample
    words, words_mask = clip.dense("text")
    faster = np.full((clip.length // 2, DIMS["audio"]), 0.25, np.float32)
    variant = with_audio(clip, faster, np.ones(len(faster), bool), "v0~0")
    assert variant.length == len(faster)
    audio, audio_mask = variant.dense("audio")
    assert audio_mask.all() and np.allclose(audio, 0.25)
    stretched, stretched_mask = variant.dense("text")
    # Step t of the variant reads step floor(t * L / L') of the clean clip.
    source = (np.arange(variant.length) * clip.length) // variant.length
    assert np.array_equal(stretched_mask, words_mask[source])
    assert np.allclose(stretched, words[source])


def test_epochs_draw_condition_variants_and_evaluation_reads_the_clean_clip() -> None:
    mixer = _mixer(4, 6)
    for v in mixer.voices:
        shifted = np.full((v.sample.length, DIMS["audio"]), 7.0, np.float32)
        v.variants = (with_audio(v.sample, shifted, np.ones(v.sample.length, bool), v.id + "~0"),)
    items = mixer.epoch(MixRecipe(voice_repeats=4, paired_repeats=4), random.Random(0))
    audio_rows = [
        it.sample.rows["audio"] for it in items if it.kind in ("voice", "paired")
        and len(it.sample.rows["audio"])
    ]  # fmt: skip
    shifted = [bool(np.all(rows == 7.0)) for rows in audio_rows]
    assert any(shifted) and not all(shifted)  # both the clean clips and their variants
    sets = eval_sets(mixer)
    assert not any(np.all(it.sample.rows["audio"] == 7.0) for it in sets.voice_audio)
    assert all(np.all(it.sample.rows["audio"] == 7.0) for it in sets.voice_shifted)
    model = _model()
    assert "voice_shifted" in evaluate(model, sets)
