"""``initial_state``: a scan continued from a given state, on every backend, and the lean
inference path of the torch backend (its memory does not grow with L beyond the output)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from model.ops import coupled_selective_scan

Factory = Callable[..., dict[str, Any]]
COUPLINGS = ("none", "mean", "ones", "stochastic", "random")
TENSORS = ("u", "delta", "B", "C", "z")  # the inputs with a time axis


def split(x: dict[str, Any], at: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inputs of steps [0, at) and [at, L)."""
    first, second = dict(x), dict(x)
    for name in TENSORS:
        if x.get(name) is not None:
            first[name] = x[name][..., :at]
            second[name] = x[name][..., at:]
    return first, second


def random_state(x: dict[str, Any], seed: int = 7) -> torch.Tensor:
    M, batch, dim, _ = x["u"].shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, batch, dim, x["A"].shape[-1], generator=g, dtype=x["u"].dtype)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_ref_initial_state_continues_a_scan(scan_inputs: Factory, coupling: str) -> None:
    """The spec: h[:, -1] = initial_state. Two calls chained through the last state equal one."""
    x = scan_inputs(coupling=coupling, length=9)
    y, h = coupled_selective_scan(**x, return_last_state=True, backend="ref")
    first, second = split(x, 4)
    y1, h1 = coupled_selective_scan(**first, return_last_state=True, backend="ref")
    y2, h2 = coupled_selective_scan(
        **second, return_last_state=True, backend="ref", initial_state=h1
    )
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)
    # and the state matters: starting the second half from zeros gives another answer
    y_zero = coupled_selective_scan(**second, backend="ref")
    assert (y_zero - y2).abs().max() > 1e-3


