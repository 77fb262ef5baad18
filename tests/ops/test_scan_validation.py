"""Bad inputs get a ValueError naming the argument; backend selection; lazy triton import."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from model.ops import BACKENDS, coupled_selective_scan, select_backend

Factory = Callable[..., dict[str, Any]]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("u", lambda x: x["u"][0], "u must have 4 dimensions"),
        ("delta", lambda x: x["delta"][..., :-1], "delta must have shape"),
        ("A", lambda x: x["A"][:, :, None], "A must have 3 dimensions"),
        ("A", lambda x: x["A"][:2], "A has 2 modalities but u has M = 3"),
        ("B", lambda x: x["B"][:, :, :-1], "B must have shape"),
        ("B", lambda x: x["B"][:2], "B must have shape"),
        ("C", lambda x: x["C"][..., None], "C must have 4 dimensions"),
        ("C", lambda x: x["C"][:, :1], "C must have shape"),
        ("D", lambda x: x["D"][:, :-1], "D must have shape"),
        ("z", lambda x: x["z"].transpose(2, 3), "z must have shape"),
        ("delta_bias", lambda x: x["delta_bias"][None], "delta_bias must have 2 dimensions"),
        ("coupling", lambda x: x["coupling"][:2], "coupling must have shape"),
        ("coupling", lambda x: torch.ones(3, 3, dtype=torch.int64), "coupling must be a floating"),
        ("u", lambda x: x["u"][:, :, :, :0], "every size >= 1"),
        ("B", lambda x: x["B"].numpy(), "B must be a torch.Tensor"),
        ("z", lambda x: torch.zeros(x["z"].shape, device="meta"), "z is on meta but u is on cpu"),
    ],
)
@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_bad_shapes_name_the_argument(
    scan_inputs: Factory,
    name: str,
    bad: Callable[[dict[str, Any]], Any],
    message: str,
    backend: str,
) -> None:
    x = scan_inputs(coupling="mean")
    x[name] = bad(x)
    with pytest.raises(ValueError, match=message):
        coupled_selective_scan(**x, backend=backend)


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_non_finite_inputs_name_the_argument(
    scan_inputs: Factory, name: str, value: float, backend: str
) -> None:
    x = scan_inputs(coupling="mean")
    x[name] = x[name].clone()
    x[name].view(-1)[-1] = value
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in {name}$"):
        coupled_selective_scan(**x, backend=backend)


def test_several_non_finite_inputs_are_all_named(scan_inputs: Factory) -> None:
    x = scan_inputs()
    x["B"] = x["B"].clone()
    x["B"][0, 0, 0, 0] = float("nan")
    x["D"] = x["D"].clone()
    x["D"][1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"in B, D$"):
        coupled_selective_scan(**x, backend="torch")


def test_unknown_backend(scan_inputs: Factory) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        coupled_selective_scan(**scan_inputs(), backend="cuda")


def test_select_backend_on_cpu() -> None:
    assert select_backend("cpu") == "torch"
    assert select_backend(torch.device("cpu")) == "torch"


def test_importing_ops_does_not_import_triton() -> None:
    code = (
        "import sys, model.ops, model.ops.scan_triton; "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
