"""Optional mamba-ssm / causal-conv1d kernels: selection logic and our adapters' argument layout.

The real kernels exist only in the GPU image (compiled CUDA extensions; no CPU path), so here:
- without the packages (this machine), selection falls back to torch and our scan;
- with tiny stand-in modules put into ``sys.modules`` by these tests ONLY, written from the
  packages' documented signatures and semantics (mamba-ssm's ``selective_scan_fn``: u, delta
  (b, D, L), A (D, N), B, C (b, N, L), D, delta_bias (D,), out = y * silu(z); causal-conv1d's
  ``causal_conv1d_fn``: x (b, D, L), weight (D, width), bias (D,), activation "silu"), the
  adapters' calls are checked against our reference scan. This tests how we call the kernels,
  not the kernels: those run only on a GPU host with the image's wheels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import KernelStandIns

from model.ops import coupled_selective_scan, mamba_kernels
from model.ops.mamba_kernels import KernelChoice, select_kernels

Factory = Callable[..., dict[str, Any]]


def test_without_the_packages_everything_falls_back() -> None:
    if mamba_kernels.load_causal_conv1d() or mamba_kernels.load_selective_scan():
        pytest.skip("mamba-ssm / causal-conv1d are installed here")
    for device in ("cpu", "cuda"):
        assert select_kernels(device, "none", "triton") == KernelChoice("torch", None)
    with pytest.raises(RuntimeError, match="does not import"):
        mamba_kernels.require(KernelChoice("causal_conv1d"))
    with pytest.raises(RuntimeError, match="does not import"):
        mamba_kernels.require(KernelChoice(uncoupled_scan="mamba_ssm"))


def test_importing_ops_imports_neither_package() -> None:
    code = (
        "import sys, model.ops, model.mamba; "
        "sys.exit(any(m in sys.modules for m in ('mamba_ssm', 'causal_conv1d')))"
    )
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_selection_with_the_packages(stand_ins: KernelStandIns) -> None:
    """CUDA: causal-conv1d's conv always; mamba-ssm's scan only for W = I layers on the GPU
    kernel. CPU: never (neither package runs there)."""
    assert select_kernels("cuda", "none", "triton") == KernelChoice("causal_conv1d", "mamba_ssm")
    assert select_kernels("cuda:0", "learned", "triton") == KernelChoice("causal_conv1d", None)
    assert select_kernels("cuda", "mean", "triton") == KernelChoice("causal_conv1d", None)
    assert select_kernels("cuda", "none", "ref") == KernelChoice("causal_conv1d", None)
    assert select_kernels("cpu", "none", "torch") == KernelChoice("torch", None)
    mamba_kernels.require(KernelChoice("causal_conv1d", "mamba_ssm"))


def test_kernel_choice_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="conv kernel"):
        KernelChoice("cudnn")
    with pytest.raises(ValueError, match="uncoupled scan kernel"):
        KernelChoice("torch", "flash")


@pytest.mark.parametrize("options", [True, False], ids=["all-options", "plain"])
@pytest.mark.parametrize("last", [True, False], ids=["last-state", "y-only"])
def test_uncoupled_adapter_equals_identity_coupled_scan(
    stand_ins: KernelStandIns, scan_inputs: Factory, options: bool, last: bool
) -> None:
    """One selective_scan_fn call per modality on the modality's (b, D, L) slices equals our
    coupled scan with W = I."""
    x = scan_inputs(
        M=3, coupling="none", D=options, z=options, delta_bias=options, delta_softplus=options
    )
    x.pop("coupling")
    want = coupled_selective_scan(**x, return_last_state=last, backend="ref")
    got = mamba_kernels.uncoupled_selective_scan(**x, return_last_state=last)
    assert len(stand_ins.scan_calls) == 3
    for m, call in enumerate(stand_ins.scan_calls):  # views of the inputs, not copies
        assert call["u"].data_ptr() == x["u"][m].data_ptr()
        assert torch.equal(call["A"], x["A"][m]) and torch.equal(call["B"], x["B"][m])
    if last:
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv_adapter_equals_torch_causal_conv(stand_ins: KernelStandIns) -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    got = mamba_kernels.causal_conv1d_silu(x, conv.weight[:, 0, :], conv.bias)
    want = F.silu(conv(x)[..., :9])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert stand_ins.conv_calls[0]["activation"] == "silu"