def test_ref_one_step_from_a_given_state(scan_inputs: Factory) -> None:
    """One step from h0, written out: h = exp(dt A) * (W h0) + dt B u, y = C . h (+ D u)."""
    x = scan_inputs(coupling="random", length=1, z=False, delta_bias=False, delta_softplus=False)
    h0 = random_state(x)
    y, h = coupled_selective_scan(**x, return_last_state=True, backend="ref", initial_state=h0)
    dt, u = x["delta"][..., 0], x["u"][..., 0]  # (M, b, D)
    mixed = torch.einsum("mk,kbdn->mbdn", x["coupling"], h0)
    want_h = (
        torch.exp(dt[..., None] * x["A"][:, None]) * mixed
        + (dt * u)[..., None] * x["B"][:, :, None, :, 0]
    )
    want_y = (want_h * x["C"][:, :, None, :, 0]).sum(-1) + x["D"][:, None, :] * u
    torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[..., 0], want_y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_torch_initial_state_matches_ref(scan_inputs: Factory, coupling: str, grad: bool) -> None:
    x = scan_inputs(coupling=coupling, length=37)  # crosses a chunk of 32 steps
    h0 = random_state(x)
    if grad:  # the autograd path keeps every state; the inference path keeps two
        x["u"] = x["u"].requires_grad_(True)
    y_ref, h_ref = coupled_selective_scan(
        **x, return_last_state=True, backend="ref", initial_state=h0
    )
    y, h = coupled_selective_scan(**x, return_last_state=True, backend="torch", initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("coupling", ["none", "random"])
def test_torch_gradients_with_initial_state_match_ref(
    scan_inputs: Factory, grad_leaves: Callable[[dict[str, Any]], dict[str, Any]], coupling: str
) -> None:
    x = scan_inputs(coupling=coupling, length=35)
    x["initial_state"] = random_state(x)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    names += ["coupling"] if coupling != "none" else []
    grads = {}
    for backend in ("ref", "torch"):
        leaves = grad_leaves(x)
        leaves["initial_state"] = x["initial_state"].clone().requires_grad_(True)
        y, h = coupled_selective_scan(**leaves, return_last_state=True, backend=backend)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + h.sum()
        grads[backend] = torch.autograd.grad(loss, [leaves[n] for n in names])
    for name, got, want in zip(names, grads["torch"], grads["ref"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)
    assert grads["ref"][names.index("initial_state")].abs().max() > 1e-3


def test_zero_initial_state_equals_none(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="mean")
    zeros = torch.zeros_like(random_state(x))
    for backend in ("ref", "torch"):
        a = coupled_selective_scan(**x, backend=backend)
        b = coupled_selective_scan(**x, backend=backend, initial_state=zeros)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_initial_state_is_validated(scan_inputs: Factory) -> None:
    x = scan_inputs()
    bad = torch.zeros(3, 2, 5, 3, dtype=torch.float64)  # N = 3, A has N = 4
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        coupled_selective_scan(**x, backend="torch", initial_state=bad)


def test_non_finite_initial_state_propagates_like_one_call(scan_inputs: Factory) -> None:
    """A carried state that overflowed (W = ones) is not an input error: it propagates to y as
    the same scan in one call would, on every backend."""
    x = scan_inputs(coupling="ones", length=3)
    h0 = random_state(x)
    h0[0, 0, 0, 0] = float("inf")
    for backend in ("ref", "torch"):
        y = coupled_selective_scan(**x, backend=backend, initial_state=h0)
        assert not torch.isfinite(y).all()


@pytest.mark.skipif(
    tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4),
    reason="Triton 3.6 interpreter needs numpy < 2.4",
)
@pytest.mark.parametrize("coupling", ["none", "random"])
def test_triton_initial_state_matches_ref(
    scan_inputs: Factory, grad_leaves: Callable[[dict[str, Any]], dict[str, Any]], coupling: str
) -> None:
    """The kernel (Triton's interpreter on CPU tensors) and its backward, with an initial state."""
    pytest.importorskip("triton")
    x = scan_inputs(coupling=coupling, batch=1, dim=4, length=3, state=4, dtype=torch.float32)
    x["initial_state"] = random_state(x)
    y_ref, h_ref = coupled_selective_scan(**x, return_last_state=True, backend="ref")
    y, h = coupled_selective_scan(**x, return_last_state=True, backend="triton")
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    grads = {}
    for backend in ("ref", "triton"):
        leaves = grad_leaves(x)
        leaves["initial_state"] = x["initial_state"].clone().requires_grad_(True)
        y, h = coupled_selective_scan(**leaves, return_last_state=True, backend=backend)
        grads[backend] = torch.autograd.grad(y.sum() + h.sum(), [leaves["initial_state"]])[0]
    torch.testing.assert_close(grads["triton"], grads["ref"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The torch backend's inference path
# ---------------------------------------------------------------------------------------------


def test_inference_memory_grows_with_the_output_only(
    scan_inputs: Factory, peak_bytes: Callable[[Callable[[], object]], int]
) -> None:
    """Without gradients the torch backend allocates, per extra step, little more than the
    output's (M, b, D) values: no ring of states, no whole-sequence time-major copies."""
    M, batch, dim, state = 3, 2, 32, 64
    peaks = {}
    for length in (64, 576):
        x = scan_inputs(M=M, batch=batch, dim=dim, state=state, length=length, dtype=torch.float32)
        with torch.no_grad():
            peaks[length] = peak_bytes(lambda x=x: coupled_selective_scan(**x, backend="torch"))
    output_per_step = M * batch * dim * 4
    per_step = (peaks[576] - peaks[64]) / (576 - 64)
    assert per_step <= 1.05 * output_per_step, (per_step, output_per_step)
    # and the constant is a handful of states (plus one chunk of 32 steps of time-major
    # inputs), not a ring of 33 states and their products with C (65 states)
    state_bytes = M * batch * dim * state * 4
    assert peaks[64] < 10 * state_bytes + 12 * 32 * output_per_step + 64 * output_per_step


def test_inference_path_keeps_reduced_precision_output(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="mean", dtype=torch.bfloat16)
    with torch.no_grad():
        y = coupled_selective_scan(**x, backend="torch")
    y_ref = coupled_selective_scan(**x, backend="ref")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0)
