"""The fast path of a Coupled Mamba layer: which conv and which scan run, chosen once per device.

``choose_fast_path(device, state_coupling, scan_backend)`` resolves the scan backend ("auto" on
CUDA: triton when it imports, else torch; on a CPU: torch), the optional kernels of
``model.ops.mamba_kernels`` (causal-conv1d's conv, mamba-ssm's scan for W = I layers), keeps the
functions it chose in a ``FastPath`` and logs (INFO) what it chose and why, including why a
faster kernel was not usable. A model holds one ``FastPath`` for its device and calls its
``conv`` and ``scan`` on every forward: nothing is decided again per call, except what only the
call can know (whether autograd needs the scan's backward; whether mamba-ssm's scan, which takes
neither a coupling nor an initial state, can run this chunk).

Both callables take and give the model's activations as rows of time steps, (b, L, X) per
modality; each scan stacks the modalities in the layout its kernel reads best:
- ``RowsScan`` (the torch backend): (M, b, L, X), a view for one modality, no transposes;
- ``ChannelScan`` (ref, triton, mamba-ssm): (M, b, X, L) contiguous, the GPU kernels' layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from model.ops import BACKENDS, coupled_selective_scan, explain_backend, mamba_kernels
from model.ops.mamba_kernels import KernelChoice
from model.ops.scan_torch import coupled_selective_scan_rows

logger = logging.getLogger(__name__)

ConvFn = Callable[
    [Tensor, Tensor, Tensor | None, Tensor | None, bool], tuple[Tensor, Tensor | None]
]
"""``conv(x, weight, bias, conv_state, carry) -> (out, next_state)``: SiLU(causal depthwise
conv) of rows x (b, L, D) with taps weight (D, k) and bias (D,) or None, after ``conv_state``
(b, D, k-1) when given (None: zeros before the first step). Returns rows (b, L, D) and, when
``carry`` or ``conv_state`` is given, the last k-1 inputs (b, D, k-1) for the next chunk."""


def stack_modalities(tensors: list[Tensor], copy: bool = True) -> Tensor:
    """``torch.stack`` along a new first (modality) axis; with one tensor and ``copy=False``, a
    view instead of a copy (one modality is the common case, and the copy is pure traffic)."""
    if len(tensors) == 1 and not copy:
        return tensors[0].unsqueeze(0)
    return torch.stack(tensors)


# -- conv ---------------------------------------------------------------------------------------


def causal_conv_rows(
    x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, carry: bool
) -> tuple[Tensor, Tensor | None]:
    """The torch conv (``ConvFn``) on time-major rows: k multiply-adds of shifted (b, L, D)
    slices of [state, x].

    The same sums as ``nn.Conv1d`` (up to float rounding) without its two layout changes; for a
    depthwise conv of width 4 this is several times faster on CPU than the conv kernel.
    Differentiable (the in-place adds are on a fresh tensor).
    """
    batch, length, dim = x.shape
    width = weight.shape[-1]
    keep = width - 1
    if conv_state is not None:
        before = conv_state.transpose(1, 2)  # (b, k-1, D)
    else:
        before = x.new_zeros(batch, keep, dim)
    padded = torch.cat([before, x], dim=1)  # (b, k-1 + L, D)
    taps = weight.t()  # (k, D)
    out = torch.mul(padded[:, :length], taps[0])
    for k in range(1, width):
        out.addcmul_(padded[:, k : k + length], taps[k])
    if bias is not None:
        out += bias
    next_state = None
    if carry or conv_state is not None:
        next_state = padded[:, padded.shape[1] - keep :].transpose(1, 2)  # (b, D, k-1)
    return F.silu(out), next_state


@dataclass(frozen=True)
class KernelConv:
    """causal-conv1d's conv as a ``ConvFn`` (the kernel reads channel-first (b, D, L))."""

    fn: Callable[..., Any]

    def __call__(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, carry: bool
    ) -> tuple[Tensor, Tensor | None]:
        u = x.transpose(1, 2)  # (b, D, L)
        length = u.shape[-1]
        keep = weight.shape[-1] - 1
        next_state = None
        if carry or conv_state is not None:
            before = conv_state if conv_state is not None else u.new_zeros(*u.shape[:-1], keep)
            next_state = torch.cat([before, u[..., length - min(length, keep) :]], dim=-1)
            next_state = next_state[..., next_state.shape[-1] - keep :]  # (b, D, k-1)
        # With a carried state the conv runs over [state, u]: k-1 more inputs, dropped after.
        full = u if conv_state is None else torch.cat([conv_state, u], dim=-1)
        out = mamba_kernels.causal_conv1d_silu(full, weight, bias, fn=self.fn)
        return out[..., full.shape[-1] - length :].transpose(1, 2), next_state  # (b, L, D)


# -- scan ---------------------------------------------------------------------------------------


