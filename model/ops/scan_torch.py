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
nothing else per step. Inference (no input needs a gradient) takes a separate path, ``_scan_rows``,
that holds two states and a few per-step buffers whatever L is: the inputs are made time-major one
chunk of steps at a time, the state is held state-major (M, batch, N, D) so that y = C · h is one
batched product per step, an identity coupling skips the mixing product, and D, the gate z,
delta_bias and softplus are applied per chunk, so the only L-sized allocation is the output.
``coupled_selective_scan_rows`` is the backend for callers whose activations are rows of time steps
(M, batch, L, X), the model's layout: without gradients it needs no (D, L) <-> (L, D) transposes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from model.ops.validation import check_finite

# Steps per chunk: the output contraction and the backward's reductions work on this many steps at
# once (bounded temporary memory, few large kernels instead of many small ones).
_CHUNK = 32


def _time_major(x: Tensor) -> Tensor:
    """(M, batch, X, L) -> contiguous (L, M, batch, X)."""
    return x.permute(3, 0, 1, 2).contiguous()


def _scan_forward(
    u: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    W: Tensor | None,
    keep_states: bool,
    h0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the recurrence from h0 (zeros when None); return y (L, M, b, D), the last state and,
    if asked, all states."""
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
    h = h0 if h0 is not None else u.new_zeros((M, batch, dim, n_state))
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
    h0: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Gradients of (u, dt, A, B, C, W, h0) given dL/dy (L, M, b, D) and dL/dh_last.

    With a_t = exp(dt_t A), b_t = dt_t B_t u_t, h_t = a_t * (W h_{t-1}) + b_t, y_t = C_t · h_t:
    g_t = dL/dh_t = C_t dy_t + W^T (a_{t+1} * g_{t+1})   (plus dL/dh_last at t = L-1),
    and with q_t = a_t * g_t and x_t = W h_{t-1}: dW = sum_t q_t h_{t-1}^T, d(dt_t A) = q_t x_t,
    d b_t = g_t, dC_t = sum_D h_t dy_t, and dL/dh_{-1} = W^T q_0 (the initial state h0).
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
            first = h0[None] if h0 is not None else torch.zeros_like(states[:1])
            H_prev = torch.cat([first, states[: t1 - 1]])
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

    # After the loop, carry = W^T q_0 = dL/dh_{-1}.
    return back(d_u), back(d_dt), d_A, back(d_B), back(d_C), d_W, carry


class _CoupledScanFunction(torch.autograd.Function):
    """The recurrence alone: (u, dt, A, B, C, W, h0) -> (y without D and z, last state)."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        W: Tensor | None,
        h0: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        keep = any(ctx.needs_input_grad)
        # h0 is only read (every step writes a fresh buffer).
        y_t, last, states = _scan_forward(u, dt, A, B, C, W, keep_states=keep, h0=h0)
        if keep:
            ctx.save_for_backward(u, dt, A, B, C, W, states, h0)
        ctx.set_materialize_grads(False)
        return y_t.permute(1, 2, 3, 0).contiguous(), last

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor | None, g_last: Tensor | None) -> tuple[Tensor | None, ...]:
        u, dt, A, B, C, W, states, h0 = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(u)
        grads = _scan_backward(
            _time_major(gy), g_last, u, dt, A, B, C, W, states, ctx.needs_input_grad[5], h0
        )
        return tuple(
            g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True)
        )


def _is_identity(W: Tensor) -> bool:
    """Whether the coupling W (M, M) is exactly the identity (a learned W of one modality,
    softmax of one logit, is exactly [[1.0]]). Mixing with it changes no value, so the per-step
    matrix product can be skipped."""
    return bool(torch.equal(W, torch.eye(W.shape[0], dtype=W.dtype, device=W.device)))


def _rows_time_major(x: Tensor) -> Tensor:
    """(M, batch, s, X) -> contiguous (s, M, batch, X)."""
    return x.permute(2, 0, 1, 3).contiguous()


