"""`cmamba extract` on real shared clips: MMSA layout out, resumable, failures listed."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from model.training.data import load_mmsa_pickle
from preprocessing.dataset import extract_dataset, read_media_csv, split_for_key

MEDIA = Path(__file__).resolve().parents[2].parent / "shared" / "media"


def test_read_media_csv_checks_rows(tmp_path: Path) -> None:
    csv = tmp_path / "clips.csv"
    csv.write_text("path,label,transcript\nclips/a.mp4,1.5,hello there\nb.mp4,x,\n")
    with pytest.raises(ValueError, match=r"clips\.csv:3"):
        read_media_csv(csv)
    csv.write_text("path,label\nclips/a.mp4,1.5\n/abs/b.mp4,-2\n")
    first, second = read_media_csv(csv)
    assert first.path == tmp_path / "clips" / "a.mp4" and first.transcript is None
    assert second.path == Path("/abs/b.mp4") and second.label == -2.0
    assert first.split == split_for_key("clips/a.mp4")


@pytest.mark.skipif(not MEDIA.is_dir(), reason="shared media not present")
def test_extract_writes_mmsa_layout_and_resumes(tmp_path: Path) -> None:
    csv = tmp_path / "clips.csv"
    csv.write_text(
        "path,label,transcript,split\n"
        f"{MEDIA / 'cremad_1001_DFA_HAP_XX.mp4'},1.0,Don't forget a jacket,train\n"
        f"{MEDIA / 'cremad_1001_DFA_ANG_XX.mp4'},-2.0,Don't forget a jacket,valid\n"
        f"{MEDIA / 'obama.jpg'},1.0,,test\n"
    )
    out = tmp_path / "clips.pkl"
    logs: list[str] = []
    report = extract_dataset(
        csv, out, modalities=("text", "visual"), progress=False, log=logs.append
    )
    assert (report.total, report.extracted, report.reused) == (3, 2, 0)
    assert list(report.failed) == [str(MEDIA / "obama.jpg")]

    with out.open("rb") as handle:
        raw = pickle.load(handle)
    assert raw["meta"]["feature_profile"] == "default-v1"
    train = raw["train"]
    assert train["text"].shape[0] == 1 and train["text"].shape[2] == 384
    assert train["vision"].shape[2] == 17
    assert train["text_masks"].shape == train["text"].shape[:2]
    assert train["vision_masks"][0].sum() > 0  # the actor's face was found
    assert train["regression_labels"].tolist() == [1.0]
    assert len(raw["test"]["id"]) == 0

    data = load_mmsa_pickle(out)
    assert data.modalities == ("text", "visual")
    (sample,) = data.splits["train"]
    features, mask = sample.dense("visual")
    width = sample.length
    np.testing.assert_array_equal(mask, train["vision_masks"][0, :width])
    np.testing.assert_allclose(
        features[mask], train["vision"][0, :width][mask], rtol=1e-3, atol=1e-3
    )

    again = extract_dataset(
        csv, out, modalities=("text", "visual"), progress=False, log=logs.append
    )
    assert (again.extracted, again.reused) == (0, 2)
    with pytest.raises(ValueError, match="other settings"):
        extract_dataset(csv, out, modalities=("text",), progress=False, log=logs.append)


@pytest.mark.skipif(not MEDIA.is_dir(), reason="shared media not present")
def test_extract_with_a_checkpoints_text_encoder(tmp_path: Path) -> None:
    from model.checkpoints import default_checkpoint_path
    from preprocessing import Extractor, ExtractorSettings
    from service.cli import main as cli_main

    layers = default_checkpoint_path() / "text_encoder.safetensors"
    clip = MEDIA / "cremad_1001_DFA_HAP_XX.mp4"
    csv = tmp_path / "clips.csv"
    csv.write_text(f"path,label,transcript,split\n{clip},1.0,What a lovely surprise,train\n")
    out = tmp_path / "tuned.pkl"
    with pytest.raises(SystemExit) as exit_code:
        cli_main(
            ["extract", str(csv), "--out", str(out), "--modalities", "text", "--quiet",
             "--text-encoder", str(layers)]
        )  # fmt: skip
    assert exit_code.value.code == 0
    with out.open("rb") as handle:
        raw = pickle.load(handle)
    assert raw["meta"]["feature_profile"] == "tuned-text-v1"
    text = raw["train"]["text"][0]

    def features(settings: ExtractorSettings) -> np.ndarray:
        bundle = Extractor(settings, modalities=("text",)).extract(
            clip, transcript="What a lovely surprise"
        )
        return bundle.features["text"]

    tuned = features(ExtractorSettings(text_tuning_path=layers))
    np.testing.assert_allclose(text[: len(tuned)], tuned, atol=1e-3)
    assert not np.allclose(text[: len(tuned)], features(ExtractorSettings()), atol=1e-2)

    # The parts folder remembers which layers made its features.
    with pytest.raises(ValueError, match="other settings"):
        extract_dataset(csv, out, modalities=("text",), progress=False)
