"""The Triton backend on CPU: its kernel run by Triton's interpreter, and compiled for sm_80/sm_90.

The interpreter costs tens of milliseconds per program and time step, so shapes are tiny: one or
two programs, a handful of steps. CUDA runs are in test_scan_gpu.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from model.ops import coupled_selective_scan

pytest.importorskip("triton")

from model.ops.scan_triton import (
    compile_for_target,
    coupled_selective_scan_triton,
    kernel_module,
)

Factory = Callable[..., dict[str, Any]]
# Triton 3.6's interpreter breaks on `for t in range(L)` with numpy >= 2.4 (NOTES.md).
NUMPY_TOO_NEW = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)
interpreter = pytest.mark.skipif(NUMPY_TOO_NEW, reason="Triton 3.6 interpreter needs numpy < 2.4")
COUPLINGS = ("none", "identity", "mean", "ones", "stochastic", "random")
TINY = dict(batch=1, dim=4, length=3, state=4, dtype=torch.float32)


def check_against_ref(x: dict[str, Any], atol: float = 1e-4, **launch: Any) -> None:
    y_ref, h_ref = coupled_selective_scan(**x, return_last_state=True, backend="ref")
    if launch:
        y, h = coupled_selective_scan_triton(**x, return_last_state=True, **launch)
    else:
        y, h = coupled_selective_scan(**x, return_last_state=True, backend="triton")
    assert y.dtype == x["u"].dtype and y.shape == y_ref.shape and h.shape == h_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=atol, atol=atol)
    torch.testing.assert_close(h, h_ref, rtol=atol, atol=atol)


@interpreter
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_couplings_with_every_option(scan_inputs: Factory, coupling: str) -> None:
    check_against_ref(scan_inputs(coupling=coupling, **TINY))


@interpreter
@pytest.mark.parametrize(
    "options",
    [
        dict(D=False, z=False, delta_bias=False, delta_softplus=False),
        dict(D=True, z=False, delta_bias=False, delta_softplus=False),
        dict(D=False, z=True, delta_bias=False, delta_softplus=False),
        dict(D=False, z=False, delta_bias=True, delta_softplus=True),
        dict(D=False, z=False, delta_bias=False, delta_softplus=True),
    ],
    ids=["plain", "D", "z", "bias+softplus", "softplus"],
)
def test_options(scan_inputs: Factory, options: dict[str, bool]) -> None:
    check_against_ref(scan_inputs(coupling="stochastic", **TINY, **options))


@interpreter
@pytest.mark.parametrize("M", [1, 2, 4])
def test_modality_counts(scan_inputs: Factory, M: int) -> None:
    check_against_ref(scan_inputs(M=M, coupling="random", **TINY))


def test_too_many_modalities(scan_inputs: Factory) -> None:
    x = scan_inputs(M=5, **TINY)
    with pytest.raises(ValueError, match="at most 4 modalities"):
        coupled_selective_scan(**x, backend="triton")


@interpreter
def test_odd_sizes_several_blocks(scan_inputs: Factory) -> None:
    # D = 6 over blocks of 4 (a partial block), N = 3 padded to 4, two batch rows, L = 2.
    x = scan_inputs(coupling="stochastic", batch=2, dim=6, length=2, state=3, dtype=torch.float32)
    check_against_ref(x, block_d=4)


@interpreter
@pytest.mark.parametrize(("M", "length"), [(3, 5), (2, 2)])
def test_time_tiles(scan_inputs: Factory, M: int, length: int) -> None:
    # Tiles of 4 steps; L = 5 leaves a partial last tile whose extra steps must not move the state.
    x = scan_inputs(M=M, coupling="random", batch=1, dim=6, length=length, state=3)
    check_against_ref({k: v.float() if isinstance(v, torch.Tensor) else v for k, v in x.items()},
                      block_d=4, time_tile=4)  # fmt: skip


@interpreter
def test_single_step(scan_inputs: Factory) -> None:
    check_against_ref(scan_inputs(coupling="ones", batch=1, dim=3, length=1, state=16))


@interpreter
def test_non_contiguous_inputs(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="random", **TINY)
    for name in ("u", "delta", "z"):
        x[name] = x[name].permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    x["B"] = x["B"].transpose(2, 3).contiguous().transpose(2, 3)
    x["A"] = x["A"].transpose(1, 2).contiguous().transpose(1, 2)
    x["coupling"] = x["coupling"].t().contiguous().t()
    assert not x["u"].is_contiguous() and not x["B"].is_contiguous()
    check_against_ref(x)


@interpreter
def test_float64(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="random", **(TINY | dict(dtype=torch.float64)))
    check_against_ref(x, atol=1e-10)


@interpreter
def test_bfloat16_output_dtype(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="mean", **(TINY | dict(dtype=torch.bfloat16)))
    y = coupled_selective_scan(**x, backend="triton")
    y_ref = coupled_selective_scan(**x, backend="ref")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@interpreter
def test_backward_matches_ref(
    scan_inputs: Factory, grad_leaves: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    x = grad_leaves(scan_inputs(coupling="stochastic", **TINY))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling"]
    grads = {}
    for backend in ("ref", "triton"):
        y, h = coupled_selective_scan(**x, return_last_state=True, backend=backend)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + h.sum()
        grads[backend] = torch.autograd.grad(loss, [x[n] for n in names])
    for name, got, expected in zip(names, grads["triton"], grads["ref"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)


@interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize(("name", "value"), [("B", float("nan")), ("delta", float("inf"))])
def test_non_finite_found_by_the_kernel(scan_inputs: Factory, name: str, value: float) -> None:
    x = scan_inputs(coupling="mean", **TINY)
    x[name] = x[name].clone()
    x[name].view(-1)[-1] = value
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or inf\) in {name}$"):
        coupled_selective_scan(**x, backend="triton")


def test_interpreted_and_compiled_kernels_coexist() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    interpreted = kernel_module(interpret=True)
    compiled = kernel_module(interpret=False)
    assert isinstance(interpreted.coupled_scan_fwd_kernel, InterpretedFunction)
    assert isinstance(compiled.coupled_scan_fwd_kernel, JITFunction)


@pytest.mark.parametrize(
    ("arch", "dtype", "M", "options", "time_tile"),
    [
        (90, torch.float32, 3, True, 1),
        (90, torch.float32, 3, False, 1),
        (90, torch.float64, 3, True, 1),
        (90, torch.float32, 4, True, 1),
        (80, torch.float32, 1, True, 1),
        (90, torch.float32, 3, True, 8),
    ],
)
def test_kernel_compiles_for_gpu_without_one(
    arch: int, dtype: torch.dtype, M: int, options: bool, time_tile: int
) -> None:
    """The kernel lowers all the way to a cubin for sm_80 / sm_90 on this CPU-only machine."""
    asm = compile_for_target(
        arch=arch, dtype=dtype, modalities=M, with_options=options, time_tile=time_tile
    )
    assert len(asm["cubin"]) > 1000
    assert re.search(rf"\.target\s+sm_{arch}", asm["ptx"])
    if dtype == torch.float32 and M == 3:
        # No register spills to local memory in the default fp32 configuration.
        assert ".local" not in asm["ptx"]
