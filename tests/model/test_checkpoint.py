"""Checkpoint folders: exact round trips and clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import (
    CONFIG_VERSION,
    CheckpointError,
    CoupledMambaForSentiment,
    load_checkpoint,
    load_checkpoint_with_info,
    read_checkpoint_config,
    save_checkpoint,
)


@pytest.fixture
def trained(make_model) -> CoupledMambaForSentiment:
    """A model whose every parameter moved away from its init (so a lost tensor shows)."""
    model = make_model(
        state_coupling="learned",
        feature_mixing=True,
        pooling="last",
        emotion_classes=("neutral", "happy", "sad"),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_round_trip_is_bitwise_exact(trained, batch_of, tmp_path: Path) -> None:
    folder = save_checkpoint(
        trained,
        tmp_path / "ckpt",
        training={"dataset": "synthetic", "epochs": 3},
        metrics={"mae": 0.71, "acc2": 0.80},
        name="tiny",
        version="2024.1",
    )
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "MODEL_CARD.md",
    }
    loaded, info = load_checkpoint_with_info(folder, scan_backend=trained.scan_backend)
    assert not loaded.training and loaded.scan_backend == trained.scan_backend
    assert loaded.config == trained.config
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    features, masks = batch_of([9, 5])
    with torch.no_grad():
        a, b = trained(features, masks), loaded(features, masks)
    for name in ("score", "logits", "probabilities", "modality_weights", "emotion_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    assert (info.name, info.version) == ("tiny", "2024.1")
    assert info.metrics == {"mae": 0.71, "acc2": 0.80}
    assert info.training == {"dataset": "synthetic", "epochs": 3}
    assert info.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert "tiny" in info.model_card and "learned" in info.model_card


def test_config_json_carries_the_contract_fields(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path, metrics={"mae": 0.5})
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["config_version"] == CONFIG_VERSION
    assert data["feature_profile"] == "default-v1"
    assert data["label_scale"] == [-3.0, 3.0]
    assert data["feature_dims"] == {"text": 7, "audio": 5, "visual": 6}
    assert data["state_coupling"] == "learned" and data["d_model"] == 16
    assert data["metrics"] == {"mae": 0.5} and data["training"] == {}
    assert data["checkpoint"]["parameters"] == trained.count_parameters()
    config, raw = read_checkpoint_config(tmp_path)
    assert config == trained.config and raw["checkpoint"]["name"] == tmp_path.name


def test_custom_and_default_model_cards(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path / "a", model_card="# Mine\n")
    assert (tmp_path / "a" / "MODEL_CARD.md").read_text() == "# Mine\n"
    save_checkpoint(trained, tmp_path / "b", metrics={"corr": 0.61234})
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "corr: 0.6123" in card and "default-v1" in card and "Not recorded" in card


def test_scan_backend_is_chosen_at_load(trained, tmp_path: Path) -> None:
    from model import ops

    save_checkpoint(trained, tmp_path)
    assert load_checkpoint(tmp_path, scan_backend="ref").scan_backend == "ref"
    auto = load_checkpoint(tmp_path).scan_backend
    select = getattr(ops, "select_backend", None)
    assert auto == (select("cpu") if select else "ref")
    with pytest.raises(ValueError, match="unknown scan backend"):
        load_checkpoint(tmp_path, scan_backend="fastest")


def test_expected_sha256(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    load_checkpoint(tmp_path, expected_sha256=digest.upper())
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path, expected_sha256="0" * 64)


def _rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("layers.1.mixers.audio.A_log"), r"missing tensors \['layers.1"),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensors \['extra'\]"),
        (
            lambda t: t.update({"fusion.prior": torch.zeros(4)}),
            r"mismatched tensors \[fusion.prior: file \(4,\)",
        ),
        (
            lambda t: t.update({"fusion.prior": torch.zeros(3, dtype=torch.float64)}),
            "torch.float64",
        ),
    ],
)
def test_bad_tensors_get_clear_errors(trained, tmp_path: Path, change, message) -> None:
    save_checkpoint(trained, tmp_path)
    _rewrite_weights(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_config_from_another_architecture_is_refused(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["d_state"] = 4
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="mismatched tensors"):
        load_checkpoint(tmp_path)


def test_bad_folders_and_configs(trained, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(trained, tmp_path)
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(data, config_version=CONFIG_VERSION + 1)))
    with pytest.raises(CheckpointError, match="not supported"):
        load_checkpoint(tmp_path)
    config_path.write_text(json.dumps(dict(data, pooling="median")))
    with pytest.raises(CheckpointError, match="pooling"):
        load_checkpoint(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    config_path.write_text(json.dumps(data))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_matches_cpu(trained, batch_of, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path)
    gpu = load_checkpoint(tmp_path, device="cuda")  # backend chosen for the GPU
    assert gpu.device.type == "cuda"
    features, masks = batch_of([7, 12, 3])
    masks["visual"][1, 4:6] = False
    with torch.no_grad():
        want = trained(features, masks)
        got = gpu(
            {m: f.cuda() for m, f in features.items()}, {m: k.cuda() for m, k in masks.items()}
        )
    for name in ("score", "logits", "probabilities", "modality_weights"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), rtol=0, atol=1e-4)


def test_loading_leaves_the_global_rng_alone(trained, tmp_path: Path) -> None:
    save_checkpoint(trained, tmp_path)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_checkpoint(tmp_path)
    assert torch.equal(torch.rand(3), expected)


def _tuning_file(path: Path) -> Path:
    save_file({"encoder.layer.5.output.dense.bias": torch.linspace(-1, 1, 384)}, str(path))
    return path


def test_text_encoder_ships_in_the_folder_and_is_checked(make_model, tmp_path: Path) -> None:
    model = make_model(feature_profile="tuned-text-v1")
    source = _tuning_file(tmp_path / "layers.safetensors")
    folder = save_checkpoint(
        model, tmp_path / "ckpt", text_encoder=source, text_encoder_info={"tuned_layers": [5]}
    )
    shipped = folder / "text_encoder.safetensors"
    assert shipped.read_bytes() == source.read_bytes()
    section = json.loads((folder / "config.json").read_text())["text_encoder"]
    assert section["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert section["tuned_layers"] == [5] and section["file"] == shipped.name

    info = load_checkpoint_with_info(folder).info
    assert info.text_encoder is not None
    assert Path(info.text_encoder["path"]) == shipped.resolve()
    assert info.text_encoder["sha256"] == section["sha256"]

    data = bytearray(shipped.read_bytes())
    data[-1] ^= 0x01
    shipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(folder)
    shipped.unlink()
    with pytest.raises(CheckpointError, match=r"has no text_encoder\.safetensors"):
        load_checkpoint(folder)

    # Saving again without a text encoder removes the stale file and the section.
    plain = make_model()
    save_checkpoint(plain, folder)
    assert not shipped.exists()
    assert load_checkpoint_with_info(folder).info.text_encoder is None


def test_text_encoder_and_profile_must_agree(make_model, tmp_path: Path) -> None:
    layers = _tuning_file(tmp_path / "layers.safetensors")
    with pytest.raises(CheckpointError, match="tuned-text-v1"):
        save_checkpoint(make_model(), tmp_path / "a", text_encoder=layers)
    with pytest.raises(CheckpointError, match="needs the text encoder"):
        save_checkpoint(make_model(feature_profile="tuned-text-v1"), tmp_path / "b")
    folder = save_checkpoint(
        make_model(feature_profile="tuned-text-v1"), tmp_path / "c", text_encoder=layers
    )
    config = json.loads((folder / "config.json").read_text())
    del config["text_encoder"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no text_encoder section"):
        load_checkpoint(folder)


def test_multimodal_checkpoint_ships_both_encoders_and_pins_them(
    make_model, tmp_path: Path
) -> None:
    layers = _tuning_file(tmp_path / "layers.safetensors")
    face = tmp_path / "face.safetensors"
    save_file({"net.weight": torch.linspace(0, 1, 8)}, str(face))
    model = make_model(feature_profile="multimodal-v1")
    with pytest.raises(CheckpointError, match="needs the face encoder"):
        save_checkpoint(model, tmp_path / "a", text_encoder=layers)
    with pytest.raises(CheckpointError, match="needs feature_profile 'multimodal-v1'"):
        save_checkpoint(
            make_model(feature_profile="tuned-text-v1"), tmp_path / "b", text_encoder=layers,
            face_encoder=face,
        )  # fmt: skip
    folder = save_checkpoint(
        model, tmp_path / "c", text_encoder=layers, face_encoder=face,
        face_encoder_info={"embed_dim": 64},
    )  # fmt: skip
    digest = hashlib.sha256(face.read_bytes()).hexdigest()
    info = load_checkpoint_with_info(folder, expected_face_encoder_sha256=digest).info
    assert info.face_encoder is not None and info.text_encoder is not None
    assert info.face_encoder["embed_dim"] == 64 and info.face_encoder["sha256"] == digest
    assert Path(info.face_encoder["path"]).read_bytes() == face.read_bytes()
    with pytest.raises(CheckpointError, match="face encoder sha256"):
        load_checkpoint(folder, expected_face_encoder_sha256="0" * 64)
    (folder / "face_encoder.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(folder)
