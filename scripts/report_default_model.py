"""Step 6 of ``make default-model``: held-out metrics, the model card, the copy and the pins.

Called by ``scripts/build_default_model.py``; can be rerun alone on a trained checkpoint:
``python scripts/build_default_model.py --data DIR --step report``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from model.training.multimodal import EvalSets, evaluate  # noqa: E402

MEDIA = ROOT.parent / "shared" / "media"
CREMA_D = {"happy": "cremad_1001_DFA_HAP_XX.mp4", "angry": "cremad_1001_DFA_ANG_XX.mp4"}
CREMA_D_WORDS = "Don't forget a jacket"
# What the text-only checkpoint scored on the same test sentences (the text target's baseline).
TEXT_ONLY_TEST_R = {"movie_reviews": 0.728, "nyt_editorials": 0.687, "tweets": 0.876}


def crema_d_check(checkpoint: Path) -> dict[str, dict[str, float]]:
    """Scores of the shared CREMA-D clips (one actor, one sentence, happy and angry) through
    the real extractor, with the transcript held fixed, per modality subset."""
    import torch

    from model import load_checkpoint_with_info
    from service.core.lifecycle import default_extractor
    from service.settings import ServiceSettings

    model, info = load_checkpoint_with_info(checkpoint)
    extractor = default_extractor(
        ServiceSettings(), model.config.modalities, info.text_encoder, info.face_encoder
    )
    subsets = {"all": ("text", "audio", "visual"), "voice": ("audio",), "face": ("visual",),
               "words": ("text",)}  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    for emotion, name in CREMA_D.items():
        path = MEDIA / name
        if not path.exists():
            continue
        bundle = extractor.extract(path, transcript=CREMA_D_WORDS)
        out[emotion] = {}
        for subset, keep in subsets.items():
            feats = {m: torch.from_numpy(bundle.features[m])[None] for m in keep}
            masks = {m: torch.from_numpy(bundle.masks[m])[None] for m in keep}
            with torch.no_grad():
                out[emotion][subset] = float(model(feats, masks).score[0])
    return out


def report(
    checkpoint: Path, test: EvalSets, out: Path, work: Path, log: Callable[[str], None]
) -> None:
    from build_text_model import pin_hashes

    from model import load_checkpoint
    from model.checkpoint import (
        CONFIG_FILE,
        FACE_ENCODER_FILE,
        TEXT_ENCODER_FILE,
        WEIGHTS_FILE,
        sha256_file,
    )

    model = load_checkpoint(checkpoint)
    metrics = evaluate(model, test)
    crema = crema_d_check(checkpoint)
    ablation_file = work / "ablation.md"
    ablation = ablation_file.read_text() if ablation_file.exists() else ""
    config_path = checkpoint / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["metrics"] = {"test": metrics, "crema_d": crema}
    config_path.write_text(json.dumps(config, indent=2, default=float) + "\n")
    card = model_card(config, metrics, crema, ablation, work)
    (checkpoint / "MODEL_CARD.md").write_text(card)
    print(card)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE, "MODEL_CARD.md", TEXT_ENCODER_FILE, FACE_ENCODER_FILE):
        shutil.copy2(checkpoint / name, out / name)
    if out.resolve() != (ROOT / "model" / "checkpoints" / "default").resolve():
        log(f"checkpoint: {out} (a candidate: the pinned hashes are left as they are)")
        return
    pin_hashes(
        {
            "DEFAULT_CHECKPOINT_SHA256": sha256_file(out / WEIGHTS_FILE),
            "DEFAULT_TEXT_ENCODER_SHA256": sha256_file(out / TEXT_ENCODER_FILE),
            "DEFAULT_FACE_ENCODER_SHA256": sha256_file(out / FACE_ENCODER_FILE),
        }
    )
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    log(f"checkpoint: {out} ({size:.1f} MB)")


def _row(name: str, m: dict[str, float]) -> str:
    emotion = f"{m['Emotion_acc']:.3f}" if "Emotion_acc" in m else "n/a"
    return f"| {name} | {int(m['N'])} | {m['AUC']:.3f} | {m['Acc_3']:.3f} | {emotion} |"


def model_card(
    config: dict[str, Any],
    metrics: dict[str, Any],
    crema: dict[str, dict[str, float]],
    ablation: str,
    work: Path,
) -> str:
    """The default checkpoint's MODEL_CARD.md."""
    text_rows = [
        f"| {source} | {int(m['N'])} | {m['Pearson_r']:.3f} | {TEXT_ONLY_TEST_R.get(source, 0):.3f} "
        f"| {m['MAE']:.3f} | {m['Acc_2']:.3f} |"
        for source, m in metrics.get("text", {}).items()
    ]
    emotion_rows = [
        _row("voice alone (RAVDESS test actors 21-24)", metrics["voice"]),
        *(
            [
                _row(
                    "voice alone, test actors under drawn recording conditions",
                    metrics["voice_shifted"],
                )
            ]
            if "voice_shifted" in metrics
            else []
        ),
        _row("voice + its words", metrics["voice_words"]),
        _row("face alone (FER2013 PrivateTest)", metrics["face"]),
        _row("paired: voice", metrics["paired:voice"]),
        _row("paired: face", metrics["paired:face"]),
        _row("paired: voice + face", metrics["paired:voice+face"]),
        _row("paired: voice + face + words", metrics["paired:all"]),
    ]
    crema_rows = [
        f"| {subset} | {crema['happy'][subset]:+.2f} | {crema['angry'][subset]:+.2f} |"
        for subset in ("all", "voice", "face", "words")
        if "happy" in crema and "angry" in crema
    ]
    training = config.get("training", {})
    recipe = training.get("recipe", {})
    face_info = config.get("face_encoder", {})
    refine = training.get("text_refine", {})
    refine_recipe = refine.get("recipe", {})
    refine_mix = refine_recipe.get("mix", {})
    couplings = config.get("state_coupling")
    voice = training.get("voice_refine", {})
    voice_recipe = voice.get("recipe", {})
    voice_text = (
        "Then the voice branch alone (the audio modality's projection, norms and mixers; "
        f"everything else frozen) was refined for {voice_recipe.get('epochs')} epochs "
        f"(lr {voice_recipe.get('lr')}) on the training clips, each epoch drawing every clip "
        "either as recorded or as its copy under a drawn recording condition "
        "(`preprocessing/voice_augment.py`: speed 0.9-1.1, a synthetic room of RT60 0.15-0.7 s, "
        "a band limit, white, pink or brown noise at 10-30 dB SNR, a level change), alone, with "
        "its words and paired with a face; the epoch with the best mean of the clean and shifted "
        "validation voice AUCs and the paired voice + face and fused AUCs was kept (epoch "
        f"{voice.get('best_epoch')}). Text-only and face-only answers are unchanged by it."
        if voice
        else ""
    )
    distill = training.get("text_distill", {})
    distill_recipe = distill.get("recipe", {})
    distill_text = (
        "Then the text branch alone once more, for "
        f"{distill_recipe.get('epochs')} epochs of {distill_recipe.get('mix', {}).get('text_per_epoch')} "
        f"rated sentences (lr {distill_recipe.get('lr')}), with the squared distance to the "
        f"text-only checkpoint's score on each sentence (weight "
        f"{distill_recipe.get('distill_weight')}) added to the ratings' loss: knowledge "
        "distillation from the checkpoint the text target is measured against, on training "
        "sentences only. The epoch with the best mean per-source validation r was kept (epoch "
        f"{distill.get('best_epoch')}); voice-only and face-only answers are unchanged by it."
        if distill
        else ""
    )
    return f"""# {config["checkpoint"]["name"]} (version {config["checkpoint"]["version"]})

The default checkpoint served by `make run`: a Coupled Mamba network (arXiv 2405.18014) with
**text, audio and visual branches** whose selective scans are coupled (`state_coupling:
{couplings}`, a row-stochastic learned mix of the three modalities' states, started at the
mean), trained on real human labels. Any subset of the three modalities is scored; the answer
carries a sentiment score on [-3, 3], three class probabilities and seven emotion
probabilities.

## Data (every source and its licence)

| modality | data | labels | licence | used |
| --- | --- | --- | --- | --- |
| text | sentiment snippets of the VADER study (Hutto & Gilbert, ICWSM 2014): movie-review sentences, NYT editorial sentences, tweets | mean of >= 20 human ratings on [-4, 4], rescaled to [-3, 3] | as distributed with vaderSentiment (MIT) | 19,995 sentences; fixed hash split (train 16,133 / valid 1,897 / test 1,965) |
| voice | RAVDESS speech (Livingstone & Russo, PLoS ONE 2018): 24 actors, 1,440 clips, 8 acted emotions at 2 intensities, two neutral sentences | the acted emotion (validated by human raters in the RAVDESS study) | **CC BY-NC-SA 4.0: non-commercial** | actors 1-16 train, 17-20 valid, 21-24 test |
| face | FER2013 (Goodfellow et al., ICONIP 2013): 35,887 48x48 grey faces, 7 emotions | human-labelled emotion | research use (as released for the ICML 2013 challenge) | its own split: Training (train), PublicTest (valid), PrivateTest (test) |

Nothing else was used for training or selection. **The weights inherit RAVDESS's
non-commercial terms**; the text-only checkpoint (`model/checkpoints/text-only`) is trained on
the sentences alone for users who need other terms.

Emotion to sentiment (`model/training/emotions.py`): the valence sign from Russell's circumplex
(happy +; sad, angry, fearful, disgust -; neutral 0; calm a third of happy), the magnitude from
the intensity (normal 2, strong 3; FER2013 has none: 2). Surprise has no fixed valence: it
trains the emotion head only. RAVDESS's calm counts as neutral for the emotion head.

**Paired samples are a training device.** No corpus here has one person's voice and face
labelled together. Training mixes rated sentences (text only), RAVDESS clips (voice, with or
without their neutral words), FER2013 faces (face only) and *pairs* of a RAVDESS clip with a
FER2013 face of the same emotion from the same split, with random modality dropout. The
"paired" rows below are built the same way from test clips and test faces.

## Features (profile `multimodal-v1`, docs/FEATURES.md)

- text: all-MiniLM-L6-v2 with its top 2 layers fine-tuned on the train sentences (shipped as
  `text_encoder.safetensors`), token embeddings on the 10 Hz grid;
- audio: the Whisper tiny.en encoder states of the ASR model (384-d), mean per 100 ms step,
  silent steps masked;
- visual: a face crop placed by face-mesh landmarks, 48x48 grey, through a small CNN trained on
  FER2013 Training (`face_encoder.safetensors`; PublicTest picked its epoch): face flag, 7
  centred class logits, 56-d embedding (64 per step). {_face_line(face_info)}

## Training

Warm start: the text branch and the heads of the text-only checkpoint. Then {recipe.get("epochs")}
epochs of mixed samples (AdamW lr {recipe.get("lr")}, cosine, batch {recipe.get("batch_size")},
squared error on the score weighted per source by 1 / label spread + 0.2 x cross-entropy on the
3 classes + 0.5 x cross-entropy on the emotions where labelled); the epoch with the best mean of
(mean per-source text r, voice AUC, face AUC, fused AUC) on the validation split
(epoch {training.get("best_epoch")}), seed {recipe.get("seed")}. Then the text branch alone
(input projection, norms, mixers of the text modality; everything else frozen) was refined on
rated sentences for {refine_recipe.get("epochs")} epochs of {refine_mix.get("text_per_epoch")} (lr
{refine_recipe.get("lr")}, loss weight boosts {refine_recipe.get("source_boost") or "none"}), the epoch with the best mean per-source validation r kept (epoch
{refine.get("best_epoch")}): with no text in a request those parameters take no part, so
voice-only and face-only answers are unchanged by it.
{voice_text}
{distill_text}
Architecture: d_model {config["d_model"]}, d_state {config["d_state"]}, {config["n_layers"]}
layers, expand {config["expand"]}, {config["pooling"]} pooling, gate fusion,
{config["checkpoint"]["parameters"]:,} parameters. Rebuild: `make default-model`.

## Held-out test results (never used for training or selection)

Text (Pearson r against the human ratings; the text-only checkpoint for comparison):

| source | n | r | text-only r | MAE | Acc-2 |
| --- | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(text_rows)}

Voice and face (AUC: the score separating positive (happy) from negative (sad, angry, fearful,
disgust) emotions; Acc-3: negative / neutral / positive from the score, surprise left out;
emotion accuracy over 7 classes):

| input | n | AUC | Acc-3 | emotion acc |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(emotion_rows)}

Other actors and sentence (the shared CREMA-D clips of one actor saying "{CREMA_D_WORDS}",
through the service's own extractor, transcript held fixed): score of each clip.

| modalities | happy clip | angry clip |
| --- | ---: | ---: |
{chr(10).join(crema_rows)}

{("## Coupling ablation (validation, mean ± std over 3 seeds)" + chr(10) + chr(10) + ablation) if ablation else ""}

## Limitations

- Acted emotions (RAVDESS: studio recordings of two sentences by 24 North American actors;
  FER2013: web images) are not everyday sentiment; expect weaker results on spontaneous speech
  and faces, other languages, rooms and microphones.
- Voice and face were never labelled together: how the model weighs a smiling face against an
  angry voice comes from the pairing device above, not from real multimodal labels.
- Scores describe expressed sentiment, not a judgement of a person.
"""


def _face_line(info: dict[str, Any]) -> str:
    test = info.get("test") or {}
    parts = []
    if "auc_p_happy" in test:
        parts.append(f"PrivateTest AUC of P(happy) {float(test['auc_p_happy']):.3f}")
    if "accuracy" in test:
        parts.append(f"7-class accuracy {float(test['accuracy']):.3f}")
    return ("The CNN alone: " + ", ".join(parts) + ".") if parts else ""