class LayerScan(Protocol):
    """The coupled scan of one layer: ``stack`` each input's per-modality rows, then call."""

    def stack(self, rows: list[Tensor]) -> Tensor:
        """Per-modality rows (b, L, X) -> this scan's input layout with a leading M axis."""
        ...

    def __call__(
        self,
        u: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        z: Tensor,
        coupling: Tensor | None,
        initial_state: Tensor | None,
        return_last_state: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """The scan of stacked inputs (dt used as given); returns y as rows (M, b, L, D) and
        the last state (M, b, D, N) when asked (else None)."""
        ...


class RowsScan:
    """The torch backend on (M, b, L, X) rows: ``coupled_selective_scan_rows``."""

    backend = "torch"

    def stack(self, rows: list[Tensor]) -> Tensor:
        return stack_modalities(rows, copy=False)

    def __call__(
        self,
        u: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        z: Tensor,
        coupling: Tensor | None,
        initial_state: Tensor | None,
        return_last_state: bool,
    ) -> tuple[Tensor, Tensor | None]:
        y, last = coupled_selective_scan_rows(
            u, dt, A, B, C, D=D, z=z, coupling=coupling, initial_state=initial_state
        )
        return y, (last if return_last_state else None)


@dataclass(frozen=True)
class ChannelScan:
    """``model.ops.coupled_selective_scan`` with a named backend on (M, b, X, L) inputs, or,
    where given and able (W = I, no initial state), mamba-ssm's ``selective_scan_fn``."""

    backend: str
    uncoupled: Callable[..., Any] | None = None

    def stack(self, rows: list[Tensor]) -> Tensor:
        return torch.stack([t.transpose(1, 2) for t in rows])  # (M, b, X, L)

    def __call__(
        self,
        u: Tensor,
        dt: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        z: Tensor,
        coupling: Tensor | None,
        initial_state: Tensor | None,
        return_last_state: bool,
    ) -> tuple[Tensor, Tensor | None]:
        if self.uncoupled is not None and coupling is None and initial_state is None:
            result = mamba_kernels.uncoupled_selective_scan(
                u, dt, A, B, C, D=D, z=z, return_last_state=return_last_state, fn=self.uncoupled
            )
        else:
            result = coupled_selective_scan(
                u, dt, A, B, C, D=D, z=z, delta_softplus=False, coupling=coupling,
                return_last_state=return_last_state, backend=self.backend,
                initial_state=initial_state,
            )  # fmt: skip
        if isinstance(result, tuple):
            return result[0].transpose(2, 3), result[1]  # y (M, b, D, L) -> (M, b, L, D)
        return result.transpose(2, 3), None


# -- the choice ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPath:
    """What a model runs on one device, chosen once by ``choose_fast_path``.

    Attributes:
        device: the device it was chosen for.
        scan_backend: the concrete backend of ``model.ops.BACKENDS``.
        kernels: the optional kernels (``model.ops.mamba_kernels.KernelChoice``).
        reasons: why, one sentence per choice (logged at INFO when chosen).
        conv: the ``ConvFn`` every mixer runs.
        scan: the ``LayerScan`` every layer runs.
    """

    device: torch.device
    scan_backend: str
    kernels: KernelChoice
    reasons: tuple[str, ...]
    conv: ConvFn = field(repr=False, compare=False)
    scan: LayerScan = field(repr=False, compare=False)

    def summary(self) -> str:
        """One line: the choices and their reasons."""
        return f"scan backend {self.scan_backend}: " + "; ".join(self.reasons)


def check_scan_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is "auto" or a name of ``model.ops.BACKENDS``."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; available: {BACKENDS} or 'auto'")


def resolve_scan_backend(name: str, device: torch.device | str) -> tuple[str, str]:
    """A backend request ("auto" or a name of ``model.ops.BACKENDS``) -> (backend, why).

    Raises:
        ValueError: an unknown name.
    """
    check_scan_backend_name(name)
    if name == "auto":
        return explain_backend(device)
    return name, f"{name} asked for by name"


def choose_fast_path(
    device: torch.device | str,
    state_coupling: str,
    scan_backend: str = "auto",
    kernels: KernelChoice | None = None,
) -> FastPath:
    """Choose, and log at INFO, the scan and conv a model with ``state_coupling`` runs on
    ``device``.

    Args:
        device: where the model's parameters are.
        state_coupling: the config's ``state_coupling`` (mamba-ssm's scan serves "none" only).
        scan_backend: "auto" or a name of ``model.ops.BACKENDS``.
        kernels: force these optional kernels (benchmarks, tests) instead of choosing them.

    Raises:
        ValueError: an unknown backend or kernel name.
        RuntimeError: a forced kernel that does not import here.
    """
    device = torch.device(device)
    backend, why = resolve_scan_backend(scan_backend, device)
    if kernels is None:
        kernels, kernel_reasons = mamba_kernels.explain_kernels(device, state_coupling, backend)
    else:
        mamba_kernels.require(kernels)
        kernel_reasons = (f"kernels forced: conv {kernels.conv}, uncoupled scan "
                          f"{kernels.uncoupled_scan or 'ours'}",)  # fmt: skip
    conv: ConvFn = causal_conv_rows
    if kernels.conv == "causal_conv1d":
        conv = KernelConv(_loaded(mamba_kernels.load_causal_conv1d()))
    scan: LayerScan
    if kernels.uncoupled_scan == "mamba_ssm":
        scan = ChannelScan(backend, _loaded(mamba_kernels.load_selective_scan()))
    elif backend == "torch":
        scan = RowsScan()
    else:
        scan = ChannelScan(backend)
    path = FastPath(device, backend, kernels, (why, *kernel_reasons), conv, scan)
    logger.info("fast path on %s: %s", device, path.summary())
    return path


def _loaded(fn: Callable[..., Any] | None) -> Callable[..., Any]:
    if fn is None:  # explain_kernels / require saw it import a moment ago
        raise RuntimeError("a kernel that imported at selection no longer imports")
    return fn
