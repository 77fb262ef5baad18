"""Triton backend of the coupled selective scan (GPU; the interpreter runs it on CPU tensors).

Importing this module does not import triton: the kernel module is loaded on first use. CUDA tensors
run the compiled kernel. CPU tensors run the same kernel in Triton's interpreter (slow: meant for
tests on tiny shapes); that copy of the kernel module is loaded with the interpreter switched on
for its definitions only, so compiled and interpreted kernels can live in one process and no
environment variable has to be set before triton is imported (``TRITON_INTERPRET=1`` still works).

The backward pass recomputes the forward with the torch backend and differentiates that.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from model.ops.scan_torch import coupled_selective_scan_torch
from model.ops.validation import find_nonfinite, nonfinite_error

_KERNEL_MODULE = "model.ops._triton_kernel"
_INTERPRETED_MODULE = "model.ops._triton_kernel_interpreted"
_lock = threading.Lock()
_modules: dict[bool, ModuleType] = {}


def kernel_module(interpret: bool) -> ModuleType:
    """The kernel module, compiled (``interpret=False``) or for the interpreter (``True``)."""
    with _lock:
        if interpret not in _modules:
            _modules[interpret] = _load(interpret)
        return _modules[interpret]


def _load(interpret: bool) -> ModuleType:
    import triton  # deferred: importing model.ops must not need triton

    if not interpret or triton.knobs.runtime.interpret:
        return importlib.import_module(_KERNEL_MODULE)
    # A second copy of the kernel module whose @triton.jit functions are built for the interpreter.
    spec = importlib.util.find_spec(_KERNEL_MODULE)
    assert spec is not None and spec.origin is not None
    copy_spec = importlib.util.spec_from_file_location(_INTERPRETED_MODULE, spec.origin)
    assert copy_spec is not None and copy_spec.loader is not None
    module = importlib.util.module_from_spec(copy_spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        sys.modules[_INTERPRETED_MODULE] = module
        copy_spec.loader.exec_module(module)
    return module


def triton_available() -> bool:
    """True when triton imports and the kernel module builds (says nothing about a GPU)."""
    return triton_unusable_reason() is None


def triton_unusable_reason() -> str | None:
    """None when triton imports and the kernel module builds, else why not (one line)."""
    try:
        kernel_module(interpret=False)
    except Exception as exc:  # any import or definition failure means: not usable here
        return f"{type(exc).__name__}: {exc}"
    return None


def default_block_d(batch: int, dim: int, device: torch.device) -> int:
    """Channels per program.

    On CUDA: 16, or 8 when 16 would leave fewer than 8 programs per SM. With one warp per program
    (``default_num_warps``) these blocks compile (sm_90, Triton 3.6) with the N-reduction inside a
    warp and no barrier in the time loop; larger blocks or more warps add shared-memory layout
    conversions (barriers) to every step. Not yet tuned on a GPU: ``bench/scan.py`` sweeps
    block_d x num_warps on CUDA and reports the best pair.
    On CPU (the interpreter): 16, or less for narrow inputs; fewer programs interpret faster.
    """
    if device.type != "cuda":
        return min(16, triton_next_power_of_2(dim))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return 16 if batch * triton_cdiv(dim, 16) >= 8 * sms else 8


def triton_next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


# Time steps per loop iteration of the kernel. 1: load and store one step at a time (each a
# strided access in the (M, b, D, L) layout). >1: load tiles of that many steps along time and
# unroll the steps over them. Untuned; bench/scan.py sweeps both on a GPU.
DEFAULT_TIME_TILE = 1


def default_num_warps(block_d: int, n_pad: int) -> int:
    """One warp per program up to 16 x 16 state elements per modality, then one per 512."""
    return max(1, min(8, (block_d * n_pad) // 512))


def _launch_plan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    coupling: Tensor | None,
    return_last_state: bool,
    block_d: int | None,
    num_warps: int | None,
    max_modalities: int,
    time_tile: int | None = None,
    initial_state: Tensor | None = None,
) -> tuple[tuple[int, int], tuple[Any, ...], dict[str, Any], Tensor, Tensor, Tensor]:
    """Allocate the outputs and build (grid, positional args, keyword args) for one launch."""
    M, batch, dim, length = u.shape
    n_state = A.shape[-1]
    if max_modalities < M:
        raise ValueError(
            f"coupled_selective_scan: the triton backend supports at most "
            f"{max_modalities} modalities, got M = {M}"
        )
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    n_pad = triton_next_power_of_2(n_state)
    block = block_d or default_block_d(batch, dim, u.device)
    warps = num_warps or default_num_warps(block, n_pad)

    y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if return_last_state:
        last = torch.empty((M, batch, dim, n_state), dtype=compute, device=u.device)
    else:
        last = torch.empty((1, 1, 1, 1), dtype=compute, device=u.device)
    flag = torch.zeros(1, dtype=torch.int32, device=u.device)

    def strides(t: Tensor | None, rank: int) -> tuple[int, ...]:
        # Absent inputs: zero strides, and y stands in as a valid pointer (never read).
        return tuple(t.stride()) if t is not None else (0,) * rank

    def pointer(t: Tensor | None) -> Tensor:
        return t if t is not None else y

    args = (
        u, delta, A, B, C, pointer(D), pointer(z), pointer(delta_bias), pointer(coupling),
        pointer(initial_state), y, last, flag,
        dim, length,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        *strides(z, 4), *y.stride(), *strides(D, 2), *strides(delta_bias, 2),
        *strides(coupling, 2), *strides(initial_state, 4),
        *strides(last if return_last_state else None, 4),
    )  # fmt: skip
    kwargs = {
        "M": M,
        "N": n_state,
        "N_PAD": n_pad,
        "BLOCK_D": block,
        "HAS_D": D is not None,
        "HAS_Z": z is not None,
        "HAS_BIAS": delta_bias is not None,
        "SOFTPLUS": bool(delta_softplus),
        "HAS_W": coupling is not None,
        "HAS_H0": initial_state is not None,
        "STORE_LAST": bool(return_last_state),
        "COMPUTE": _tl_dtype(compute),
        "TIME_TILE": time_tile or DEFAULT_TIME_TILE,
        "num_warps": warps,
    }
    return (triton_cdiv(dim, block), batch), args, kwargs, y, last, flag


def launch_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    coupling: Tensor | None,
    return_last_state: bool,
    block_d: int | None = None,
    num_warps: int | None = None,
    time_tile: int | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Launch the kernel; return y, the last state (or None) and the int32 non-finite flag.

    The flag is not read here, so the launch stays asynchronous; ``coupled_selective_scan_triton``
    reads it once.
    """
    module = kernel_module(interpret=u.device.type != "cuda")
    grid, args, kwargs, y, last, flag = _launch_plan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, return_last_state,
        block_d, num_warps, module.MAX_MODALITIES, time_tile, initial_state,
    )  # fmt: skip
    module.coupled_scan_fwd_kernel[grid](*args, **kwargs)
    return y, (last if return_last_state else None), flag


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def _tl_dtype(dtype: torch.dtype) -> Any:
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


