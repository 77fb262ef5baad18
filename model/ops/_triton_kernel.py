# mypy: disable-error-code="no-untyped-def"
"""Triton kernel of the coupled selective scan. Imports triton: load it lazily (scan_triton.py).

One program owns one batch row and a block of BLOCK_D channels for *all* M modalities, and walks
the sequence in order. The M states, each (BLOCK_D, N), live in registers for the whole sequence,
so the modality mix sum_k W[m,k] h[k] is a few in-register multiply-adds per step and nothing but
the inputs and the outputs touch memory. Up to four modalities are supported; each has its own
named state (h0..h3) because Triton has no register arrays, and constexpr branches drop the unused
ones at compile time.

The kernel uses only triton.language builtins, none of the @triton.jit helpers of
triton.language.standard (tl.sum, tl.zeros, tl.sigmoid, ...): those are built for one mode when
triton is imported, and the interpreted copy of this module (see scan_triton.py) must not call a
compiled helper. Hence `_sum`, `_zeros`, `_silu` below.

Every value the kernel loads is also folded into a NaN-propagating accumulator (x * 0), so the
finite check of the inputs costs no extra pass over memory: one flag per launch, read once on the
host afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_MODALITIES = 4


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    # log(1 + exp(x)), linear above 20 like torch.nn.functional.softplus.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _mix(W_ptr, row: tl.constexpr, s_W_m, s_W_k, h0, h1, h2, h3, M: tl.constexpr):
    # sum_k W[row, k] * h_k
    x = tl.load(W_ptr + row * s_W_m).to(h0.dtype) * h0
    if M > 1:
        x += tl.load(W_ptr + row * s_W_m + s_W_k).to(h0.dtype) * h1
    if M > 2:
        x += tl.load(W_ptr + row * s_W_m + 2 * s_W_k).to(h0.dtype) * h2
    if M > 3:
        x += tl.load(W_ptr + row * s_W_m + 3 * s_W_k).to(h0.dtype) * h3
    return x


@triton.jit
def _load_params(
    m: tl.constexpr,
    A_ptr,
    D_ptr,
    bias_ptr,
    offs_d,
    offs_n,
    mask_d,
    mask_n,
    s_A_m,
    s_A_d,
    s_A_n,
    s_D_m,
    s_D_d,
    s_bias_m,
    s_bias_d,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # A[m] (BLOCK_D, N_PAD), D[m] and delta_bias[m] (BLOCK_D,), and their finite-check term.
    a_ptrs = A_ptr + m * s_A_m + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n
    A = tl.load(a_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(COMPUTE)
    check = _sum(A * 0.0, axis=1)
    Dm = tl.full(check.shape, 0.0, check.dtype)
    bias = tl.full(check.shape, 0.0, check.dtype)
    if HAS_D:
        Dm = tl.load(D_ptr + m * s_D_m + offs_d * s_D_d, mask=mask_d, other=0.0).to(COMPUTE)
        check += Dm * 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + m * s_bias_m + offs_d * s_bias_d, mask=mask_d, other=0.0)
        bias = bias.to(COMPUTE)
        check += bias * 0.0
    return A, Dm, bias, check


@triton.jit
def _step(
    m: tl.constexpr,
    t,
    mixed,
    A,
    Dm,
    bias,
    u_ptr,
    dt_ptr,
    z_ptr,
    B_ptr,
    C_ptr,
    y_ptr,
    row_u,
    row_dt,
    row_z,
    row_y,
    row_B,
    row_C,
    s_u_m,
    s_u_l,
    s_dt_m,
    s_dt_l,
    s_z_m,
    s_z_l,
    s_y_m,
    s_y_l,
    s_B_m,
    s_B_l,
    s_C_m,
    s_C_l,
    mask_d,
    mask_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # One time step of modality m: new state (BLOCK_D, N_PAD), writes y[m, b, block, t].
    u = tl.load(u_ptr + m * s_u_m + t * s_u_l + row_u, mask=mask_d, other=0.0).to(COMPUTE)
    dt_in = tl.load(dt_ptr + m * s_dt_m + t * s_dt_l + row_dt, mask=mask_d, other=0.0)
    dt_in = dt_in.to(COMPUTE)
    Bt = tl.load(B_ptr + m * s_B_m + t * s_B_l + row_B, mask=mask_n, other=0.0).to(COMPUTE)
    Ct = tl.load(C_ptr + m * s_C_m + t * s_C_l + row_C, mask=mask_n, other=0.0).to(COMPUTE)
    dt = dt_in
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    # h = exp(dt A) * (sum_k W[m,k] h_k) + dt B u ;  y = C . h
    h = tl.exp(dt[:, None] * A) * mixed + (dt * u)[:, None] * Bt[None, :]
    y = _sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += Dm * u
    check_d = u * 0.0 + dt_in * 0.0
    if HAS_Z:
        zt = tl.load(z_ptr + m * s_z_m + t * s_z_l + row_z, mask=mask_d, other=0.0).to(COMPUTE)
        y = y * _silu(zt)
        check_d += zt * 0.0
    out_ptrs = y_ptr + m * s_y_m + t * s_y_l + row_y
    tl.store(out_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    return h, check_d, Bt * 0.0 + Ct * 0.0


@triton.jit
def _mix_all(W_ptr, s_W_m, s_W_k, h0, h1, h2, h3, M: tl.constexpr, HAS_W: tl.constexpr):
    # (sum_k W[m,k] h_k for m = 0..3), reading every old state before any is replaced.
    x0 = h0
    x1 = h1
    x2 = h2
    x3 = h3
    if HAS_W:
        x0 = _mix(W_ptr, 0, s_W_m, s_W_k, h0, h1, h2, h3, M)
        if M > 1:
            x1 = _mix(W_ptr, 1, s_W_m, s_W_k, h0, h1, h2, h3, M)
        if M > 2:
            x2 = _mix(W_ptr, 2, s_W_m, s_W_k, h0, h1, h2, h3, M)
        if M > 3:
            x3 = _mix(W_ptr, 3, s_W_m, s_W_k, h0, h1, h2, h3, M)
    return x0, x1, x2, x3


@triton.jit
def _load_tile(
    m: tl.constexpr,
    t0,
    cols,
    tmask,
    u_ptr,
    dt_ptr,
    z_ptr,
    B_ptr,
    C_ptr,
    row_u,
    row_dt,
    row_z,
    row_B,
    row_C,
    s_u_m,
    s_u_l,
    s_dt_m,
    s_dt_l,
    s_z_m,
    s_z_l,
    s_B_m,
    s_B_l,
    s_C_m,
    s_C_l,
    mask_d,
    mask_n,
    HAS_Z: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # TIME_TILE steps of modality m at once: u, dt, z (BLOCK_D, T) and B, C (N_PAD, T), loaded
    # along time (contiguous in the (M, b, D, L) layout), plus their finite-check terms.
    t = (t0 + cols)[None, :]
    md = mask_d[:, None] & tmask[None, :]
    mn = mask_n[:, None] & tmask[None, :]
    U = tl.load(u_ptr + m * s_u_m + row_u[:, None] + t * s_u_l, mask=md, other=0.0).to(COMPUTE)
    DT = tl.load(dt_ptr + m * s_dt_m + row_dt[:, None] + t * s_dt_l, mask=md, other=0.0)
    DT = DT.to(COMPUTE)
    Bt = tl.load(B_ptr + m * s_B_m + row_B[:, None] + t * s_B_l, mask=mn, other=0.0).to(COMPUTE)
    Ct = tl.load(C_ptr + m * s_C_m + row_C[:, None] + t * s_C_l, mask=mn, other=0.0).to(COMPUTE)
    check = U * 0.0 + DT * 0.0
    Z = U
    if HAS_Z:
        Z = tl.load(z_ptr + m * s_z_m + row_z[:, None] + t * s_z_l, mask=md, other=0.0)
        Z = Z.to(COMPUTE)
        check += Z * 0.0
    return U, DT, Z, Bt, Ct, _sum(check, axis=1), _sum(Bt * 0.0 + Ct * 0.0, axis=1)


@triton.jit
def _column(tile, cols, i: tl.constexpr):
    # tile[:, i] of a (rows, TIME_TILE) register tile.
    return _sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _tile_step(
    i: tl.constexpr,
    cols,
    mixed,
    A,
    Dm,
    bias,
    U,
    DT,
    Z,
    Bt,
    Ct,
    Y,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    # Step i of a loaded tile: new state (BLOCK_D, N_PAD) and Y with column i filled in.
    u = _column(U, cols, i)
    dt = _column(DT, cols, i)
    B = _column(Bt, cols, i)
    C = _column(Ct, cols, i)
    if HAS_BIAS:
        dt = dt + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    h = tl.exp(dt[:, None] * A) * mixed + (dt * u)[:, None] * B[None, :]
    y = _sum(h * C[None, :], axis=1)
    if HAS_D:
        y += Dm * u
    if HAS_Z:
        y = y * _silu(_column(Z, cols, i))
    return h, Y + tl.where(cols[None, :] == i, y[:, None], 0.0)


@triton.jit
def _store_tile(m: tl.constexpr, Y, t0, cols, tmask, y_ptr, row_y, s_y_m, s_y_l, mask_d):
    ptrs = y_ptr + m * s_y_m + row_y[:, None] + (t0 + cols)[None, :] * s_y_l
    tl.store(ptrs, Y.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & tmask[None, :])


@triton.jit
def _store_last(
    m: tl.constexpr, h, last_ptr, pid_b, offs_d, offs_n, mask_d, mask_n, s_m, s_b, s_d, s_n
):
    ptrs = last_ptr + m * s_m + pid_b * s_b + offs_d[:, None] * s_d + offs_n[None, :] * s_n
    tl.store(ptrs, h.to(last_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_n[None, :])


@triton.jit
def _load_state(
    m: tl.constexpr, h0_ptr, pid_b, offs_d, offs_n, mask_d, mask_n, s_m, s_b, s_d, s_n, COMPUTE
):
    # The initial state of modality m for this program, (BLOCK_D, N_PAD), zero in the padding.
    ptrs = h0_ptr + m * s_m + pid_b * s_b + offs_d[:, None] * s_d + offs_n[None, :] * s_n
    return tl.load(ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(COMPUTE)


@triton.jit
def coupled_scan_fwd_kernel(
    u_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    W_ptr,
    h0_ptr,
    y_ptr,
    last_ptr,
    flag_ptr,
    dim,
    length,
    s_u_m,
    s_u_b,
    s_u_d,
    s_u_l,
    s_dt_m,
    s_dt_b,
    s_dt_d,
    s_dt_l,
    s_A_m,
    s_A_d,
    s_A_n,
    s_B_m,
    s_B_b,
    s_B_n,
    s_B_l,
    s_C_m,
    s_C_b,
    s_C_n,
    s_C_l,
    s_z_m,
    s_z_b,
    s_z_d,
    s_z_l,
    s_y_m,
    s_y_b,
    s_y_d,
    s_y_l,
    s_D_m,
    s_D_d,
    s_bias_m,
    s_bias_d,
    s_W_m,
    s_W_k,
    s_h0_m,
    s_h0_b,
    s_h0_d,
    s_h0_n,
    s_last_m,
    s_last_b,
    s_last_d,
    s_last_n,
    M: tl.constexpr,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_LAST: tl.constexpr,
    COMPUTE: tl.constexpr,
    TIME_TILE: tl.constexpr,
):
    """Grid (cdiv(D, BLOCK_D), batch): program (i, b) scans channels [i*BLOCK_D, ...) of row b."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    offs_n = tl.arange(0, N_PAD)  # (N_PAD,)
    mask_d = offs_d < dim
    mask_n = offs_n < N
    # Offsets of this program's rows inside modality 0 at t = 0.
    row_u = pid_b * s_u_b + offs_d * s_u_d
    row_dt = pid_b * s_dt_b + offs_d * s_dt_d
    row_z = pid_b * s_z_b + offs_d * s_z_d
    row_y = pid_b * s_y_b + offs_d * s_y_d
    row_B = pid_b * s_B_b + offs_n * s_B_n
    row_C = pid_b * s_C_b + offs_n * s_C_n

    A0, D0, bias0, check_p = _load_params(
        0, A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_n, s_A_m, s_A_d, s_A_n,
        s_D_m, s_D_d, s_bias_m, s_bias_d, HAS_D, HAS_BIAS, COMPUTE,
    )  # fmt: skip
    # The states start at zero, or at the initial state (not part of the finite check: it is
    # usually an earlier call's last state, see coupled_selective_scan).
    h0 = tl.full((BLOCK_D, N_PAD), 0.0, COMPUTE)
    if HAS_H0:
        h0 = _load_state(0, h0_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                         s_h0_m, s_h0_b, s_h0_d, s_h0_n, COMPUTE)  # fmt: skip
    # Unused modalities keep zero-sized work: their names exist but constexpr branches skip them.
    A1, D1, bias1, h1 = A0, D0, bias0, h0
    A2, D2, bias2, h2 = A0, D0, bias0, h0
    A3, D3, bias3, h3 = A0, D0, bias0, h0
    if M > 1:
        A1, D1, bias1, c1 = _load_params(
            1, A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_n, s_A_m, s_A_d, s_A_n,
            s_D_m, s_D_d, s_bias_m, s_bias_d, HAS_D, HAS_BIAS, COMPUTE,
        )  # fmt: skip
        check_p += c1
        if HAS_H0:
            h1 = _load_state(1, h0_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                             s_h0_m, s_h0_b, s_h0_d, s_h0_n, COMPUTE)  # fmt: skip
    if M > 2:
        A2, D2, bias2, c2 = _load_params(
            2, A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_n, s_A_m, s_A_d, s_A_n,
            s_D_m, s_D_d, s_bias_m, s_bias_d, HAS_D, HAS_BIAS, COMPUTE,
        )  # fmt: skip
        check_p += c2
        if HAS_H0:
            h2 = _load_state(2, h0_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                             s_h0_m, s_h0_b, s_h0_d, s_h0_n, COMPUTE)  # fmt: skip
    if M > 3:
        A3, D3, bias3, c3 = _load_params(
            3, A_ptr, D_ptr, bias_ptr, offs_d, offs_n, mask_d, mask_n, s_A_m, s_A_d, s_A_n,
            s_D_m, s_D_d, s_bias_m, s_bias_d, HAS_D, HAS_BIAS, COMPUTE,
        )  # fmt: skip
        check_p += c3
        if HAS_H0:
            h3 = _load_state(3, h0_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                             s_h0_m, s_h0_b, s_h0_d, s_h0_n, COMPUTE)  # fmt: skip
    check_w = 0.0
    if HAS_W:
        for r in tl.static_range(M):
            for k in tl.static_range(M):
                check_w += tl.load(W_ptr + r * s_W_m + k * s_W_k).to(COMPUTE) * 0.0

    check_d = tl.full((BLOCK_D,), 0.0, COMPUTE)
    check_n = tl.full((N_PAD,), 0.0, COMPUTE)
    if TIME_TILE == 1:
        for t in range(length):
            x0, x1, x2, x3 = _mix_all(W_ptr, s_W_m, s_W_k, h0, h1, h2, h3, M, HAS_W)
            h0, cd, cn = _step(
                0, t, x0, A0, D0, bias0, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr,
                row_u, row_dt, row_z, row_y, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                s_z_m, s_z_l, s_y_m, s_y_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n,
                HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, COMPUTE,
            )  # fmt: skip
            check_d += cd
            check_n += cn
            if M > 1:
                h1, cd, cn = _step(
                    1, t, x1, A1, D1, bias1, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr,
                    row_u, row_dt, row_z, row_y, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_y_m, s_y_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n,
                    HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
            if M > 2:
                h2, cd, cn = _step(
                    2, t, x2, A2, D2, bias2, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr,
                    row_u, row_dt, row_z, row_y, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_y_m, s_y_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n,
                    HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
            if M > 3:
                h3, cd, cn = _step(
                    3, t, x3, A3, D3, bias3, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, y_ptr,
                    row_u, row_dt, row_z, row_y, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_y_m, s_y_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n,
                    HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
    else:
        # TIME_TILE steps per iteration: tiles loaded and stored along time, steps unrolled.
        cols = tl.arange(0, TIME_TILE)
        for t0 in range(0, length, TIME_TILE):
            tmask = (t0 + cols) < length
            U0, DT0, Z0, B0, C0, cd, cn = _load_tile(
                0, t0, cols, tmask, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                row_u, row_dt, row_z, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                s_z_m, s_z_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n, HAS_Z, COMPUTE,
            )  # fmt: skip
            check_d += cd
            check_n += cn
            U1, DT1, Z1, B1, C1 = U0, DT0, Z0, B0, C0
            U2, DT2, Z2, B2, C2 = U0, DT0, Z0, B0, C0
            U3, DT3, Z3, B3, C3 = U0, DT0, Z0, B0, C0
            if M > 1:
                U1, DT1, Z1, B1, C1, cd, cn = _load_tile(
                    1, t0, cols, tmask, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                    row_u, row_dt, row_z, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n, HAS_Z, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
            if M > 2:
                U2, DT2, Z2, B2, C2, cd, cn = _load_tile(
                    2, t0, cols, tmask, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                    row_u, row_dt, row_z, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n, HAS_Z, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
            if M > 3:
                U3, DT3, Z3, B3, C3, cd, cn = _load_tile(
                    3, t0, cols, tmask, u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr,
                    row_u, row_dt, row_z, row_B, row_C, s_u_m, s_u_l, s_dt_m, s_dt_l,
                    s_z_m, s_z_l, s_B_m, s_B_l, s_C_m, s_C_l, mask_d, mask_n, HAS_Z, COMPUTE,
                )  # fmt: skip
                check_d += cd
                check_n += cn
            Y0 = tl.full((BLOCK_D, TIME_TILE), 0.0, COMPUTE)
            Y1 = Y0
            Y2 = Y0
            Y3 = Y0
            for i in tl.static_range(TIME_TILE):
                valid = t0 + i < length  # the last tile may run past the end
                x0, x1, x2, x3 = _mix_all(W_ptr, s_W_m, s_W_k, h0, h1, h2, h3, M, HAS_W)
                h0n, Y0 = _tile_step(
                    i, cols, x0, A0, D0, bias0, U0, DT0, Z0, B0, C0, Y0,
                    HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                )  # fmt: skip
                h0 = tl.where(valid, h0n, h0)
                if M > 1:
                    h1n, Y1 = _tile_step(
                        i, cols, x1, A1, D1, bias1, U1, DT1, Z1, B1, C1, Y1,
                        HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                    )  # fmt: skip
                    h1 = tl.where(valid, h1n, h1)
                if M > 2:
                    h2n, Y2 = _tile_step(
                        i, cols, x2, A2, D2, bias2, U2, DT2, Z2, B2, C2, Y2,
                        HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                    )  # fmt: skip
                    h2 = tl.where(valid, h2n, h2)
                if M > 3:
                    h3n, Y3 = _tile_step(
                        i, cols, x3, A3, D3, bias3, U3, DT3, Z3, B3, C3, Y3,
                        HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                    )  # fmt: skip
                    h3 = tl.where(valid, h3n, h3)
            _store_tile(0, Y0, t0, cols, tmask, y_ptr, row_y, s_y_m, s_y_l, mask_d)
            if M > 1:
                _store_tile(1, Y1, t0, cols, tmask, y_ptr, row_y, s_y_m, s_y_l, mask_d)
            if M > 2:
                _store_tile(2, Y2, t0, cols, tmask, y_ptr, row_y, s_y_m, s_y_l, mask_d)
            if M > 3:
                _store_tile(3, Y3, t0, cols, tmask, y_ptr, row_y, s_y_m, s_y_l, mask_d)

    if STORE_LAST:
        _store_last(0, h0, last_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                    s_last_m, s_last_b, s_last_d, s_last_n)  # fmt: skip
        if M > 1:
            _store_last(1, h1, last_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                        s_last_m, s_last_b, s_last_d, s_last_n)  # fmt: skip
        if M > 2:
            _store_last(2, h2, last_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                        s_last_m, s_last_b, s_last_d, s_last_n)  # fmt: skip
        if M > 3:
            _store_last(3, h3, last_ptr, pid_b, offs_d, offs_n, mask_d, mask_n,
                        s_last_m, s_last_b, s_last_d, s_last_n)  # fmt: skip

    # NaN here iff some loaded input was NaN or infinite (x * 0 propagates both).
    total = _sum(check_d + check_p, axis=0) + _sum(check_n, axis=0) + check_w
    tl.atomic_or(flag_ptr, (total != 0.0).to(tl.int32))
