"""CUDA equivalence of the scan backends (run by scripts/gpu_check.sh; skipped without a GPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from model.ops import coupled_selective_scan, select_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

Factory = Callable[..., dict[str, Any]]
COUPLINGS = ("none", "identity", "mean", "ones", "stochastic", "random")


def to(x: dict[str, Any], device: str, dtype: torch.dtype | None = None) -> dict[str, Any]:
    return {
        k: (v.to(device=device, dtype=dtype or v.dtype) if isinstance(v, torch.Tensor) else v)
        for k, v in x.items()
    }


def reference(x: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """ref in float64 on the CPU, from the same input values."""
    y, h = coupled_selective_scan(
        **to(x, "cpu", torch.float64), return_last_state=True, backend="ref"
    )
    return y, h


def test_select_backend_picks_triton_on_cuda() -> None:
    assert select_backend("cuda") == "triton"
    assert select_backend("cpu") == "torch"


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", [True, False], ids=["all-options", "plain"])
def test_triton_forward_matches_ref(
    scan_inputs: Factory, coupling: str, dtype: torch.dtype, options: bool
) -> None:
    x = scan_inputs(
        coupling=coupling, batch=3, dim=37, length=45, state=16, dtype=dtype,
        D=options, z=options, delta_bias=options, delta_softplus=options,
    )  # fmt: skip
    y_ref, h_ref = reference(x)
    y, h = coupled_selective_scan(**to(x, "cuda"), return_last_state=True, backend="triton")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    scale = max(1.0, float(y_ref.abs().max()))  # W = ones grows the state over 45 steps
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(h.cpu().double(), h_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("block_d", [8, 16, 32])
@pytest.mark.parametrize("num_warps", [1, 2, 4])
@pytest.mark.parametrize("time_tile", [1, 8])
def test_every_benchmarked_launch_config_is_correct(
    scan_inputs: Factory, block_d: int, num_warps: int, time_tile: int
) -> None:
    from model.ops.scan_triton import coupled_selective_scan_triton

    x = scan_inputs(
        coupling="stochastic", batch=2, dim=100, length=33, state=16, dtype=torch.float32
    )
    y_ref, h_ref = reference(x)
    y, h = coupled_selective_scan_triton(
        **to(x, "cuda"),
        return_last_state=True,
        block_d=block_d,
        num_warps=num_warps,
        time_tile=time_tile,
    )
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.cpu().double(), h_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("state", [1, 5, 64])
def test_modalities_and_state_sizes(scan_inputs: Factory, M: int, state: int) -> None:
    x = scan_inputs(
        M=M, coupling="random", batch=2, dim=19, length=9, state=state, dtype=torch.float32
    )
    y_ref, _ = reference(x)
    y = coupled_selective_scan(**to(x, "cuda"), backend="triton")
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)


def test_non_contiguous_and_half_precision(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="mean", batch=2, dim=24, length=20, state=16, dtype=torch.float32)
    y_ref, _ = reference(x)
    g = to(x, "cuda")
    for name in ("u", "delta", "z"):  # time-major storage, like a (b, L, D) activation permuted
        g[name] = g[name].permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    y = coupled_selective_scan(**g, backend="triton")
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)
    y16 = coupled_selective_scan(**to(x, "cuda", torch.bfloat16), backend="triton")
    assert y16.dtype == torch.bfloat16
    y16_ref = coupled_selective_scan(**to(x, "cpu", torch.bfloat16), backend="ref")
    torch.testing.assert_close(y16.cpu().float(), y16_ref.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backward_matches_ref(
    scan_inputs: Factory,
    grad_leaves: Callable[[dict[str, Any]], dict[str, Any]],
    backend: str,
    dtype: torch.dtype,
) -> None:
    x = scan_inputs(coupling="stochastic", batch=2, dim=12, length=40, state=8, dtype=dtype)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling"]
    grads = {}
    for where, inputs in (("cpu", to(x, "cpu", torch.float64)), ("cuda", to(x, "cuda"))):
        leaves = grad_leaves(inputs)
        run = "ref" if where == "cpu" else backend
        y, h = coupled_selective_scan(**leaves, return_last_state=True, backend=run)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
        loss = (y * weights).sum() + h.sum()
        grads[where] = torch.autograd.grad(loss, [leaves[n] for n in names])
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    for name, got, expected in zip(names, grads["cuda"], grads["cpu"], strict=True):
        torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling"])
def test_non_finite_detected_on_gpu(scan_inputs: Factory, name: str) -> None:
    x = to(scan_inputs(coupling="mean", dim=40, length=17, dtype=torch.float32), "cuda")
    x[name] = x[name].clone()
    x[name].view(-1)[-1] = float("nan")
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in {name}$"):
        coupled_selective_scan(**x, backend="triton")


def test_benchmark_shape_triton_equals_torch_backend(scan_inputs: Factory) -> None:
    """32 x 500 x 512, d_state 16, M 3 (the benchmark's largest shape) with Mamba-like inputs."""
    x = to(
        scan_inputs(coupling="mean", batch=32, dim=512, length=500, state=16, dtype=torch.float32),
        "cuda",
    )
    x["delta"] = x["delta"] * 0.1
    y_triton = coupled_selective_scan(**x, backend="triton")
    y_torch = coupled_selective_scan(**x, backend="torch")
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("coupling", ["none", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_triton_initial_state_matches_ref(
    scan_inputs: Factory, coupling: str, dtype: torch.dtype
) -> None:
    x = scan_inputs(coupling=coupling, batch=2, dim=37, length=21, state=16, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    x["initial_state"] = torch.randn(3, 2, 37, 16, generator=g, dtype=dtype)
    y_ref, h_ref = reference(x)
    y, h = coupled_selective_scan(**to(x, "cuda"), return_last_state=True, backend="triton")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h.cpu().double(), h_ref, rtol=tol, atol=tol)
