"""Fine-tuning MiniLM's top layers: training moves the loss, the saved layers are what the
service's text encoder applies, and bad tuning files are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.training.rated_texts import read_snippet_folder, rescale, split_of
from preprocessing.errors import ModelLoadError
from preprocessing.models import bundled_text_model_dir
from preprocessing.text import TextEncoder
from preprocessing.text_tuning import (
    TextTuningConfig,
    TuningExample,
    save_text_tuning,
    sentence_pieces,
    tune_text_encoder,
)

SNIPPETS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sentiment-snippets"


@pytest.fixture(scope="module")
def rated() -> dict[str, list[TuningExample]]:
    if not SNIPPETS.is_dir():
        pytest.skip(f"{SNIPPETS} is not there")
    out: dict[str, list[TuningExample]] = {"train": [], "valid": []}
    for item in read_snippet_folder(SNIPPETS):
        split = split_of(item.source, item.id)
        if split in out and len(out[split]) < (128 if split == "train" else 48):
            label = rescale(item.rating, (-4.0, 4.0), (-3.0, 3.0))
            out[split].append(TuningExample(item.text, label, item.source))
    return out


@pytest.fixture(scope="module")
def tuned(rated: dict[str, list[TuningExample]], tmp_path_factory: pytest.TempPathFactory):
    config = TextTuningConfig(layers=1, epochs=3, batch_size=16, lr=2e-4, warmup_steps=1)
    with torch.random.fork_rng(devices=[]):
        result = tune_text_encoder(rated["train"], rated["valid"], config=config)
    path = tmp_path_factory.mktemp("tuning") / "text_encoder.safetensors"
    digest = save_text_tuning(result.state, path)
    return result, path, digest


def test_tuning_trains_only_the_top_layers_and_lowers_the_loss(tuned) -> None:
    result, path, _ = tuned
    assert result.tuned_layers == [5]
    assert result.state and all(k.startswith("encoder.layer.5.") for k in result.state)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert 0 <= result.best_epoch < 3
    stored = load_file(str(path))
    assert set(stored) == set(result.state)
    assert all(t.dtype == torch.float16 for t in stored.values())
    # The tuned layer moved away from the base weights.
    from transformers import AutoModel

    original = AutoModel.from_pretrained(str(bundled_text_model_dir())).state_dict()
    moved = max(float((stored[k].float() - original[k]).abs().max()) for k in stored)
    assert moved > 1e-3


def test_encoder_applies_the_tuned_layers(tuned) -> None:
    _, path, digest = tuned
    text = "the plot is thin but the acting is wonderful"
    plain = TextEncoder().encode(text)
    with_tuning = TextEncoder(tuning=path, tuning_sha256=digest).encode(text)
    assert with_tuning.words == plain.words
    assert np.array_equal(with_tuning.word_index, plain.word_index)
    assert not np.allclose(with_tuning.embeddings, plain.embeddings, atol=1e-3)

    # The same numbers from an independent path: transformers' model with the file loaded.
    from transformers import AutoModel, AutoTokenizer

    folder = str(bundled_text_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=False)
    batch = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state[0, 1:-1].numpy()
    np.testing.assert_allclose(with_tuning.embeddings, hidden, atol=2e-4)


def test_bad_tuning_files_are_refused(tuned, tmp_path: Path) -> None:
    _, path, digest = tuned
    with pytest.raises(ModelLoadError, match="sha256"):
        TextEncoder(tuning=path, tuning_sha256="0" * 64).load()
    with pytest.raises(ModelLoadError, match="does not exist"):
        TextEncoder(tuning=tmp_path / "missing.safetensors").load()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.5.output.dense.weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(ModelLoadError, match="does not fit"):
        TextEncoder(tuning=foreign).load()
    unknown = tmp_path / "unknown.safetensors"
    save_file({"classifier.weight": torch.zeros(2, 384)}, str(unknown))
    with pytest.raises(ModelLoadError, match="does not fit"):
        TextEncoder(tuning=unknown).load()
    not_safetensors = tmp_path / "junk.safetensors"
    not_safetensors.write_bytes(b"not a tensor file")
    with pytest.raises(ModelLoadError, match="cannot read"):
        TextEncoder(tuning=not_safetensors).load()
    assert digest  # the good file stays usable
    assert TextEncoder(tuning=path, tuning_sha256=digest).encode("fine").embeddings.shape[1] == 384


def test_tuning_reads_the_word_pieces_the_encoder_embeds() -> None:
    encoder = TextEncoder()
    encoder.load()
    fed: list[list[int]] = []
    forward = encoder._model.forward

    def recording_forward(*, input_ids, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        for row, valid in zip(input_ids, attention_mask, strict=True):
            fed.append(row[valid.bool()].tolist())
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    encoder._model.forward = recording_forward
    long_text = " ".join(["unbelievably"] * 60)  # several pieces per word: two windows
    texts = ["the plot is thin but the acting is wonderful", "don't  stop\tbelieving", long_text]
    encoder.encode_batch(texts)
    pieces = sentence_pieces(encoder, texts)
    assert len(fed) == 4  # the long text is embedded in two windows
    for ids in pieces:
        assert ids in fed
    assert len(pieces[2]) <= 256
    assert sentence_pieces(encoder, [""]) == sentence_pieces(encoder, ["."])


def test_tuning_needs_data_and_a_valid_layer_count(rated) -> None:
    with pytest.raises(ValueError, match="needs training"):
        tune_text_encoder([], rated["valid"])
    with pytest.raises(ValueError, match="layers"):
        tune_text_encoder(rated["train"][:4], rated["valid"][:4], config=TextTuningConfig(layers=7))
