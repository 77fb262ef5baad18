"""The torch backend against ref: values, last state, every gradient, odd sizes and layouts."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from model.ops import coupled_selective_scan
from model.ops.scan_torch import coupled_selective_scan_rows

COUPLINGS = ("none", "identity", "mean", "ones", "stochastic", "random")
OPTIONS = list(itertools.product([False, True], repeat=4))  # D, z, delta_bias, softplus
TENSORS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling")

Factory = Callable[..., dict[str, Any]]


def both(x: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    return (
        coupled_selective_scan(**x, backend="ref", **kw),
        coupled_selective_scan(**x, backend="torch", **kw),
    )


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "".join("DzbS"[i] for i in range(4) if o[i]) or "plain"
)
def test_forward_matches_ref_float64(
    scan_inputs: Factory, coupling: str, options: tuple[bool, ...]
) -> None:
    D, z, bias, softplus = options
    x = scan_inputs(coupling=coupling, D=D, z=z, delta_bias=bias, delta_softplus=softplus)
    (y_ref, h_ref), (y, h) = both(x, return_last_state=True)
    assert y.dtype == torch.float64 and y.shape == (3, 2, 5, 7) and h.shape == (3, 2, 5, 4)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(M=1, batch=1, dim=1, length=1, state=1),
        dict(M=3, batch=1, dim=3, length=1, state=16),
        dict(M=2, batch=3, dim=7, length=33, state=5),  # crosses one chunk boundary
        dict(M=4, batch=1, dim=2, length=70, state=2),  # several chunks
    ],
    ids=lambda s: "x".join(str(v) for v in s.values()),
)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_odd_sizes_match_ref(scan_inputs: Factory, sizes: dict[str, int], grad: bool) -> None:
    x = scan_inputs(coupling="stochastic", **sizes)
    if grad:  # the forward that keeps every state for backward is a separate code path
        x["u"] = x["u"].requires_grad_(True)
    (y_ref, h_ref), (y, h) = both(x, return_last_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="random", dim=4, length=6)
    y_expected = coupled_selective_scan(**x, backend="ref")
    strided = dict(x)
    for name in ("u", "delta", "z"):  # (M, b, D, L) stored as (L, b, D, M)
        strided[name] = x[name].permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    for name in ("B", "C"):  # every other element of a wider buffer
        wide = torch.zeros(*x[name].shape[:-1], 2 * x[name].shape[-1], dtype=torch.float64)
        wide[..., ::2] = x[name]
        strided[name] = wide[..., ::2]
    strided["A"] = x["A"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["coupling"] = x["coupling"].t().contiguous().t()
    assert not any(strided[n].is_contiguous() for n in ("u", "delta", "z", "B", "C", "A"))
    for backend in ("ref", "torch"):
        y = coupled_selective_scan(**strided, backend=backend)
        torch.testing.assert_close(y, y_expected, rtol=1e-10, atol=1e-10)


def grads_of(x: dict[str, Any], backend: str, use_last: bool) -> dict[str, torch.Tensor]:
    y, h = coupled_selective_scan(**x, return_last_state=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if use_last:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    names = [n for n in TENSORS if x.get(n) is not None]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("use_last", [False, True], ids=["y", "y+last"])
def test_gradients_match_ref(
    scan_inputs: Factory,
    grad_leaves: Callable[[dict[str, Any]], dict[str, Any]],
    coupling: str,
    use_last: bool,
) -> None:
    x = grad_leaves(scan_inputs(coupling=coupling, length=37))
    expected = grads_of(x, "ref", use_last)
    got = grads_of(x, "torch", use_last)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-10, msg=name)


def test_gradient_of_last_state_alone(
    scan_inputs: Factory, grad_leaves: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    x = grad_leaves(scan_inputs(coupling="stochastic"))
    results = []
    for backend in ("ref", "torch"):
        _, h = coupled_selective_scan(**x, return_last_state=True, backend=backend)
        results.append(torch.autograd.grad(h.square().sum(), [x["coupling"], x["B"], x["A"]]))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_gradcheck_torch_backend(scan_inputs: Factory) -> None:
    x = scan_inputs(M=2, batch=1, dim=2, length=3, state=2, coupling="random")
    names = [n for n in TENSORS if x.get(n) is not None]

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(x) | dict(zip(names, tensors, strict=True))
        out = coupled_selective_scan(**kw, return_last_state=True, backend="torch")
        assert isinstance(out, tuple)
        return out

    leaves = tuple(x[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-7)


def test_only_some_inputs_require_grad(scan_inputs: Factory) -> None:
    x = scan_inputs(coupling="mean")
    x["u"] = x["u"].requires_grad_(True)
    x["coupling"] = x["coupling"].requires_grad_(True)
    for backend in ("ref", "torch"):
        y = coupled_selective_scan(**x, backend=backend)
        gu, gw = torch.autograd.grad(y.sum(), [x["u"], x["coupling"]])
        if backend == "ref":
            expected = (gu, gw)
        else:
            torch.testing.assert_close((gu, gw), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(scan_inputs: Factory, dtype: torch.dtype) -> None:
    x64 = scan_inputs(coupling="stochastic", length=20)
    x = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in x64.items()}
    y_ref, h_ref = coupled_selective_scan(**x, return_last_state=True, backend="ref")
    y, h = coupled_selective_scan(**x, return_last_state=True, backend="torch")
    assert y.dtype == dtype and h.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_is_torch(scan_inputs: Factory) -> None:
    x = scan_inputs()
    assert torch.equal(
        coupled_selective_scan(**x, backend="auto"), coupled_selective_scan(**x, backend="torch")
    )


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("M", [1, 3])
def test_rows_entry_matches_ref(scan_inputs: Factory, coupling: str, M: int) -> None:
    """The inference entry on (M, b, L, X) rows equals ref on the transposed inputs, from an
    initial state, across a chunk boundary (with M = 1, "identity" and "stochastic" are both
    exactly [[1.0]]: the path that skips the mixing product)."""
    x = scan_inputs(M=M, coupling=coupling, length=40, delta_bias=False, delta_softplus=False)
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(M, 2, 5, 4, generator=g, dtype=torch.float64)
    y_ref, h_ref = coupled_selective_scan(
        **x, backend="ref", return_last_state=True, initial_state=h0
    )
    rows = {k: x[k].transpose(-1, -2) for k in ("u", "delta", "B", "C", "z")}
    y, h = coupled_selective_scan_rows(
        rows["u"], rows["delta"], x["A"], rows["B"], rows["C"], D=x["D"], z=rows["z"],
        coupling=x["coupling"], initial_state=h0,
    )  # fmt: skip
    assert y.shape == (M, 2, 40, 5) and h.shape == (M, 2, 5, 4)
    torch.testing.assert_close(y, y_ref.transpose(-1, -2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_rows_entry_refuses_non_finite_inputs(scan_inputs: Factory) -> None:
    x = scan_inputs(delta_bias=False, delta_softplus=False)
    rows = {k: x[k].transpose(-1, -2).clone() for k in ("u", "delta", "B", "C", "z")}
    rows["B"][0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* in B"):
        coupled_selective_scan_rows(
            rows["u"], rows["delta"], x["A"], rows["B"], rows["C"], D=x["D"], z=rows["z"]
        )
