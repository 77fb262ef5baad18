"""Fast eager PyTorch backend of the coupled selective scan (the CPU path, also used for training).

How it is fast (measured against the alternatives in docs/PERFORMANCE.md, scan section):
- time-major, modality-major layout: inputs are permuted once to (L, M, batch, ...) so that each
  step reads contiguous slices, and the state is one (M, batch, D, N) block whose modality mix is a
  single (M, M) @ (M, batch*D*N) matrix product;
- the decay exp(dt * A) is computed per step into a preallocated buffer, in place, instead of being
  materialised for the whole sequence (that costs L times the state in memory traffic);
- the output contraction y = C · h runs once per chunk of steps, not once per step;
- a hand-written backward (a reverse-time loop for the state gradient, then chunk-wide vectorised
  reductions for every input gradient) replaces autograd through the Python loop, which would record
  several graph nodes per time step.

Forward with gradients keeps every state (L x M x batch x D x N values), like autograd would, but
nothing else per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Steps per chunk: the output contraction and the backward's reductions work on this many steps at
# once (bounded temporary memory, few large kernels instead of many small ones).
_CHUNK = 32


def _time_major(x: Tensor) -> Tensor:
    """(M, batch, X, L) -> contiguous (L, M, batch, X)."""
    return x.permute(3, 0, 1, 2).contiguous()


def _scan_forward(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, W: Tensor | None, keep_states: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the recurrence; return y (L, M, b, D), the last state and, if asked, all states."""
    M, batch, dim, length = u.shape
    n_state = A.shape[-1]
    dt_t = _time_major(dt).unsqueeze(-1)  # (L, M, b, D, 1)
    dtu_t = _time_major(dt * u).unsqueeze(-1)  # (L, M, b, D, 1)
    B_t = _time_major(B).unsqueeze(3)  # (L, M, b, 1, N)
    C_t = _time_major(C).unsqueeze(3)  # (L, M, b, 1, N)
    A_b = A.unsqueeze(1)  # (M, 1, D, N)

    y_t = u.new_empty((length, M, batch, dim))
    if keep_states:
        states = u.new_empty((length, M, batch, dim, n_state))
    else:
        # Ring of chunk buffers; one spare slot so a step never writes the state it reads.
        states = u.new_empty((min(_CHUNK, length) + 1, M, batch, dim, n_state))
    h = u.new_zeros((M, batch, dim, n_state))
    mixed = torch.empty_like(h) if W is not None else h
    slot = 0
    for t0 in range(0, length, _CHUNK):
        t1 = min(length, t0 + _CHUNK)
        first = t0 if keep_states else slot
        for t in range(t0, t1):
            if W is not None:
                torch.mm(W, h.view(M, -1), out=mixed.view(M, -1))  # sum_k W[m,k] h[k, t-1]
            else:
                mixed = h
            h_next = states[t] if keep_states else states[slot]
            torch.mul(dt_t[t], A_b, out=h_next)
            h_next.exp_().mul_(mixed).addcmul_(dtu_t[t], B_t[t])
            h = h_next
            slot += 1
        # y[t] = sum_n C[t, n] h[t, n] for the whole chunk at once.
        chunk = states[first : first + (t1 - t0)]
        torch.sum(chunk * C_t[t0:t1], dim=-1, out=y_t[t0:t1])
        if not keep_states:
            # Keep the last state in slot 0 and fill the next chunk after it.
            states[0].copy_(h)
            h = states[0]
            slot = 1
    last = h.clone()
    return y_t, last, states if keep_states else None