class _TritonScanFunction(torch.autograd.Function):
    """Forward: the kernel. Backward: recompute with the torch backend and differentiate it."""

    @staticmethod
    def forward(
        ctx: Any,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        coupling: Tensor | None,
        initial_state: Tensor | None,
        delta_softplus: bool,
        block_d: int | None,
        num_warps: int | None,
        time_tile: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, last, flag = launch_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling, True,
            block_d, num_warps, time_tile, initial_state,
        )  # fmt: skip
        assert last is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, coupling, initial_state)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(flag)
        return y, last, flag

    @staticmethod
    def backward(
        ctx: Any, gy: Tensor | None, g_last: Tensor | None, _g_flag: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:10]
        with torch.enable_grad():
            inputs: list[Tensor | None] = [
                t.detach().requires_grad_(need) if t is not None else None
                for t, need in zip(saved, needs, strict=True)
            ]
            u, delta, A, B, C, D, z, delta_bias, coupling, initial_state = inputs
            assert u is not None and delta is not None and A is not None
            assert B is not None and C is not None
            y, last = coupled_selective_scan_torch(
                u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, coupling, True,
                initial_state=initial_state,
            )  # fmt: skip
            outputs, grad_outputs = [], []
            if gy is not None:
                outputs.append(y)
                grad_outputs.append(gy)
            if g_last is not None:
                outputs.append(last)
                grad_outputs.append(g_last)
            wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
            grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True))
        result: list[Tensor | None] = [
            next(grads) if need and t is not None else None
            for t, need in zip(inputs, needs, strict=True)
        ]
        return (*result, None, None, None, None)


