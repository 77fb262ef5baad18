"""Optional CUDA kernels of the ``mamba-ssm`` and ``causal-conv1d`` packages (GPU image only).

The GPU image compiles both packages (see the Dockerfile); nothing else has them, and neither runs
on a CPU. Where they import, the model uses them for what they can compute:

- ``causal_conv1d.causal_conv1d_fn``: the causal depthwise convolution + SiLU of every mixer;
- ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``: the scan of the uncoupled ablation
  (``state_coupling="none"``, W = I), one call per modality. It cannot compute a coupled scan (its
  transition is the decay ``exp(dt A)`` alone, with no cross-modal mix) and takes no initial state,
  so coupled layers and the chunks after the first of a chunked inference run our own kernel.

Imports are lazy (first use), so importing ``model.ops`` never imports either package. The choice
is made once, at model load (``explain_kernels``, through ``model.ops.fast_path``), logged with
its reasons, and reported by ``model.describe()``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

CONV_KERNELS = ("torch", "causal_conv1d")
"""Depthwise causal conv implementations: PyTorch's conv1d, or causal-conv1d's CUDA kernel."""

UNCOUPLED_SCAN_KERNELS = ("mamba_ssm",)
"""Replacements of our scan for W = I layers (None in a ``KernelChoice`` means our scan)."""

_CONV_SOURCE = ("causal_conv1d", "causal_conv1d_fn")
_SCAN_SOURCE = ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def probe(module: str, name: str) -> tuple[Callable[..., Any] | None, str | None]:
    """``module.name`` and None when it imports and is callable, else None and why not.

    A successful import is a sys.modules lookup afterwards; a failed one is only attempted at
    selection time (model load). Any failure (missing package, CUDA extension that does not
    load on this machine, API change) means "not usable here"; the reason is kept so that the
    selection can report it.
    """
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:  # every failure means "not usable here", with its reason
        return None, f"{module}.{name} does not import ({type(exc).__name__}: {exc})"
    if not callable(fn):
        return None, f"{module}.{name} is not callable"
    return fn, None


def load_causal_conv1d() -> Callable[..., Any] | None:
    """``causal_conv1d.causal_conv1d_fn``, or None when it does not import."""
    return probe(*_CONV_SOURCE)[0]


def load_selective_scan() -> Callable[..., Any] | None:
    """``mamba_ssm``'s ``selective_scan_fn``, or None when it does not import."""
    return probe(*_SCAN_SOURCE)[0]


@dataclass(frozen=True)
class KernelChoice:
    """Which optional kernels a model runs (decided once, at load).

    Attributes:
        conv: "torch" or "causal_conv1d" (the depthwise causal conv + SiLU).
        uncoupled_scan: "mamba_ssm" when W = I layers run mamba-ssm's selective scan, else None
            (our coupled scan with the model's scan backend).
    """

    conv: str = "torch"
    uncoupled_scan: str | None = None

    def __post_init__(self) -> None:
        if self.conv not in CONV_KERNELS:
            raise ValueError(f"conv kernel must be one of {CONV_KERNELS}, got {self.conv!r}")
        if self.uncoupled_scan is not None and self.uncoupled_scan not in UNCOUPLED_SCAN_KERNELS:
            raise ValueError(
                f"uncoupled scan kernel must be None or one of {UNCOUPLED_SCAN_KERNELS}, "
                f"got {self.uncoupled_scan!r}"
            )


def select_kernels(
    device: torch.device | str, state_coupling: str, scan_backend: str
) -> KernelChoice:
    """The kernels to use on ``device`` (``explain_kernels`` without the reasons)."""
    return explain_kernels(device, state_coupling, scan_backend)[0]


