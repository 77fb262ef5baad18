"""Shared input factory for the scan tests (seeded, tiny, every optional input on request)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

COUPLINGS = ("none", "identity", "mean", "ones", "stochastic", "random")


def make_coupling(kind: str, M: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor | None:
    """A coupling matrix of the named kind (None for "none")."""
    if kind == "none":
        return None
    if kind == "identity":
        return torch.eye(M, dtype=dtype)
    if kind == "mean":
        return torch.full((M, M), 1.0 / M, dtype=dtype)
    if kind == "ones":
        return torch.ones(M, M, dtype=dtype)
    if kind == "stochastic":
        return torch.softmax(torch.randn(M, M, generator=g, dtype=dtype) * 2, dim=-1)
    if kind == "random":
        return torch.randn(M, M, generator=g, dtype=dtype) * 0.7
    raise AssertionError(kind)


def make_scan_inputs(
    M: int = 3,
    batch: int = 2,
    dim: int = 5,
    length: int = 7,
    state: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    coupling: str = "mean",
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``coupled_selective_scan`` (minus ``backend``)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    kwargs: dict[str, Any] = {
        "u": randn(M, batch, dim, length),
        # Positive raw deltas keep dt in Mamba's range with or without softplus.
        "delta": torch.rand(M, batch, dim, length, generator=g, dtype=dtype) * 0.5 + 0.01,
        "A": -(torch.rand(M, dim, state, generator=g, dtype=dtype) * 2 + 0.1),
        "B": randn(M, batch, state, length),
        "C": randn(M, batch, state, length),
        "D": randn(M, dim) if D else None,
        "z": randn(M, batch, dim, length) if z else None,
        "delta_bias": randn(M, dim) * 0.3 if delta_bias else None,
        "delta_softplus": delta_softplus,
        "coupling": make_coupling(coupling, M, dtype, g),
    }
    return kwargs


@pytest.fixture
def scan_inputs() -> Callable[..., dict[str, Any]]:
    """The input factory ``make_scan_inputs``."""
    return make_scan_inputs


TENSOR_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "coupling")


def with_grad(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of the inputs whose tensors are fresh leaves that require grad."""
    out = dict(kwargs)
    for name in TENSOR_ARGS:
        if out.get(name) is not None:
            out[name] = out[name].detach().clone().requires_grad_(True)
    return out


@pytest.fixture
def grad_leaves() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``with_grad``: copy inputs as fresh leaves requiring grad."""
    return with_grad