def coupled_selective_scan_triton(
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
    block_d: int | None = None,
    num_warps: int | None = None,
    time_tile: int | None = None,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Coupled selective scan with the Triton kernel; same contract as the ref backend.

    Checks the inputs for NaN/inf inside the kernel and raises ValueError naming them (one host
    synchronisation per call, after the launch); ``initial_state`` is not checked. ``block_d``,
    ``num_warps`` and ``time_tile`` (steps loaded per tile: 1, or a power of two) override the
    launch defaults (benchmarks). Shapes must already be validated.
    """
    tensors = (u, delta, A, B, C, D, z, delta_bias, coupling, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad:
        y, last, flag = _TritonScanFunction.apply(
            u, delta, A, B, C, D, z, delta_bias, coupling, initial_state, delta_softplus,
            block_d, num_warps, time_tile,
        )  # fmt: skip
    else:
        y, last_opt, flag = launch_forward(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, coupling,
            return_last_state, block_d, num_warps, time_tile, initial_state,
        )  # fmt: skip
        last = last_opt
    if bool(flag.item()):
        named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z}
        bad = find_nonfinite(named | {"delta_bias": delta_bias, "coupling": coupling})
        raise nonfinite_error(bad or ["the inputs"])
    if return_last_state:
        return y, last
    return y


def compile_for_target(
    arch: int = 90,
    dtype: torch.dtype = torch.float32,
    modalities: int = 3,
    batch: int = 2,
    dim: int = 64,
    n_state: int = 16,
    length: int = 8,
    with_options: bool = True,
    block_d: int | None = 16,
    num_warps: int | None = None,
    time_tile: int | None = None,
) -> dict[str, Any]:
    """Compile the kernel ahead of time for a CUDA architecture (e.g. 90 = H100), no GPU needed.

    Builds the launch exactly as a call on contiguous tensors of the given sizes would (same
    arguments, same specialisation of unit strides and alignment), but compiles for ``arch``
    instead of launching. ``with_options`` turns on every optional input (the initial state
    included). Returns the
    artefacts by stage (``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``). Used by the tests
    and ``scripts/gpu_check.sh`` to catch kernels that fail to lower, without a GPU.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    g = torch.Generator().manual_seed(0)
    M, b, Dm, N, L = modalities, batch, dim, n_state, length

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

    opt = with_options
    _, args, kwargs, *_ = _launch_plan(
        rand(M, b, Dm, L), rand(M, b, Dm, L), -rand(M, Dm, N), rand(M, b, N, L),
        rand(M, b, N, L), rand(M, Dm) if opt else None, rand(M, b, Dm, L) if opt else None,
        rand(M, Dm) if opt else None, opt, rand(M, M) if opt else None, opt,
        block_d, num_warps, kernel_module(interpret=False).MAX_MODALITIES, time_tile,
        rand(M, b, Dm, N) if opt else None,
    )  # fmt: skip
    kernel = kernel_module(interpret=False).coupled_scan_fwd_kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = compile(source, target=target, options=options.__dict__)
    return dict(compiled.asm)