def _scan_rows(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    W: Tensor | None,
    h0: Tensor | None,
    y: Tensor,
) -> Tensor:
    """The scan without autograd on rows of time steps; writes y and returns the last state.

    u, delta, z: (M, b, L, D); B, C: (M, b, L, N); y: (M, b, L, D), written (any strides: a
    transposed view of an (M, b, D, L) output works). Returns the last state (M, b, D, N).

    Memory besides the output: the state twice (ping-pong) and the mixed state, each
    (M, b, D, N), plus time-major copies of one chunk of inputs. Same recurrence as the
    autograd path; what differs only moves less data (docs/PERFORMANCE.md, "Notes from the
    code", has the measurement):
    - the state is held state-major, (M, b, N, D), so that every per-step operand is a
      broadcast along N or D of a contiguous block, and y = C · h is one batched
      (1, N) @ (N, D) product instead of a product buffer and a reduction over an innermost
      axis of 16;
    - an identity W (always so with one modality) skips the per-step mixing product;
    - no per-step allocation: every step writes preallocated buffers.
    """
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    M, batch, length, dim = u.shape
    n_state = A.shape[-1]
    rows = M * batch
    A_b = A.to(compute).transpose(-1, -2).unsqueeze(1).contiguous()  # (M, 1, N, D)
    D_b = D.to(compute)[:, None, :] if D is not None else None  # (M, 1, D)
    bias_b = delta_bias.to(compute)[:, None, :] if delta_bias is not None else None  # (M, 1, D)
    W_c = W.to(compute) if W is not None else None
    if W_c is not None and _is_identity(W_c):
        W_c = None

    h = u.new_empty((M, batch, n_state, dim), dtype=compute)  # (M, b, N, D)
    if h0 is not None:
        h.copy_(h0.transpose(-1, -2))
    else:
        h.zero_()
    h_next = torch.empty_like(h)
    mixed = torch.empty_like(h) if W_c is not None else h
    for t0 in range(0, length, _CHUNK):
        t1 = min(length, t0 + _CHUNK)
        steps = t1 - t0
        u_c = _rows_time_major(u[:, :, t0:t1]).to(compute)  # (s, M, b, D)
        dt_c = _rows_time_major(delta[:, :, t0:t1]).to(compute)
        if bias_b is not None:
            dt_c = dt_c + bias_b
        if delta_softplus:
            dt_c = F.softplus(dt_c)
        dtu_c = (dt_c * u_c).unsqueeze(-2)  # (s, M, b, 1, D)
        dt_e = dt_c.unsqueeze(-2)  # (s, M, b, 1, D)
        B_c = _rows_time_major(B[:, :, t0:t1]).to(compute).unsqueeze(-1)  # (s, M, b, N, 1)
        C_c = _rows_time_major(C[:, :, t0:t1]).to(compute).view(steps, rows, 1, n_state)
        y_c = torch.empty_like(u_c)  # (s, M, b, D)
        # Per-step views made once per chunk (one call each, not one indexing call per step).
        per_step = zip(
            dt_e.unbind(0), dtu_c.unbind(0), B_c.unbind(0), C_c.unbind(0),
            y_c.view(steps, rows, 1, dim).unbind(0), strict=True,
        )  # fmt: skip
        for dt_i, dtu_i, B_i, C_i, y_i in per_step:
            if W_c is not None:
                torch.mm(W_c, h.view(M, -1), out=mixed.view(M, -1))  # sum_k W[m,k] h[k, t-1]
            else:
                mixed = h
            torch.mul(dt_i, A_b, out=h_next)
            h_next.exp_().mul_(mixed).addcmul_(dtu_i, B_i)
            h, h_next = h_next, h
            # y[t] = sum_n C[t, n] h[t, n]: one (1, N) @ (N, D) product per (m, b) row
            torch.bmm(C_i, h.view(rows, n_state, dim), out=y_i)
        if D_b is not None:
            y_c = y_c + u_c * D_b
        if z is not None:
            y_c = y_c * F.silu(_rows_time_major(z[:, :, t0:t1]).to(compute))
        y[:, :, t0:t1].copy_(y_c.permute(1, 2, 0, 3))
    return h.transpose(-1, -2).contiguous()


def _scan_inference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    W: Tensor | None,
    h0: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The whole scan without autograd; returns y (M, b, D, L) in u's dtype and the last state.

    ``_scan_rows`` on (L, X)-transposed views of the inputs and of the output.
    """
    y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    last = _scan_rows(
        u.transpose(-1, -2), delta.transpose(-1, -2), A, B.transpose(-1, -2),
        C.transpose(-1, -2), D, z.transpose(-1, -2) if z is not None else None, delta_bias,
        delta_softplus, W, h0, y.transpose(-1, -2),
    )  # fmt: skip
    return y, last


def coupled_selective_scan_rows(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    coupling: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The torch backend for inputs held as rows of time steps.

    The same scan as ``coupled_selective_scan_torch(u.mT, delta.mT, A, B.mT, C.mT, D, z.mT,
    coupling=coupling, return_last_state=True, initial_state=initial_state)`` (``.mT`` swaps
    the last two axes), with delta used as given (no bias, no softplus), laid out the way a
    model's activations are. Without gradients it runs ``_scan_rows``: no (D, L) <-> (L, D)
    transposes in or out, which on a CPU cost more than the scan's element-wise steps at batch
    16. When an input needs a gradient, it is exactly that call (the autograd path permutes its
    inputs to time-major whatever their layout) and y is its output's transposed view.

    Args:
        u, delta, z: (M, b, L, D); B, C: (M, b, L, N); A: (M, D, N); D: (M, D);
        coupling: (M, M) or None (identity); initial_state: (M, b, D, N) or None (zeros).

    Returns:
        y (M, b, L, D) in u's dtype and the last state (M, b, D, N) in the compute dtype.

    Raises:
        ValueError: NaN or infinity in an input (the message names it), like
            ``model.ops.coupled_selective_scan``. Shapes are the caller's to get right.
    """
    check_finite(
        {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "coupling": coupling}
    )
    tensors = (u, delta, A, B, C, D, z, coupling, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y_t, last = coupled_selective_scan_torch(
            u.mT, delta.mT, A, B.mT, C.mT, D, z.mT if z is not None else None,
            coupling=coupling, return_last_state=True, initial_state=initial_state,
        )  # fmt: skip
        return y_t.mT, last
    with torch.no_grad():
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        last = _scan_rows(u, delta, A, B, C, D, z, None, False, coupling, initial_state, y)
    return y, last


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
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan, eager PyTorch; same contract as ``coupled_selective_scan_ref``.

    Differentiable in every input (hand-written backward, not double-differentiable). Without
    gradients (no_grad, inference_mode, or no input requiring one) it runs ``_scan_inference``,
    whose memory does not grow with L beyond the output. Inputs are not validated here: call it
    through ``model.ops.coupled_selective_scan``.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, coupling, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad:
        y_inf, last_inf = _scan_inference(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, initial_state
        )
        return (y_inf, last_inf) if return_last_state else y_inf
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    u_c = u.to(compute)
    W = coupling.to(compute) if coupling is not None else None
    h0 = initial_state.to(compute) if initial_state is not None else None
    y, last = _CoupledScanFunction.apply(
        u_c, dt, A.to(compute), B.to(compute), C.to(compute), W, h0
    )
    if D is not None:
        y = y + u_c * D.to(compute)[:, None, :, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    if return_last_state:
        return out, last
    return out
