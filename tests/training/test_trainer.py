"""The training loop on a generated MMSA-layout pickle: loss falls, runs resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import CoupledMambaConfig, CoupledMambaForSentiment
from model.training.data import FeatureDataset, load_mmsa_pickle
from model.training.trainer import RunMismatchError, TrainSettings, train


def tiny_model(data: FeatureDataset, seed: int = 0) -> CoupledMambaForSentiment:
    torch.manual_seed(seed)
    config = CoupledMambaConfig(
        modalities=data.modalities,
        feature_dims=data.feature_dims,
        feature_profile="test",
        d_model=16,
        d_state=4,
        n_layers=1,
        dropout=0.1,
        label_scale=data.label_scale,
    )
    return CoupledMambaForSentiment(config, scan_backend="ref")


def settings(**overrides: object) -> TrainSettings:
    base: dict[str, object] = {
        "epochs": 6,
        "batch_size": 8,
        "lr": 5e-3,
        "seed": 3,
        "class_loss_weight": 0.2,
    }
    base.update(overrides)
    return TrainSettings(**base)  # type: ignore[arg-type]


def test_loss_falls_and_run_folder_is_complete(tiny_mosi: Path, tmp_path: Path) -> None:
    data = load_mmsa_pickle(tiny_mosi)
    model = tiny_model(data)
    result = train(model, data, settings(), tmp_path / "run", progress=False, log=lambda _: None)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    assert set(result.test_metrics) >= {"Has0_acc_2", "Non0_F1_score", "Mult_acc_7", "Corr"}
    assert 1 <= result.best_epoch <= 6
    for name in ("run.json", "log.jsonl", "state_last.pt", "state_best.pt"):
        assert (tmp_path / "run" / name).is_file()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 6


def test_resumed_run_equals_uninterrupted_run(tiny_mosi: Path, tmp_path: Path) -> None:
    data = load_mmsa_pickle(tiny_mosi, modalities=("text", "audio"))
    quiet = {"progress": False, "log": lambda _: None}
    whole = tiny_model(data)
    train(whole, data, settings(epochs=2), tmp_path / "whole", **quiet)  # type: ignore[arg-type]

    part = tiny_model(data)
    train(part, data, settings(epochs=1), tmp_path / "part", **quiet)  # type: ignore[arg-type]
    messages: list[str] = []
    resumed = tiny_model(data, seed=99)  # weights come from the run folder, not from here
    result = train(
        resumed, data, settings(epochs=2), tmp_path / "part", progress=False, log=messages.append
    )
    assert any("resuming" in m for m in messages)
    assert [h["epoch"] for h in result.history] == [1, 2]
    # the best epoch's weights are what both return; compare the last states instead
    last_whole = torch.load(tmp_path / "whole" / "state_last.pt", weights_only=False)["model"]
    last_part = torch.load(tmp_path / "part" / "state_last.pt", weights_only=False)["model"]
    for key, value in last_whole.items():
        torch.testing.assert_close(last_part[key], value, rtol=0, atol=1e-6)


def test_run_folder_of_another_run_is_refused(tiny_mosi: Path, tmp_path: Path) -> None:
    data = load_mmsa_pickle(tiny_mosi, modalities=("text",))
    quiet = {"progress": False, "log": lambda _: None}
    train(tiny_model(data), data, settings(epochs=1), tmp_path / "run", **quiet)  # type: ignore[arg-type]
    with pytest.raises(RunMismatchError):
        train(tiny_model(data), data, settings(epochs=1, lr=1e-3), tmp_path / "run", **quiet)  # type: ignore[arg-type]


def test_group_weights_follow_label_spread() -> None:
    import numpy as np

    from model.training.data import Sample
    from model.training.trainer import group_loss_weights

    def sample(label: float, group: str) -> Sample:
        return Sample.from_dense("x", label, {"t": np.ones((1, 1))}, {"t": np.ones(1, bool)}, group)

    wide = [sample(v, "wide") for v in (-2.0, 2.0, -2.0, 2.0)]  # std 2
    narrow = [sample(v, "narrow") for v in (-0.5, 0.5, -0.5, 0.5)]  # std 0.5
    samples = wide + narrow
    assert group_loss_weights(samples, TrainSettings()) == {}
    weights = group_loss_weights(samples, TrainSettings(group_weighting="std"))
    assert weights["narrow"] == pytest.approx(4 * weights["wide"])  # 2 / 0.5
    assert (4 * weights["narrow"] + 4 * weights["wide"]) / 8 == pytest.approx(1.0)
    squared = group_loss_weights(samples, TrainSettings(group_weighting="std", loss="mse"))
    assert squared["narrow"] == pytest.approx(16 * squared["wide"])


def test_selection_numbers_are_higher_is_better() -> None:
    from model.training.trainer import _score_of

    metrics = {"Pearson_r": 0.5, "MAE": 0.8}
    groups = {"a": {"Pearson_r": 0.9}, "b": {"Pearson_r": 0.3}}
    assert _score_of("rated", metrics, groups, "mae") == -0.8
    assert _score_of("rated", metrics, groups, "corr") == 0.5
    assert _score_of("rated", metrics, groups, "group_corr") == pytest.approx(0.6)
    assert _score_of("mosei", {"Corr": 0.4, "MAE": 1.0}, {}, "group_corr") == 0.4
