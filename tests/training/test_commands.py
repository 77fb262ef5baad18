"""`cmamba train` and `cmamba evaluate` end to end on small generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import CoupledMambaConfig, CoupledMambaForSentiment, load_checkpoint, save_checkpoint
from model.training.data import Sample, load_mmsa_pickle
from model.training.metrics import mosei_regression_metrics, rated_text_metrics
from model.training.trainer import predict_scores
from service.cli import main


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


def test_train_then_evaluate_on_mmsa_pickle(tiny_mosi: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    code = run_cli(
        [
            "train", str(tiny_mosi), "--out", str(ckpt), "--epochs", "2", "--batch-size", "16",
            "--d-model", "16", "--d-state", "4", "--layers", "1", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    config = json.loads((ckpt / "config.json").read_text())
    assert config["modalities"] == ["text", "audio", "visual"]
    assert config["feature_dims"] == {"text": 8, "audio": 3, "visual": 4}
    assert config["training"]["settings"]["seed"] == 1111
    assert config["training"]["data"]["sizes"] == {"train": 64, "valid": 16, "test": 16}
    assert set(config["metrics"]["test"]) >= {"Has0_acc_2", "Non0_acc_2", "Mult_acc_7", "MAE"}
    card = (ckpt / "MODEL_CARD.md").read_text()
    assert "text, audio, visual" in card and "CMU-MOSEI" in card
    assert (tmp_path / "ckpt.run" / "state_best.pt").is_file()

    out = tmp_path / "eval.json"
    assert run_cli(["evaluate", str(ckpt), str(tiny_mosi), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    model = load_checkpoint(ckpt)
    test = load_mmsa_pickle(tiny_mosi).splits["test"]
    expected = mosei_regression_metrics(
        predict_scores(model, test), np.array([s.label for s in test])
    )
    assert results["metric_set"] == "mosi"
    for key, value in expected.items():
        assert results["test"]["metrics"][key] == pytest.approx(value, abs=1e-6)


def test_evaluate_texts_rescales_ratings_to_the_checkpoint(tmp_path: Path) -> None:
    from preprocessing.dataset import encode_texts_on_grid

    torch.manual_seed(0)
    config = CoupledMambaConfig(
        modalities=("text",),
        feature_dims={"text": 384},
        feature_profile="default-v1",
        d_model=16,
        d_state=4,
        n_layers=1,
        label_scale=(-1.0, 1.0),
    )
    ckpt = tmp_path / "ckpt"
    save_checkpoint(CoupledMambaForSentiment(config, scan_backend="ref"), ckpt)
    rows = [
        ("a", 3.2, "A wonderful, moving film."),
        ("b", -2.4, "Dull and far too long."),
        ("c", 0.8, "It was fine, I guess."),
        ("d", -4.0, "The worst meal of my life!"),
    ]
    texts = tmp_path / "rated.tsv"
    texts.write_text("".join(f"{i}\t{r}\t{t}\n" for i, r, t in rows), encoding="utf-8")
    out = tmp_path / "texts.json"
    code = run_cli(["evaluate", str(ckpt), "--texts", str(texts), "--vader", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["n"] == 4 and results["label_scale"] == [-1.0, 1.0]

    model = load_checkpoint(ckpt)
    encoded = encode_texts_on_grid([t for _, _, t in rows])
    samples = [
        Sample.from_dense(i, 0.0, {"text": f}, {"text": m}, dtype=np.float32)
        for (i, _, _), (f, m) in zip(rows, encoded, strict=True)
    ]
    scores = predict_scores(model, samples)
    labels = np.array([r for _, r, _ in rows]) / 4.0  # [-4, 4] -> [-1, 1]
    expected = rated_text_metrics(scores, labels)
    assert results["model"]["MAE"] == pytest.approx(expected["MAE"], abs=1e-5)
    assert results["model"]["Pearson_r"] == pytest.approx(expected["Pearson_r"], abs=1e-5)
    # VADER gets the signs of these four right
    assert results["vader"]["Acc_2"] == 1.0


def test_evaluate_needs_data_or_texts(tmp_path: Path) -> None:
    assert run_cli(["evaluate", str(tmp_path)]) == 2
