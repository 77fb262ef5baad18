"""The model's use of the optional mamba-ssm / causal-conv1d kernels.

The real kernels run only in the GPU image. Here stand-in modules injected into ``sys.modules``
by this test file ONLY (plain-PyTorch functions with the packages' documented signatures) check
that the model hands them the right arguments: with the stand-ins forced on, the model must give
the answers of its own torch conv and coupled scan. Selection on CUDA is tested in
tests/ops/test_mamba_kernels.py; on this CPU the model never picks them.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from model.ops.mamba_kernels import KernelChoice

FIELDS = ("score", "logits", "probabilities", "modality_weights")


def test_cpu_model_reports_torch_kernels(make_model) -> None:
    model = make_model(state_coupling="none")
    info = json.loads(json.dumps(model.describe()))
    assert info["conv_kernel"] == "torch" and info["uncoupled_scan_kernel"] is None
    assert model.set_scan_backend("auto") == "torch"
    assert model.kernels == KernelChoice("torch", None)


def test_forcing_a_missing_kernel_fails_clearly(make_model) -> None:
    if "causal_conv1d" in sys.modules or "mamba_ssm" in sys.modules:
        pytest.skip("the packages are importable here")
    model = make_model()
    with pytest.raises(RuntimeError, match="does not import"):
        model.set_kernels(conv="causal_conv1d")
    with pytest.raises(ValueError, match="conv kernel"):
        model.set_kernels(conv="winograd")
    assert model.kernels == KernelChoice()


@pytest.mark.parametrize("chunk", [None, 5])
def test_uncoupled_model_on_the_kernels_equals_torch(make_model, batch_of, stand_ins, chunk):
    """W = I: conv by causal_conv1d_fn and scan by selective_scan_fn give the model's answer,
    whole and chunked (chunks after the first carry a state, which selective_scan_fn cannot
    take: they run our scan)."""
    features, masks = batch_of([13, 9])
    masks["visual"][0, 2:6] = False
    model = make_model(state_coupling="none", scan_backend="torch").double()
    features = {m: f.double() for m, f in features.items()}
    model.set_inference_chunk_size(chunk)
    with torch.no_grad():
        want = model(features, masks)
        assert model.set_kernels("causal_conv1d", "mamba_ssm") == KernelChoice(
            "causal_conv1d", "mamba_ssm"
        )
        got = model(features, masks)
    n_layers, n_modalities = 2, 3
    assert stand_ins.conv == n_layers * n_modalities * (3 if chunk else 1)
    assert stand_ins.scan == n_layers * n_modalities  # the first (or only) chunk
    for name in FIELDS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-10)
    info = model.describe()
    assert info["conv_kernel"] == "causal_conv1d" and info["uncoupled_scan_kernel"] == "mamba_ssm"


def test_coupled_model_keeps_its_scan(make_model, batch_of, stand_ins) -> None:
    """mamba-ssm's scan cannot mix states across modalities: a coupled model uses only the
    conv kernel, even when the scan kernel is forced on."""
    features, masks = batch_of([8])
    model = make_model(state_coupling="learned", scan_backend="torch")
    with torch.no_grad():
        want = model(features, masks).score
        model.set_kernels("causal_conv1d", "mamba_ssm")
        got = model(features, masks).score
    assert stand_ins.scan == 0 and stand_ins.conv == 2 * 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kernels_in_training(make_model, batch_of, stand_ins) -> None:
    """Gradients flow through the adapters (the real kernels bring their own backward)."""
    features, masks = batch_of([7, 5])
    grads = {}
    for kernels in (KernelChoice(), KernelChoice("causal_conv1d", "mamba_ssm")):
        model = make_model(state_coupling="none", scan_backend="torch").double()
        model.set_kernels(kernels.conv, kernels.uncoupled_scan)
        out = model({m: f.double() for m, f in features.items()}, masks)
        out.score.sum().backward()
        params = model.named_parameters()
        grads[kernels] = {n: p.grad.clone() for n, p in params if p.grad is not None}
    plain, fast = grads.values()
    assert stand_ins.scan > 0 and plain.keys() == fast.keys()
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-8, atol=1e-10, msg=name)
