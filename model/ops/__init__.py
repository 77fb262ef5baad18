"""Coupled selective scan: one public function, several interchangeable backends."""

from __future__ import annotations

from torch import Tensor

from model.ops.scan_ref import coupled_selective_scan_ref

BACKENDS = ("ref",)


def coupled_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    coupling: Tensor | None = None,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan; see ``coupled_selective_scan_ref`` for the specification."""
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    return coupled_selective_scan_ref(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, return_last_state
    )


__all__ = ["BACKENDS", "coupled_selective_scan", "coupled_selective_scan_ref"]
