"""The import direction of docs/ARCHITECTURE.md and the shared vocabulary's one definition."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

import preprocessing
from model.config import CLASS_NAMES, MODALITY_ORDER, CoupledMambaConfig
from service.api.schemas import Sentiment
from service.cli import build_parser
from service.commands._training import model_config_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    # The same check as `make lint`; import-linter comes with the dev extras.
    cli = pytest.importorskip("importlinter.cli")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_the_vocabulary_and_the_command_line_read_no_torch() -> None:
    # model/__init__ imports its names lazily: the HTTP schemas and the CLI's argument defaults
    # read model.config without loading the network.
    code = (
        "import sys; import model.config, service.api.schemas, service.core.types; "
        "from service.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_preprocessing_spells_the_modalities_as_the_model_does() -> None:
    # model and preprocessing never import each other; each holds the names once, and this
    # test keeps the two in step.
    assert preprocessing.MODALITIES == MODALITY_ORDER == ("text", "audio", "visual")


def test_the_api_labels_are_the_model_classes() -> None:
    label = Sentiment.model_fields["label"].annotation
    assert get_args(label) == CLASS_NAMES == ("negative", "neutral", "positive")


def test_train_command_defaults_are_the_model_config_defaults() -> None:
    args = build_parser("train").parse_args(["train", "data.pkl", "--out", "ckpt"])
    overrides = model_config_overrides(args)
    defaults = {f.name: f.default for f in dataclasses.fields(CoupledMambaConfig)}
    assert overrides == {name: defaults[name] for name in overrides}
    assert args.modalities is None  # all the data has


def test_command_choices_are_the_model_config_choices() -> None:
    parser = build_parser("train")
    for flag, field in (("--coupling", "state_coupling"), ("--pooling", "pooling")):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "d.pkl", "--out", "o", flag, "no-such-choice"])
        value = {"state_coupling": "sum", "pooling": "last"}[field]
        args = parser.parse_args(["train", "d.pkl", "--out", "o", flag, value])
        assert CoupledMambaConfig(**model_config_overrides(args)).to_dict()[field] == value
    extract = build_parser("extract").parse_args(["extract", "clips.csv", "--out", "d.pkl"])
    assert tuple(extract.modalities) == preprocessing.MODALITIES
