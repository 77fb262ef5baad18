"""CoupledMambaConfig: defaults, validation, serialisation and version upgrades."""

from __future__ import annotations

import json

import pytest

import model.config as config_module
from model import CONFIG_VERSION, ConfigError, CoupledMambaConfig


def test_defaults_follow_the_paper() -> None:
    config = CoupledMambaConfig()
    assert config.modalities == ("text", "audio", "visual")
    assert (config.d_model, config.d_conv, config.expand, config.n_layers) == (128, 4, 2, 3)
    assert config.d_inner == 256 and config.resolved_dt_rank == 16
    assert config.state_coupling in ("mean", "learned")
    assert config.n_classes == 3


def test_round_trip_through_json(config_of) -> None:
    config = config_of(
        modalities=("audio", "visual"),
        dt_rank=5,
        label_scale=(-1, 1),
        neutral_band=0.1,
        state_coupling="sum",
        feature_mixing=True,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["config_version"] == CONFIG_VERSION
    assert data["feature_dims"] == {"audio": 5, "visual": 6}  # text's size is dropped
    assert CoupledMambaConfig.from_dict(data) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modalities": ()}, "at least one"),
        ({"modalities": ("audio", "text")}, "order"),
        ({"modalities": ("text", "smell")}, "unknown modalities"),
        ({"feature_dims": {"text": 7}}, "no size"),
        ({"feature_dims": {"text": 0, "audio": 5, "visual": 6}}, "positive"),
        ({"d_model": 0}, "d_model"),
        ({"d_state": 2.5}, "d_state"),
        ({"dt_rank": "half"}, "dt_rank"),
        ({"state_coupling": "product"}, "state_coupling"),
        ({"pooling": "median"}, "pooling"),
        ({"fusion": "attention"}, "fusion"),
        ({"norm": "batchnorm"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_scale": (1.0, -1.0)}, "label_scale"),
        ({"n_classes": 2}, "n_classes"),
        ({"neutral_band": 3.0}, "neutral_band"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
    ],
)
def test_invalid_fields_are_named(config_of, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_of(**overrides)


def test_unknown_and_missing_versions_are_refused(config_of) -> None:
    data = config_of().to_dict()
    with pytest.raises(ConfigError, match=f"config_version {CONFIG_VERSION + 1} is not supported"):
        CoupledMambaConfig.from_dict(dict(data, config_version=CONFIG_VERSION + 1))
    with pytest.raises(ConfigError, match="not supported"):
        CoupledMambaConfig.from_dict(dict(data, config_version=0))
    with pytest.raises(ConfigError, match="no 'config_version'"):
        CoupledMambaConfig.from_dict({k: v for k, v in data.items() if k != "config_version"})
    with pytest.raises(ConfigError, match=r"unknown fields \['colour'\]"):
        CoupledMambaConfig.from_dict(dict(data, colour="blue"))
    without_pooling = {k: v for k, v in data.items() if k != "pooling"}
    with pytest.raises(ConfigError, match=r"missing fields \['pooling'\]"):
        CoupledMambaConfig.from_dict(without_pooling)
    assert CoupledMambaConfig.from_dict(without_pooling, strict=False).pooling == "mean"


def test_old_versions_are_upgraded_step_by_step(config_of, monkeypatch) -> None:
    """Pretend the code is at version 3 with two upgrade steps; a version-1 dict must go
    through both, in order."""
    current = config_of().to_dict()
    old = {k: v for k, v in current.items() if k != "pooling"}
    old["pool"] = "last"  # a field a future version renamed
    old["config_version"] = 1
    seen: list[int] = []

    def one_to_two(data):
        seen.append(1)
        data["pooling"] = data.pop("pool")
        return data

    def two_to_three(data):
        seen.append(2)
        data["neutral_band"] = data["neutral_band"] * 2
        return data

    monkeypatch.setattr(config_module, "CONFIG_VERSION", 3)
    monkeypatch.setattr(config_module, "_UPGRADES", {1: one_to_two, 2: two_to_three})
    upgraded = CoupledMambaConfig.from_dict(old)
    assert seen == [1, 2]
    assert upgraded.pooling == "last" and upgraded.neutral_band == 2 * current["neutral_band"]
    monkeypatch.setattr(config_module, "_UPGRADES", {2: two_to_three})
    with pytest.raises(ConfigError, match="no upgrade from config_version 1"):
        CoupledMambaConfig.from_dict(old)


def test_version_1_configs_gain_an_empty_emotion_head(config_of) -> None:
    """Checkpoints written before the emotion head load unchanged: no emotion classes."""
    old = {k: v for k, v in config_of().to_dict().items() if k != "emotion_classes"}
    old["config_version"] = 1
    upgraded = CoupledMambaConfig.from_dict(old)
    assert upgraded.emotion_classes == ()
    with pytest.raises(ConfigError, match="missing fields"):
        CoupledMambaConfig.from_dict(dict(old, config_version=2))


@pytest.mark.parametrize(
    "classes, message",
    [(("happy",), "at least two"), (("happy", "happy"), "unique"), (("happy", ""), "unique")],
)
def test_emotion_classes_are_checked(config_of, classes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_of(emotion_classes=classes)


def test_score_to_class_uses_the_neutral_band(config_of) -> None:
    config = config_of(label_scale=(-3.0, 3.0), neutral_band=0.5)
    assert [config.score_to_class(s) for s in (-3.0, -0.51, -0.5, 0.0, 0.5, 0.51, 3.0)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        2,
    ]
    shifted = config_of(label_scale=(1.0, 5.0), neutral_band=0.0)
    assert [shifted.score_to_class(s) for s in (2.9, 3.0, 3.1)] == [0, 1, 2]


def test_default_dims_match_the_default_preprocessing_profile() -> None:
    profiles = pytest.importorskip("preprocessing.profiles")
    config = CoupledMambaConfig()
    assert dict(profiles.PROFILES[config.feature_profile].dims) == config.feature_dims
