"""The fast path (scan backend, conv, optional kernels) is chosen once per device and logged."""

from __future__ import annotations

import logging
import sys
import typing

import pytest
import torch
import torch.nn.functional as F

import model.mamba as mamba
from model import ops
from model.ops import fast_path
from model.ops.fast_path import (
    ChannelScan,
    RowsScan,
    causal_conv_rows,
    choose_fast_path,
)
from model.ops.mamba_kernels import KernelChoice

LOGGER = "model.ops.fast_path"


def test_cpu_choice_is_logged_with_its_reasons(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        path = choose_fast_path("cpu", "learned")
    assert path.scan_backend == "torch" and path.kernels == KernelChoice()
    assert isinstance(path.scan, RowsScan) and path.conv is causal_conv_rows
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "scan backend torch" in message and "triton) runs on CUDA only" in message
    assert "causal-conv1d runs on CUDA only" in message and "mamba-ssm runs on CUDA only" in message


def test_a_named_backend_is_kept_and_said_so() -> None:
    path = choose_fast_path("cpu", "none", "ref")
    assert path.scan_backend == "ref" and path.reasons[0] == "ref asked for by name"
    assert isinstance(path.scan, ChannelScan) and path.scan.backend == "ref"
    with pytest.raises(ValueError, match="unknown scan backend 'fastest'"):
        choose_fast_path("cpu", "none", "fastest")


def test_why_the_gpu_kernels_were_not_usable_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (a device name is enough: nothing runs here), an unusable triton or kernel
    package is reported with the import error, not swallowed."""
    if "causal_conv1d" in sys.modules or "mamba_ssm" in sys.modules:
        pytest.skip("the packages are importable here")
    monkeypatch.setattr(ops, "_triton_unusable_reason", lambda: "ImportError: no triton here")
    path = choose_fast_path(torch.device("cuda"), "none")
    assert path.scan_backend == "torch"
    assert path.reasons[0] == "auto on cuda: triton is not usable (ImportError: no triton here)"
    assert "No module named 'causal_conv1d'" in path.reasons[1]
    assert path.reasons[2] == "uncoupled scan: ours (scan backend 'torch' asked for)"


def test_the_model_chooses_once(make_model, batch_of, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(*args: object, **kwargs: object) -> fast_path.FastPath:
        calls.append(args)
        return choose_fast_path(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mamba, "choose_fast_path", counting)
    model = make_model()
    features, masks = batch_of([9, 5])
    assert calls == []  # nothing is chosen before the device is final
    with torch.no_grad():
        first = model(features, masks).score
        model.set_inference_chunk_size(4)  # chunked: every chunk and layer reuses the choice
        again = model(features, masks).score
    model(features, masks).score.sum().backward()  # training uses the same choice
    assert len(calls) == 1 and model.scan_backend == "torch"
    torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)


def test_a_device_move_chooses_again_for_the_new_device(make_model) -> None:
    model = make_model(scan_backend="ref")
    cpu_path = model.fast_path
    assert cpu_path.device == torch.device("cpu") and cpu_path.scan_backend == "ref"
    model.double()  # not a move: the choice stays
    assert model.fast_path is cpu_path
    model.set_kernels("torch", None)
    forced = model.fast_path
    model.to("meta")  # a move (the meta device stands in for a GPU here)
    assert model.fast_path is not forced and model.fast_path.device.type == "meta"
    assert model.scan_backend == "ref"  # the request is kept and resolved again
    model.set_scan_backend("auto")
    model.to_empty(device="cpu")  # back (a meta tensor has no data to copy)
    assert model.fast_path.device.type == "cpu" and model.scan_backend == "torch"


@pytest.mark.parametrize("with_state", [False, True])
def test_the_rows_conv_is_the_causal_depthwise_conv(with_state: bool) -> None:
    """``causal_conv_rows`` equals nn.Conv1d's causal conv + SiLU, and a carried state
    continues a sequence; forward and backward."""
    g = torch.Generator().manual_seed(3)
    batch, length, dim, width = 2, 9, 5, 4
    x = torch.randn(batch, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(dim, width, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dim, generator=g, dtype=torch.float64)

    def reference(x: torch.Tensor) -> torch.Tensor:  # (b, L, D) -> (b, L, D)
        out = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=width - 1, groups=dim)
        return F.silu(out[..., : x.shape[1]]).transpose(1, 2)

    if with_state:
        split = 4
        head, state = causal_conv_rows(x[:, :split], weight, bias, None, True)
        assert state is not None and state.shape == (batch, dim, width - 1)
        tail, _ = causal_conv_rows(x[:, split:], weight, bias, state, False)
        got = torch.cat([head, tail], dim=1)
    else:
        got, state = causal_conv_rows(x, weight, bias, None, False)
        assert state is None
    want = reference(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.square().sum(), [x, weight])
    want_grads = torch.autograd.grad(want.square().sum(), [x, weight])
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_triton_backend_through_the_model(make_model, batch_of) -> None:
    """The model's triton path (its kernel in the interpreter here) answers like torch."""
    pytest.importorskip("triton")
    features, masks = batch_of([6, 4])
    answers = {}
    for backend in ("torch", "triton"):
        model = make_model(scan_backend=backend, d_model=8, d_state=4, n_layers=1)
        assert isinstance(model.fast_path.scan, RowsScan if backend == "torch" else ChannelScan)
        with torch.no_grad():
            answers[backend] = model(features, masks)
    for name in ("score", "probabilities", "modality_weights"):
        torch.testing.assert_close(
            getattr(answers["triton"], name), getattr(answers["torch"], name), rtol=1e-5, atol=1e-6
        )


def test_service_settings_name_the_backends_the_model_has() -> None:
    from service.settings import ScanBackendName

    assert typing.get_args(ScanBackendName) == ("auto", *ops.BACKENDS)