def _scan_backward(
    gy_t: Tensor,
    g_last: Tensor | None,
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    W: Tensor | None,
    states: Tensor,
    need_W: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of (u, dt, A, B, C, W) given dL/dy (L, M, b, D) and dL/dh_last.

    With a_t = exp(dt_t A), b_t = dt_t B_t u_t, h_t = a_t * (W h_{t-1}) + b_t, y_t = C_t · h_t:
    g_t = dL/dh_t = C_t dy_t + W^T (a_{t+1} * g_{t+1})   (plus dL/dh_last at t = L-1),
    and with q_t = a_t * g_t and x_t = W h_{t-1}: dW = sum_t q_t h_{t-1}^T, d(dt_t A) = q_t x_t,
    d b_t = g_t, dC_t = sum_D h_t dy_t.
    """
    length, M, batch, dim = gy_t.shape
    n_state = A.shape[-1]
    dt_t = _time_major(dt)  # (L, M, b, D)
    u_t = _time_major(u)
    B_t = _time_major(B)  # (L, M, b, N)
    C_t = _time_major(C)
    A_b = A.unsqueeze(1)  # (M, 1, D, N)
    W_T = W.t().contiguous() if W is not None else None

    d_u = torch.empty_like(u_t)
    d_dt = torch.empty_like(dt_t)
    d_B = torch.empty_like(B_t)
    d_C = torch.empty_like(C_t)
    d_A = torch.zeros_like(A)
    d_W = torch.zeros_like(W) if (W is not None and need_W) else None

    if g_last is not None:
        carry = g_last.clone(memory_format=torch.contiguous_format)
    else:
        carry = u.new_zeros((M, batch, dim, n_state))
    G_buf = u.new_empty((min(_CHUNK, length), M, batch, dim, n_state))
    for t1 in range(length, 0, -_CHUNK):
        t0 = max(0, t1 - _CHUNK)
        steps = t1 - t0
        dt_c, u_c, gy_c = dt_t[t0:t1], u_t[t0:t1], gy_t[t0:t1]
        Q = torch.exp(dt_c.unsqueeze(-1) * A_b)  # a_t, turned into q_t in place below
        G = G_buf[:steps]
        torch.mul(gy_c.unsqueeze(-1), C_t[t0:t1].unsqueeze(3), out=G)  # C_t dy_t
        for i in range(steps - 1, -1, -1):
            g = G[i].add_(carry)  # g_t
            q = Q[i].mul_(g)  # q_t = a_t * g_t
            if W_T is not None:
                torch.mm(W_T, q.view(M, -1), out=carry.view(M, -1))
            else:
                carry.copy_(q)
        # States before each step of the chunk: h_{t-1}.
        if t0 > 0:
            H_prev = states[t0 - 1 : t1 - 1]
        else:
            H_prev = torch.cat([torch.zeros_like(states[:1]), states[: t1 - 1]])
        if W is not None:
            X = torch.matmul(W, H_prev.reshape(steps, M, -1)).view_as(H_prev)  # W h_{t-1}
            if d_W is not None:
                d_W += torch.einsum("tmx,tkx->mk", Q.view(steps, M, -1), H_prev.view(steps, M, -1))
        else:
            X = H_prev
        P = Q.mul_(X)  # dL/d(dt_t A), (steps, M, b, D, N)
        S = torch.einsum("tmbdn,tmbn->tmbd", G, B_t[t0:t1])  # sum_n g_t B_t
        d_dt[t0:t1] = torch.einsum("tmbdn,mdn->tmbd", P, A) + u_c * S
        d_u[t0:t1] = dt_c * S
        d_A += torch.einsum("tmbdn,tmbd->mdn", P, dt_c)
        d_B[t0:t1] = torch.einsum("tmbdn,tmbd->tmbn", G, dt_c * u_c)
        d_C[t0:t1] = torch.einsum("tmbdn,tmbd->tmbn", states[t0:t1], gy_c)

    def back(x: Tensor) -> Tensor:
        return x.permute(1, 2, 3, 0)  # (L, M, b, X) -> (M, b, X, L)

    return back(d_u), back(d_dt), d_A, back(d_B), back(d_C), d_W


class _CoupledScanFunction(torch.autograd.Function):
    """The recurrence alone: (u, dt, A, B, C, W) -> (y without D and z, last state)."""

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, W: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        keep = any(ctx.needs_input_grad)
        y_t, last, states = _scan_forward(u, dt, A, B, C, W, keep_states=keep)
        if keep:
            ctx.save_for_backward(u, dt, A, B, C, W, states)
        ctx.set_materialize_grads(False)
        return y_t.permute(1, 2, 3, 0).contiguous(), last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor | None, g_last: Tensor | None) -> tuple[Tensor | None, ...]:
        u, dt, A, B, C, W, states = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(u)
        grads = _scan_backward(
            _time_major(gy), g_last, u, dt, A, B, C, W, states, need_W=ctx.needs_input_grad[5]
        )
        return tuple(
            g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True)
        )


def coupled_selective_scan_torch(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan, eager PyTorch; same contract as ``coupled_selective_scan_ref``.

    Differentiable in every input (hand-written backward, not double-differentiable). Inputs are
    not validated here: call it through ``model.ops.coupled_selective_scan``.
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    u_c = u.to(compute)
    W = coupling.to(compute) if coupling is not None else None
    y, last = _CoupledScanFunction.apply(u_c, dt, A.to(compute), B.to(compute), C.to(compute), W)
    if D is not None:
        y = y + u_c * D.to(compute)[:, None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    if return_last_state:
        return out, last
    return out