def explain_kernels(
    device: torch.device | str, state_coupling: str, scan_backend: str
) -> tuple[KernelChoice, tuple[str, ...]]:
    """The kernels to use on ``device``, and one sentence per kernel saying why.

    causal-conv1d's conv on CUDA when it imports; mamba-ssm's scan on CUDA when it imports, the
    layers are uncoupled (``state_coupling == "none"``) and the scan backend is our GPU kernel
    ("triton"): a backend asked for by name ("ref", "torch") is kept as asked. On a CPU: torch
    and our scan, always (neither package has a CPU path).
    """
    if torch.device(device).type != "cuda":
        return KernelChoice(), (
            "conv torch (causal-conv1d runs on CUDA only)",
            "uncoupled scan: ours (mamba-ssm runs on CUDA only)",
        )
    conv_fn, conv_why = probe(*_CONV_SOURCE)
    conv = "causal_conv1d" if conv_fn is not None else "torch"
    reasons = [
        "conv causal_conv1d (imports on CUDA)" if conv_fn is not None else f"conv torch: {conv_why}"
    ]
    scan = None
    if state_coupling != "none":
        reasons.append(f"uncoupled scan: ours (layers are coupled: {state_coupling!r})")
    elif scan_backend != "triton":
        reasons.append(f"uncoupled scan: ours (scan backend {scan_backend!r} asked for)")
    else:
        scan_fn, scan_why = probe(*_SCAN_SOURCE)
        if scan_fn is not None:
            scan = "mamba_ssm"
            reasons.append("uncoupled scan: mamba_ssm (W = I layers, first chunk; imports)")
        else:
            reasons.append(f"uncoupled scan: ours: {scan_why}")
    return KernelChoice(conv, scan), tuple(reasons)


def require(choice: KernelChoice) -> None:
    """Raise RuntimeError when a kernel of ``choice`` does not import here."""
    if choice.conv == "causal_conv1d":
        fn, why = probe(*_CONV_SOURCE)
        if fn is None:
            raise RuntimeError(why)
    if choice.uncoupled_scan == "mamba_ssm":
        fn, why = probe(*_SCAN_SOURCE)
        if fn is None:
            raise RuntimeError(why)


def causal_conv1d_silu(
    x: Tensor, weight: Tensor, bias: Tensor | None, fn: Callable[..., Any] | None = None
) -> Tensor:
    """SiLU(causal depthwise conv) with causal-conv1d's kernel.

    Args:
        x: (b, D, L) inputs, zero before the first step (the kernel pads with zeros).
        weight: (D, width) taps, the last one applied to the current step.
        bias: (D,) or None.
        fn: ``causal_conv1d_fn`` as loaded at selection time (None: import it now).

    Returns:
        (b, D, L), the same as ``silu(conv1d(x, weight[:, None], bias, padding=width-1,
        groups=D)[..., :L])``.
    """
    fn = fn or load_causal_conv1d()
    if fn is None:
        raise RuntimeError("causal_conv1d.causal_conv1d_fn does not import here")
    # Channel-first contiguous (b, D, L): the layout every version of the kernel takes (a
    # (b, L, D) activation transposed is channel-last, which some versions restrict).
    return fn(x.contiguous(), weight.contiguous(), bias, activation="silu")


def uncoupled_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    fn: Callable[..., Any] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``coupled_selective_scan`` with W = I, computed by mamba-ssm's ``selective_scan_fn``.

    Same shapes as ``model.ops.coupled_selective_scan`` (u, delta, z (M, b, D, L); A (M, D, N);
    B, C (M, b, N, L); D, delta_bias (M, D)). With W = I each modality is an independent Mamba
    scan, so modality m is one ``selective_scan_fn`` call on the m-th slices (mamba-ssm's layout
    exactly: u (b, D, L), A (D, N), B and C (b, N, L), D and delta_bias (D,)); the slices are
    views, nothing is copied but the stacked outputs. Differentiable through mamba-ssm's
    backward (which ignores the gradient of the last state).
    """
    fn = fn or load_selective_scan()
    if fn is None:
        raise RuntimeError("mamba_ssm's selective_scan_fn does not import here")
    outputs, lasts = [], []
    for m in range(u.shape[0]):
        result = fn(
            u[m],
            delta[m],
            A[m],
            B[m],
            C[m],
            D[m] if D is not None else None,
            z[m] if z is not None else None,
            delta_bias[m] if delta_bias is not None else None,
            delta_softplus,
            return_last_state,
        )
        if return_last_state:
            y, last = result
            lasts.append(last)
        else:
            y = result
        outputs.append(y)
    out = torch.stack(outputs)  # (M, b, D, L)
    if return_last_state:
        return out, torch.stack(lasts)  # (M, b, D, N)
    return out
