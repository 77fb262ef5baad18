"""Coupled selective scan: one public function, several interchangeable backends.

``coupled_selective_scan`` validates its inputs and dispatches to a backend:

- ``"ref"``: ``coupled_selective_scan_ref``, the per-step loop whose docstring is the specification;
- ``"torch"``: ``coupled_selective_scan_torch``, the fast eager CPU path (hand-written backward);
- ``"triton"``: ``coupled_selective_scan_triton``, the GPU kernel (interpreter on CPU tensors);
- ``"auto"``: ``select_backend(u.device)``, for direct callers. A model never passes "auto": it
  chooses its backend and kernels once, for its device (``model.ops.fast_path``), logs why, and
  calls the chosen functions from then on.

Importing this package imports neither triton nor CUDA.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from model.ops.scan_ref import coupled_selective_scan_ref
from model.ops.scan_torch import coupled_selective_scan_torch
from model.ops.validation import (
    NonFiniteInputError,
    ScanDims,
    check_finite,
    validate_scan_inputs,
)

BACKENDS = ("ref", "torch", "triton")


@functools.cache
def _triton_unusable_reason() -> str | None:
    from model.ops.scan_triton import triton_unusable_reason

    return triton_unusable_reason()


def select_backend(device: torch.device | str) -> str:
    """The backend to use for tensors on ``device``: ``"triton"`` on CUDA when triton imports,
    else ``"torch"``. Cheap after the first call; call it once at model load and report it."""
    return explain_backend(device)[0]


def explain_backend(device: torch.device | str) -> tuple[str, str]:
    """``select_backend(device)`` and a sentence saying why (what "auto" means on ``device``)."""
    kind = torch.device(device).type
    if kind != "cuda":
        return "torch", f"auto on {kind}: the GPU kernel (triton) runs on CUDA only"
    reason = _triton_unusable_reason()
    if reason is None:
        return "triton", "auto on cuda: triton imports"
    return "torch", f"auto on cuda: triton is not usable ({reason})"


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
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan; ``coupled_selective_scan_ref``'s docstring is the specification.

    Shapes: u, delta, z (M, batch, D, L); A (M, D, N); B, C (M, batch, N, L); D, delta_bias
    (M, D); coupling (M, M) or None for the identity; initial_state (M, batch, D, N) or None for
    zeros. Returns y (M, batch, D, L) in u's dtype and, with ``return_last_state``, the last
    state (M, batch, D, N) in the compute dtype (float64 for float64 u, else float32).

    ``initial_state`` continues an earlier scan: a sequence scanned in chunks, each chunk
    starting from the previous chunk's last state, gives the same outputs as one call. It is
    differentiable on every backend.

    Raises ValueError for an unknown backend, wrong ranks or shapes, mismatched M, mixed devices,
    or NaN/inf in any input but ``initial_state`` (the message names the argument); the initial
    state is usually a previous call's last state, which may legitimately have overflowed (with
    W = ones), and it propagates the way one unchunked call would. The finite check costs one
    reduction over the inputs and one host synchronisation (ref, torch), or nothing extra
    but the synchronisation (triton: the kernel checks what it loads).
    """
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(
            f"coupled_selective_scan: backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}"
        )
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias, coupling, initial_state)
    if backend == "auto":
        backend = select_backend(u.device)
    if backend == "triton":
        from model.ops.scan_triton import coupled_selective_scan_triton

        return coupled_selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, return_last_state,
            initial_state=initial_state,
        )  # fmt: skip
    check_finite(
        {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z}
        | {"delta_bias": delta_bias, "coupling": coupling}
    )
    run = coupled_selective_scan_ref if backend == "ref" else coupled_selective_scan_torch
    return run(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, return_last_state,
        initial_state=initial_state,
    )  # fmt: skip


__all__ = [
    "BACKENDS",
    "NonFiniteInputError",
    "ScanDims",
    "coupled_selective_scan",
    "coupled_selective_scan_ref",
    "coupled_selective_scan_torch",
    "explain_backend",
    "select_backend",
    "validate_scan_inputs",
]
