"""Reference coupled selective scan: the specification every other backend must match.

A plain per-step loop in PyTorch. Slow, but obviously correct, differentiable, and valid in
float64, which makes it the yardstick for the fast backends and for gradcheck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def coupled_selective_scan_ref(
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
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan over M modalities that share channels, state size and time.

    Shapes (mamba_ssm's ``selective_scan_fn`` layout with a leading modality axis M):
        u, delta, z: (M, batch, D, L)    A: (M, D, N)    B, C: (M, batch, N, L)
        D, delta_bias: (M, D)            coupling W: (M, M), None meaning the identity
        initial_state: (M, batch, D, N), None meaning zeros

    With ``dt = softplus(delta + delta_bias)`` (softplus and bias each optional), for every
    modality m, batch b, channel d and state index n, starting from ``h[:, -1] = initial_state``
    (zeros when it is None)::

        h[m, t] = exp(dt[m, t] * A[m]) * sum_k W[m, k] * h[k, t-1] + dt[m, t] * B[m, t] * u[m, t]
        y[m, t] = sum_n C[m, t, n] * h[m, t, n] + D[m] * u[m, t]
        y       = y * silu(z)                                        (when z is given)

    The state transition mixes the previous states of all modalities through W before the
    modality's own decay: W = I is M independent Mamba scans; a row-stochastic W keeps the
    state bounded; W = ones (the paper's literal sum) lets it grow by up to M per step.

    Returns y with u's dtype, shape (M, batch, D, L), and with ``return_last_state`` also the
    final state h[:, :, :, :, L-1] of shape (M, batch, D, N) in the compute dtype.
    The compute dtype is float64 when u is float64, else float32.

    ``initial_state`` continues a scan: running the first k steps with ``return_last_state``
    and then the remaining steps with ``initial_state`` = that last state gives the same y and
    last state as one call over all steps (chunked inference relies on it).
    """
    dtype_in = u.dtype
    compute = torch.float64 if dtype_in == torch.float64 else torch.float32
    u = u.to(compute)
    delta = delta.to(compute)
    A = A.to(compute)
    B = B.to(compute)
    C = C.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)

    M, batch, dim, length = u.shape
    n_state = A.shape[-1]
    if coupling is None:
        W = torch.eye(M, dtype=compute, device=u.device)
    else:
        W = coupling.to(compute)

    # Discretised transition and input, (M, batch, D, L, N).
    dA = torch.exp(torch.einsum("mbdl,mdn->mbdln", delta, A))
    dBu = torch.einsum("mbdl,mbnl,mbdl->mbdln", delta, B, u)

    if initial_state is not None:
        h = initial_state.to(compute)
    else:
        h = u.new_zeros((M, batch, dim, n_state))
    ys = []
    for t in range(length):
        mixed = torch.einsum("mk,kbdn->mbdn", W, h)  # sum_k W[m,k] h[k, t-1]
        h = dA[:, :, :, t] * mixed + dBu[:, :, :, t]
        ys.append(torch.einsum("mbdn,mbn->mbd", h, C[:, :, :, t]))
    y = torch.stack(ys, dim=-1)  # (M, batch, D, L)

    if D is not None:
        y = y + u * D.to(compute)[:, None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype_in)
    if return_last_state:
        return out, h
    return out
