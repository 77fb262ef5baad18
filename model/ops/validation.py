"""Input checks shared by every scan backend.

Shape checks cost nothing (they read sizes only). The finite check reads the data: it is done with
one combined reduction and a single host synchronisation (`find_nonfinite`), and the Triton kernel
does it inside the kernel instead, on values it loads anyway, so the GPU path pays no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_PREFIX = "coupled_selective_scan"


@dataclass(frozen=True)
class ScanDims:
    """Sizes of one scan call: modalities, batch, channels, state size, time steps."""

    modalities: int
    batch: int
    dim: int
    state: int
    length: int


def _fail(message: str) -> ValueError:
    return ValueError(f"{_PREFIX}: {message}")


def _expect(name: str, tensor: object, shape: tuple[int, ...], layout: str) -> None:
    if not isinstance(tensor, Tensor):
        raise _fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != len(shape):
        raise _fail(
            f"{name} must have {len(shape)} dimensions {layout}, got shape {tuple(tensor.shape)}"
        )
    if tuple(tensor.shape) != shape:
        raise _fail(f"{name} must have shape {layout} = {shape}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise _fail(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def validate_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    coupling: Tensor | None,
    initial_state: Tensor | None = None,
) -> ScanDims:
    """Check ranks, shapes, dtypes and devices of the scan's inputs; return the sizes.

    Raises ValueError naming the first offending argument. Reads no tensor data.
    """
    if not isinstance(u, Tensor):
        raise _fail(f"u must be a torch.Tensor, got {type(u).__name__}")
    if u.dim() != 4:
        raise _fail(f"u must have 4 dimensions (M, batch, D, L), got shape {tuple(u.shape)}")
    M, batch, dim, length = (int(s) for s in u.shape)
    if min(M, batch, dim, length) < 1:
        raise _fail(f"u must have every size >= 1 (M, batch, D, L), got {tuple(u.shape)}")
    if not isinstance(A, Tensor):
        raise _fail(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 3:
        raise _fail(f"A must have 3 dimensions (M, D, N), got shape {tuple(A.shape)}")
    if A.shape[0] != M:
        raise _fail(f"A has {A.shape[0]} modalities but u has M = {M}")
    n_state = int(A.shape[2])
    if n_state < 1:
        raise _fail(f"A must have a state size N >= 1, got shape {tuple(A.shape)}")

    _expect("u", u, (M, batch, dim, length), "(M, batch, D, L)")
    _expect("delta", delta, (M, batch, dim, length), "(M, batch, D, L)")
    _expect("A", A, (M, dim, n_state), "(M, D, N)")
    _expect("B", B, (M, batch, n_state, length), "(M, batch, N, L)")
    _expect("C", C, (M, batch, n_state, length), "(M, batch, N, L)")
    if D is not None:
        _expect("D", D, (M, dim), "(M, D)")
    if z is not None:
        _expect("z", z, (M, batch, dim, length), "(M, batch, D, L)")
    if delta_bias is not None:
        _expect("delta_bias", delta_bias, (M, dim), "(M, D)")
    if coupling is not None:
        _expect("coupling", coupling, (M, M), "(M, M)")
    if initial_state is not None:
        _expect("initial_state", initial_state, (M, batch, dim, n_state), "(M, batch, D, N)")

    named = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z}
    named |= {"delta_bias": delta_bias, "coupling": coupling, "initial_state": initial_state}
    for name, tensor in named.items():
        if tensor is not None and tensor.device != u.device:
            raise _fail(f"{name} is on {tensor.device} but u is on {u.device}")
    return ScanDims(M, batch, dim, n_state, length)


def find_nonfinite(named: dict[str, Tensor | None]) -> list[str]:
    """Names of the given tensors that hold NaN or infinity (None entries are skipped).

    All tensors are reduced on their device into one flag vector that is read back once: a
    single host synchronisation on a GPU, whatever the number of tensors. Each tensor costs one
    pass, ``aminmax`` (NaN propagates to both ends, an infinity shows as one of them): 10-15x
    cheaper on a CPU than ``isfinite(t).all()``, which makes and reduces boolean temporaries.
    """
    names = [name for name, t in named.items() if t is not None]
    if not names:
        return []
    flags = torch.stack(
        [torch.isfinite(torch.stack(torch.aminmax(named[name]))).all() for name in names]  # type: ignore[arg-type]
    )
    if bool(flags.all()):
        return []
    return [name for name, ok in zip(names, flags.tolist(), strict=True) if not ok]


class NonFiniteInputError(ValueError):
    """Scan inputs hold NaN or infinity (for a model: its input features overflowed)."""


def nonfinite_error(names: list[str]) -> NonFiniteInputError:
    """The error raised when scan inputs hold NaN or infinity."""
    return NonFiniteInputError(f"{_PREFIX}: non-finite values (NaN or inf) in {', '.join(names)}")


def check_finite(named: dict[str, Tensor | None]) -> None:
    """Raise ValueError naming every tensor of ``named`` that holds NaN or infinity."""
    bad = find_nonfinite(named)
    if bad:
        raise nonfinite_error(bad)
